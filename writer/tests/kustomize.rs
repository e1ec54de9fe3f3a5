//! Kustomize-aware placement over the real protocol, real git and the real `kubectl kustomize` (kubectl v1.37.2
//! built by `scripts/build-real-kube.sh`): what the writer pushes builds to exactly the mirrored objects.

mod support;

use std::{path::Path, process::Command};

use reverser_proto::v1::{
    self as pb, ListDestinationsRequest, agent_message::Kind as In,
    writer_admin_client::WriterAdminClient,
};
use support::*;
use testkit::BareRepo;

const DEST: &str = "gitops/prod";
const BASE: &str = "clusters/prod";
const RECIPIENT: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

fn declaration(
    repo: &BareRepo,
    mode: pb::KustomizationMode,
    omit_namespace: bool,
) -> pb::AgentMessage {
    let mut message = destination(DEST, &repo.file_url(), "main", BASE, false);
    if let Some(In::Destination(d)) = &mut message.kind {
        d.kustomization = mode.into();
        d.omit_namespace = omit_namespace;
    }
    message
}

/// A ConfigMap without `metadata.namespace` (what the agent sends for `omitNamespace`).
fn free_configmap(name: &str, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  key: {value}\n")
}

fn cluster_role(name: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {name}\nrules: []\n"
    )
}

/// The branch's tree, checked out into a temporary folder.
fn checkout(repo: &BareRepo) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("w");
    let out = testkit::git(
        None,
        &[
            "clone",
            "--quiet",
            "--branch",
            "main",
            &repo.file_url(),
            work.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    dir
}

/// `kubectl kustomize folder`: Ok((kind, namespace, name) of every object, sorted), Err(stderr).
fn kustomize(folder: &Path) -> Result<Vec<(String, String, String)>, String> {
    let out = Command::new(testkit::real_kube_binary("kubectl"))
        .arg("kustomize")
        .arg(folder)
        .output()
        .expect("kubectl runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    let mut objects: Vec<(String, String, String)> = text
        .split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|doc| {
            let value: serde_json::Value = serde_saphyr::from_str(doc).unwrap();
            let field = |path: &str| {
                value
                    .pointer(path)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned()
            };
            (
                field("/kind"),
                field("/metadata/namespace"),
                field("/metadata/name"),
            )
        })
        .collect();
    objects.sort();
    Ok(objects)
}

fn objects(list: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    let mut list: Vec<_> = list
        .iter()
        .map(|(k, ns, n)| ((*k).to_owned(), (*ns).to_owned(), (*n).to_owned()))
        .collect();
    list.sort();
    list
}

#[tokio::test]
async fn created_kustomization_builds_to_exactly_the_mirrored_objects_as_they_come_and_go() {
    let repo = BareRepo::new();
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    agent
        .send(declaration(&repo, pb::KustomizationMode::Create, false))
        .await;
    agent
        .send(upsert(
            DEST,
            1,
            "core/v1/configmaps/shop/web.yaml",
            &configmap("shop", "web", "1"),
        ))
        .await;
    agent
        .send(upsert(
            DEST,
            2,
            "core/v1/configmaps/shop/db.yaml",
            &configmap("shop", "db", "1"),
        ))
        .await;
    agent
        .send(upsert(
            DEST,
            3,
            "core/v1/configmaps/blog/web.yaml",
            &configmap("blog", "web", "1"),
        ))
        .await;
    agent
        .send(upsert(
            DEST,
            4,
            "rbac.authorization.k8s.io/v1/clusterroles/viewer.yaml",
            &cluster_role("viewer"),
        ))
        .await;
    agent.ack(DEST, 4).await;
    let tree = checkout(&repo);
    let folder = tree.path().join("w").join(BASE);
    assert_eq!(
        kustomize(&folder).unwrap(),
        objects(&[
            ("ConfigMap", "shop", "web"),
            ("ConfigMap", "shop", "db"),
            ("ConfigMap", "blog", "web"),
            ("ClusterRole", "", "viewer"),
        ])
    );
    let created = std::fs::read_to_string(folder.join("kustomization.yaml")).unwrap();
    assert!(
        created.contains(
            "resources:\n- core/v1/configmaps/blog/web.yaml\n- core/v1/configmaps/shop/db.yaml\n"
        ),
        "sorted entries relative to the base folder: {created}"
    );

    // A delete and a snapshot sweep: both files leave the kustomization with them.
    agent
        .send(delete(DEST, 5, "core/v1/configmaps/blog/web.yaml"))
        .await;
    agent
        .send(snapshot_begin(
            DEST,
            6,
            scope("", "v1", "configmaps", "shop"),
            7,
        ))
        .await;
    agent
        .send(upsert(
            DEST,
            7,
            "core/v1/configmaps/shop/web.yaml",
            &configmap("shop", "web", "2"),
        ))
        .await;
    agent
        .send(snapshot_end(
            DEST,
            8,
            scope("", "v1", "configmaps", "shop"),
            7,
        ))
        .await;
    agent.ack(DEST, 8).await;
    let tree = checkout(&repo);
    let folder = tree.path().join("w").join(BASE);
    assert!(!folder.join("core/v1/configmaps/shop/db.yaml").exists());
    assert_eq!(
        kustomize(&folder).unwrap(),
        objects(&[("ConfigMap", "shop", "web"), ("ClusterRole", "", "viewer"),])
    );

    // The admin API shows the options.
    let mut admin = WriterAdminClient::connect(writer.grpc_url()).await.unwrap();
    let listed = admin
        .list_destinations(ListDestinationsRequest {})
        .await
        .unwrap()
        .into_inner()
        .destinations;
    assert_eq!(
        listed[0].kustomization,
        pb::KustomizationMode::Create as i32
    );
    assert!(!listed[0].omit_namespace);
    writer.stop().await;
}

const HUMAN_KUSTOMIZATION: &str = "\
# Production: written by people, kept by the writer.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - extra/quota.yaml   # not mirrored: ours
patches:
  # every ConfigMap gets the team label
  - target:
      kind: ConfigMap
    patch: |-
      - op: add
        path: /metadata/labels
        value: {team: shop}
";

const QUOTA: &str = "apiVersion: v1\nkind: ResourceQuota\nmetadata:\n  name: quota\n  namespace: shop\nspec:\n  hard:\n    pods: \"10\"\n";

#[tokio::test]
async fn an_existing_commented_kustomization_keeps_its_patch_comments_and_foreign_resource() {
    let repo = BareRepo::new();
    repo.commit_as_human("main", &format!("{BASE}/extra/quota.yaml"), QUOTA, "quota");
    repo.commit_as_human(
        "main",
        &format!("{BASE}/kustomization.yaml"),
        HUMAN_KUSTOMIZATION,
        "kustomization",
    );
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    agent
        .send(declaration(&repo, pb::KustomizationMode::Maintain, false))
        .await;
    agent
        .send(upsert(
            DEST,
            1,
            "core/v1/configmaps/shop/web.yaml",
            &configmap("shop", "web", "1"),
        ))
        .await;
    // Sent twice (a re-send after a reconnect): listed once.
    agent
        .send(upsert(
            DEST,
            2,
            "core/v1/configmaps/shop/web.yaml",
            &configmap("shop", "web", "1"),
        ))
        .await;
    agent.ack(DEST, 2).await;
    let edited = repo
        .read("main", &format!("{BASE}/kustomization.yaml"))
        .unwrap();
    // Every line people wrote is still there, in order, and the new entry follows theirs.
    assert_eq!(
        edited,
        HUMAN_KUSTOMIZATION.replace(
            "  - extra/quota.yaml   # not mirrored: ours\n",
            "  - extra/quota.yaml   # not mirrored: ours\n  - core/v1/configmaps/shop/web.yaml\n"
        )
    );
    let tree = checkout(&repo);
    let folder = tree.path().join("w").join(BASE);
    assert_eq!(
        kustomize(&folder).unwrap(),
        objects(&[
            ("ConfigMap", "shop", "web"),
            ("ResourceQuota", "shop", "quota")
        ])
    );
    let built = Command::new(testkit::real_kube_binary("kubectl"))
        .arg("kustomize")
        .arg(&folder)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&built.stdout).contains("team: shop"),
        "the patch still applies"
    );

    // Deleting the object unlists it and nothing else.
    agent
        .send(delete(DEST, 3, "core/v1/configmaps/shop/web.yaml"))
        .await;
    agent.ack(DEST, 3).await;
    assert_eq!(
        repo.read("main", &format!("{BASE}/kustomization.yaml"))
            .unwrap(),
        HUMAN_KUSTOMIZATION
    );
    writer.stop().await;
}

#[tokio::test]
async fn an_unreadable_kustomization_is_left_alone_and_reported_and_objects_still_land() {
    let repo = BareRepo::new();
    let broken = "resources: [a.yaml\n";
    repo.commit_as_human(
        "main",
        &format!("{BASE}/kustomization.yaml"),
        broken,
        "broken",
    );
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    agent
        .send(declaration(&repo, pb::KustomizationMode::Maintain, false))
        .await;
    agent
        .send(upsert(
            DEST,
            1,
            "core/v1/configmaps/shop/web.yaml",
            &configmap("shop", "web", "1"),
        ))
        .await;
    let status = agent.status(DEST, "KustomizationUnreadable").await;
    assert_eq!(
        (status.status.as_str(), status.reason.as_str()),
        ("True", "KustomizationInvalid")
    );
    assert!(
        status.message.contains("clusters/prod/kustomization.yaml"),
        "{status:?}"
    );
    agent.ack(DEST, 1).await;
    assert_eq!(
        repo.read("main", &format!("{BASE}/kustomization.yaml"))
            .unwrap(),
        broken
    );
    assert!(
        repo.read("main", &format!("{BASE}/core/v1/configmaps/shop/web.yaml"))
            .is_some()
    );
    let metrics = writer.metrics().await;
    assert!(
        metrics.contains(
            "gitops_reverser_kustomization_problems_total{destination=\"gitops/prod\"} 1"
        ),
        "{metrics}"
    );

    // Fixed by a person: the next change is listed and the condition clears.
    repo.commit_as_human(
        "main",
        &format!("{BASE}/kustomization.yaml"),
        "resources: []\n",
        "fixed",
    );
    agent
        .send(upsert(
            DEST,
            2,
            "core/v1/configmaps/shop/db.yaml",
            &configmap("shop", "db", "1"),
        ))
        .await;
    let status = agent.status(DEST, "KustomizationUnreadable").await;
    assert_eq!(status.status, "False", "{status:?}");
    agent.ack(DEST, 2).await;
    let fixed = repo
        .read("main", &format!("{BASE}/kustomization.yaml"))
        .unwrap();
    assert!(fixed.contains("core/v1/configmaps/shop/db.yaml"), "{fixed}");
    writer.stop().await;
}

#[tokio::test]
async fn namespace_free_objects_go_into_the_namespace_an_overlay_chooses_and_name_clashes_are_refused()
 {
    let repo = BareRepo::new();
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    agent
        .send(declaration(&repo, pb::KustomizationMode::Create, true))
        .await;
    agent
        .send(upsert(
            DEST,
            1,
            "core/v1/configmaps/shop/web.yaml",
            &free_configmap("web", "1"),
        ))
        .await;
    agent
        .send(upsert(
            DEST,
            2,
            "core/v1/configmaps/shop/db.yaml",
            &free_configmap("db", "1"),
        ))
        .await;
    agent.ack(DEST, 2).await;
    // `web` of another namespace would be the same object once deployed: refused, the first one stays.
    agent
        .send(upsert(
            DEST,
            3,
            "core/v1/configmaps/blog/web.yaml",
            &free_configmap("web", "other"),
        ))
        .await;
    let refused = agent.reject(3).await;
    assert_eq!(refused.reason, "NamespaceClash", "{refused:?}");
    assert!(refused.message.contains("namespace shop"), "{refused:?}");
    agent
        .send(upsert(
            DEST,
            4,
            "core/v1/configmaps/blog/feed.yaml",
            &free_configmap("feed", "1"),
        ))
        .await;
    agent.ack(DEST, 4).await;

    let tree = checkout(&repo);
    let work = tree.path().join("w");
    assert!(
        !work
            .join(BASE)
            .join("core/v1/configmaps/blog/web.yaml")
            .exists()
    );
    // An overlay that installs the folder into a namespace chosen at deploy time.
    let overlay = work.join("deploy/staging");
    std::fs::create_dir_all(&overlay).unwrap();
    std::fs::write(
        overlay.join("kustomization.yaml"),
        "namespace: staging\nresources:\n- ../../clusters/prod\n",
    )
    .unwrap();
    assert_eq!(
        kustomize(&overlay).unwrap(),
        objects(&[
            ("ConfigMap", "staging", "web"),
            ("ConfigMap", "staging", "db"),
            ("ConfigMap", "staging", "feed"),
        ])
    );
    writer.stop().await;
}

/// What Flux does with a folder that has no kustomization: source-controller drops the files its `.sourceignore`
/// rules name (evaluated here by git, which reads the same gitignore format per folder), then kustomize-controller
/// generates a kustomization listing every `.yaml`/`.yml` file below the folder.
fn flux_build(
    folder: &Path,
    honour_sourceignore: bool,
) -> Result<Vec<(String, String, String)>, String> {
    if honour_sourceignore {
        let out = testkit::git(Some(folder), &["init", "--quiet", "."]);
        assert!(out.status.success());
        let out = testkit::git(
            Some(folder),
            &[
                "ls-files",
                "--others",
                "--ignored",
                "--exclude-per-directory=.sourceignore",
            ],
        );
        assert!(out.status.success(), "{out:?}");
        for ignored in String::from_utf8(out.stdout).unwrap().lines() {
            std::fs::remove_file(folder.join(ignored)).unwrap();
        }
        std::fs::remove_dir_all(folder.join(".git")).unwrap();
    }
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(format!(
                    "./{}",
                    path.strip_prefix(root).unwrap().to_str().unwrap()
                ));
            }
        }
    }
    let mut files = Vec::new();
    walk(folder, folder, &mut files);
    files.sort();
    let mut generated = String::from(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n",
    );
    for file in files {
        generated.push_str(&format!("- {file}\n"));
    }
    std::fs::write(folder.join("kustomization.yaml"), generated).unwrap();
    kustomize(folder)
}

#[tokio::test]
async fn a_kustomization_flux_generates_for_the_folder_holds_only_the_mirrored_objects() {
    let repo = BareRepo::new();
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    let mut declared = declaration(&repo, pb::KustomizationMode::Off, false);
    if let Some(In::Destination(d)) = &mut declared.kind {
        d.age_recipients = vec![RECIPIENT.to_owned()];
    }
    agent.send(declared).await;
    agent
        .send(upsert(
            DEST,
            1,
            "core/v1/configmaps/shop/web.yaml",
            &configmap("shop", "web", "1"),
        ))
        .await;
    // An encrypted object: the writer adds its `.sops.yaml` for the sops CLI.
    let mut sealed = upsert(
        DEST,
        2,
        "core/v1/configmaps/shop/sealed.sops.yaml",
        &configmap("shop", "sealed", "ENC[...]"),
    );
    if let Some(In::Upsert(u)) = &mut sealed.kind {
        u.fingerprint = "v1:00".into();
    }
    agent.send(sealed).await;
    agent.ack(DEST, 2).await;
    for file in [".sops.yaml", ".configbutler/owner.yaml"] {
        assert!(
            repo.read("main", &format!("{BASE}/{file}")).is_some(),
            "{file} is in the folder"
        );
    }
    let expected = objects(&[
        ("ConfigMap", "shop", "web"),
        ("ConfigMap", "shop", "sealed"),
    ]);
    let tree = checkout(&repo);
    assert_eq!(
        flux_build(&tree.path().join("w").join(BASE), true).unwrap(),
        expected
    );
    // Without the ignore rules the writer's own files break the build: what the rules are for.
    let tree = checkout(&repo);
    let error = flux_build(&tree.path().join("w").join(BASE), false).unwrap_err();
    eprintln!("without the ignore rules: {error}");
    assert!(error.contains("missing Resource metadata"), "{error}");
    writer.stop().await;
}
