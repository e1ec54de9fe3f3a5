mod placement;

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use reverser_common::sops;

use super::*;
use crate::{
    git::GitError,
    model::{
        Change, ClusterIdentity, DestinationId, DestinationRef, FlushOrder, ObjectId, Operation,
        Origin, Prune, Scope,
    },
};

struct MapTree(BTreeMap<String, Vec<u8>>);

impl TreeView for MapTree {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, GitError> {
        Ok(self.0.get(path).cloned())
    }
    fn list(&self, folder: &str) -> Result<Vec<String>, GitError> {
        let prefix = format!("{folder}/");
        Ok(self
            .0
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect())
    }
}

fn tree(files: &[(&str, &str)]) -> MapTree {
    MapTree(
        files
            .iter()
            .map(|(p, c)| ((*p).to_owned(), c.as_bytes().to_vec()))
            .collect(),
    )
}

fn identity(uid: &str) -> ClusterIdentity {
    ClusterIdentity {
        cluster_uid: uid.into(),
        cluster_name: "test".into(),
        instance_id: "agent-0".into(),
        controller_namespace: "gitops".into(),
        controller_name: "reverser".into(),
        leader_term: None,
    }
}

fn destination(base: &str, exclusive: bool) -> DestinationRef {
    destination_for("uid-a", base, exclusive)
}

fn destination_for(uid: &str, base: &str, exclusive: bool) -> DestinationRef {
    let (replies, _) = crate::reply::Replies::channel(1);
    DestinationRef {
        id: DestinationId {
            cluster_uid: uid.into(),
            key: format!("gitops/{base}"),
        },
        base_folder: base.into(),
        exclusive_mode: exclusive,
        age_recipients: Vec::new().into(),
        prune: Prune::OnSnapshot,
        commit_template: None,
        placement: Default::default(),
        origin: Arc::new(Origin {
            session_id: 1,
            identity: identity(uid),
            replies,
        }),
        acked: Arc::new(AtomicU64::new(0)),
        conditions: Default::default(),
    }
}

fn upsert(d: &DestinationRef, seq: u64, path: &str, content: &str, author: Option<&str>) -> Change {
    Change {
        destination: d.clone(),
        sequence: seq,
        operation: Operation::Upsert {
            path: path.into(),
            content: content.as_bytes().into(),
            object: ObjectId::default(),
            author: author.map(Into::into),
            fingerprint: None,
        },
    }
}

fn encrypted(fingerprint: &str, ciphertext: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n  annotations:\n    {}: {fingerprint}\n\
             data:\n  password: ENC[AES256_GCM,data:{ciphertext},iv:x,tag:y,type:str]\nsops:\n  version: 3.9.4\n",
        sops::FINGERPRINT_ANNOTATION
    )
}

fn sealed_upsert(
    d: &DestinationRef,
    seq: u64,
    path: &str,
    fingerprint: &str,
    ciphertext: &str,
) -> Change {
    let mut change = upsert(d, seq, path, &encrypted(fingerprint, ciphertext), None);
    if let Operation::Upsert { fingerprint: f, .. } = &mut change.operation {
        *f = Some(fingerprint.to_owned());
    }
    change
}

fn encrypting(base: &str, recipients: &[&str]) -> DestinationRef {
    let mut d = destination(base, false);
    d.age_recipients = recipients
        .iter()
        .map(|r| (*r).to_owned())
        .collect::<Vec<_>>()
        .into();
    d
}

const SECRET_PATH: &str = "core/v1/secrets/shop/db.sops.yaml";

#[test]
fn equal_fingerprint_is_a_no_op_although_the_ciphertext_differs() {
    let d = encrypting("clusters/prod", &["age1a"]);
    let config = sops::render_config(&["age1a".to_owned()]);
    let t = tree(&[
        (
            "clusters/prod/core/v1/secrets/shop/db.sops.yaml",
            &encrypted("v1:aa", "OLD"),
        ),
        (
            "clusters/prod/.configbutler/owner.yaml",
            &marker_for("uid-a"),
        ),
        ("clusters/prod/.sops.yaml", &config),
    ]);
    let same = buffer(vec![sealed_upsert(&d, 1, SECRET_PATH, "v1:aa", "NEW")]);
    let plan_same = plan(same.entries(), &t, &context(500)).unwrap();
    assert!(plan_same.commits.is_empty());
    assert_eq!(plan_same.stats.noops, 1);
    // Another fingerprint (changed data or recipients) re-encrypts once.
    let changed = buffer(vec![sealed_upsert(&d, 2, SECRET_PATH, "v1:bb", "NEW")]);
    let plan_changed = plan(changed.entries(), &t, &context(500)).unwrap();
    assert_eq!(
        changed_paths(&plan_changed),
        vec![(
            "clusters/prod/core/v1/secrets/shop/db.sops.yaml".to_owned(),
            true
        )]
    );
}

#[test]
fn first_encrypted_file_bootstraps_sops_config_and_keeps_a_human_one() {
    let d = encrypting("clusters/prod", &["age1b", "age1a"]);
    let b = buffer(vec![
        upsert(&d, 1, "core/v1/configmaps/shop/a.yaml", CM, None),
        sealed_upsert(&d, 2, SECRET_PATH, "v1:aa", "C"),
    ]);
    let plan1 = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
    let paths = changed_paths(&plan1);
    assert!(
        paths.contains(&("clusters/prod/.sops.yaml".to_owned(), true)),
        "{paths:?}"
    );
    let config = plan1.commits[0]
        .changes
        .iter()
        .find(|c| c.path == "clusters/prod/.sops.yaml")
        .and_then(|c| c.content.clone())
        .unwrap();
    assert!(
        String::from_utf8(config)
            .unwrap()
            .contains("age: 'age1a,age1b'")
    );
    // Recipients changed: the generated file follows them.
    let stale = sops::render_config(&["age1old".to_owned()]);
    let t = tree(&[
        (
            "clusters/prod/.configbutler/owner.yaml",
            &marker_for("uid-a"),
        ),
        ("clusters/prod/.sops.yaml", &stale),
    ]);
    let b2 = buffer(vec![sealed_upsert(&d, 3, SECRET_PATH, "v1:cc", "C")]);
    let paths2 = changed_paths(&plan(b2.entries(), &t, &context(500)).unwrap());
    assert!(paths2.contains(&("clusters/prod/.sops.yaml".to_owned(), true)));
    // A configuration written by a person is left alone; plain destinations never get one.
    let human = tree(&[
        (
            "clusters/prod/.configbutler/owner.yaml",
            &marker_for("uid-a"),
        ),
        ("clusters/prod/.sops.yaml", "creation_rules: []\n"),
    ]);
    let paths3 = changed_paths(&plan(b2.entries(), &human, &context(500)).unwrap());
    assert!(
        !paths3
            .iter()
            .any(|(p, _)| p.ends_with(".sops.yaml") && !p.contains("secrets"))
    );
    let plain = destination("clusters/prod", false);
    let b4 = buffer(vec![upsert(
        &plain,
        4,
        "core/v1/configmaps/shop/a.yaml",
        CM,
        None,
    )]);
    let paths4 = changed_paths(&plan(b4.entries(), &tree(&[]), &context(500)).unwrap());
    assert!(!paths4.iter().any(|(p, _)| p.ends_with("/.sops.yaml")));
}

fn delete(d: &DestinationRef, seq: u64, path: &str) -> Change {
    Change {
        destination: d.clone(),
        sequence: seq,
        operation: Operation::Delete {
            path: path.into(),
            object: ObjectId::default(),
            author: None,
        },
    }
}

fn snapshot(
    d: &DestinationRef,
    seq: u64,
    folder: &str,
    ns: bool,
    epoch: u64,
    begin: bool,
) -> Change {
    let scope = Scope {
        folder: folder.into(),
        namespace_given: ns,
    };
    Change {
        destination: d.clone(),
        sequence: seq,
        operation: if begin {
            Operation::SnapshotBegin { scope, epoch }
        } else {
            Operation::SnapshotEnd { scope, epoch }
        },
    }
}

fn context(cap: usize) -> PlanContext {
    PlanContext {
        bot_name: "Bot".into(),
        bot_email: "bot@example.com".into(),
        deletes_cap: cap,
        now_rfc3339: "2026-11-26T00:00:00Z".into(),
    }
}

fn buffer(changes: Vec<Change>) -> Buffer {
    let mut buffer = Buffer::default();
    let now = Instant::now();
    for change in changes {
        assert_eq!(buffer.push(change, now), Accepted::Buffered);
    }
    buffer
}

fn marker_for(uid: &str) -> String {
    String::from_utf8(render_marker(&identity(uid), "2026-01-01T00:00:00Z")).unwrap()
}

/// Changed paths, without the base folders' `.sourceignore` (its own test checks it).
fn changed_paths(plan: &Plan) -> Vec<(String, bool)> {
    plan.commits
        .iter()
        .flat_map(|c| {
            c.changes
                .iter()
                .filter(|f| !f.path.ends_with("/.sourceignore"))
                .map(|f| (f.path.clone(), f.content.is_some()))
        })
        .collect()
}

const CM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  k: v\n";
const CM2: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  k: w\n";

#[test]
fn latest_content_per_path_wins_and_first_write_adds_the_marker() {
    let d = destination("clusters/prod", false);
    let b = buffer(vec![
        upsert(&d, 1, "core/v1/configmaps/shop/a.yaml", CM, None),
        upsert(&d, 2, "core/v1/configmaps/shop/a.yaml", CM2, None),
    ]);
    let plan = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
    assert_eq!(plan.commits.len(), 1);
    let commit = &plan.commits[0];
    assert_eq!(commit.changes.len(), 3, "marker + ignore rules + object");
    assert_eq!(
        commit.changes[0].path,
        "clusters/prod/.configbutler/owner.yaml"
    );
    assert_eq!(commit.changes[2].content.as_deref(), Some(CM2.as_bytes()));
    assert!(
        commit
            .message
            .starts_with("[CREATE] core/v1/configmaps/shop/a\n"),
        "{}",
        commit.message
    );
    assert!(commit.message.contains("X-ConfigButler-ClusterUID: uid-a"));
    assert_eq!(
        (commit.author_name.as_str(), commit.author_email.as_str()),
        ("Bot", "bot@example.com")
    );
}

#[test]
fn semantically_equal_content_is_a_no_op() {
    let d = destination("clusters/prod", false);
    let reformatted = "kind: ConfigMap\napiVersion: v1\ndata: {k: v}\nmetadata: {name: a}\n";
    let t = tree(&[
        ("clusters/prod/core/v1/configmaps/shop/a.yaml", CM),
        (
            "clusters/prod/.configbutler/owner.yaml",
            &marker_for("uid-a"),
        ),
    ]);
    let b = buffer(vec![
        upsert(&d, 1, "core/v1/configmaps/shop/a.yaml", reformatted, None),
        delete(&d, 2, "core/v1/configmaps/shop/gone.yaml"),
    ]);
    let plan = plan(b.entries(), &t, &context(500)).unwrap();
    assert!(plan.commits.is_empty());
    assert_eq!(plan.stats.noops, 2);
}

#[test]
fn an_update_keeps_the_comments_and_key_order_a_person_gave_the_file() {
    let d = destination("clusters/prod", false);
    let path = "clusters/prod/core/v1/configmaps/shop/a.yaml";
    let commented = "# owned by team-a\nkind: ConfigMap\napiVersion: v1\nmetadata:\n  name: a\ndata:\n  k: v # the key\n";
    let marker = marker_for("uid-a");
    let t = tree(&[
        (path, commented),
        ("clusters/prod/.configbutler/owner.yaml", &marker),
        // Flux's ignore rules are there already (a folder the writer wrote to before).
        (
            "clusters/prod/.sourceignore",
            kustomize::render_sourceignore(),
        ),
    ]);
    let b = buffer(vec![upsert(
        &d,
        1,
        "core/v1/configmaps/shop/a.yaml",
        CM2,
        None,
    )]);
    let plan = plan(b.entries(), &t, &context(500)).unwrap();
    assert_eq!(plan.commits.len(), 1);
    let written = plan.commits[0].changes[0].content.as_deref().unwrap();
    assert_eq!(
        std::str::from_utf8(written).unwrap(),
        "# owned by team-a\nkind: ConfigMap\napiVersion: v1\nmetadata:\n  name: a\ndata:\n  k: w # the key\n"
    );
    assert_eq!(plan.stats.bytes, written.len());
    assert!(plan.edit_fallbacks.is_empty());

    // A file in the writer's own layout gets the new rendering as it is.
    let t = tree(&[
        (path, CM),
        ("clusters/prod/.configbutler/owner.yaml", &marker),
        // Flux's ignore rules are there already (a folder the writer wrote to before).
        (
            "clusters/prod/.sourceignore",
            kustomize::render_sourceignore(),
        ),
    ]);
    let plan = plan_of(&b, &t);
    assert_eq!(
        plan.commits[0].changes[0].content.as_deref(),
        Some(CM2.as_bytes())
    );
    assert!(plan.edit_fallbacks.is_empty());
}

fn plan_of(b: &Buffer, t: &MapTree) -> Plan {
    plan(b.entries(), t, &context(500)).unwrap()
}

#[test]
fn a_commented_file_that_cannot_be_edited_is_rewritten_and_the_fallback_reported() {
    let d = destination("clusters/prod", false);
    let path = "clusters/prod/core/v1/configmaps/shop/a.yaml";
    let marker = marker_for("uid-a");
    // An anchor: editing could change what the alias shares.
    let anchored = "# shared\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: &n a\ndata:\n  k: v\n  n: *n\n";
    let t = tree(&[
        (path, anchored),
        ("clusters/prod/.configbutler/owner.yaml", &marker),
        // Flux's ignore rules are there already (a folder the writer wrote to before).
        (
            "clusters/prod/.sourceignore",
            kustomize::render_sourceignore(),
        ),
    ]);
    let b = buffer(vec![upsert(
        &d,
        1,
        "core/v1/configmaps/shop/a.yaml",
        CM2,
        None,
    )]);
    let plan = plan_of(&b, &t);
    assert_eq!(
        plan.commits[0].changes[0].content.as_deref(),
        Some(CM2.as_bytes())
    );
    assert_eq!(
        plan.edit_fallbacks,
        vec![EditFallback {
            path: path.into(),
            reason: "anchor_or_tag"
        }]
    );
}

#[test]
fn one_commit_per_author_in_arrival_order() {
    let d = destination("c", false);
    let t = tree(&[("c/.configbutler/owner.yaml", &marker_for("uid-a"))]);
    let b = buffer(vec![
        upsert(
            &d,
            1,
            "core/v1/configmaps/ns/a.yaml",
            CM,
            Some("alice@example.com"),
        ),
        upsert(
            &d,
            2,
            "core/v1/configmaps/ns/b.yaml",
            CM,
            Some("system:serviceaccount:kube-system:deployer"),
        ),
        upsert(
            &d,
            3,
            "core/v1/configmaps/ns/c.yaml",
            CM,
            Some("alice@example.com"),
        ),
        upsert(&d, 4, "core/v1/configmaps/ns/d.yaml", CM, None),
    ]);
    let plan = plan(b.entries(), &t, &context(500)).unwrap();
    let authors: Vec<_> = plan
        .commits
        .iter()
        .map(|c| (c.author_email.as_str(), c.changes.len()))
        .collect();
    assert_eq!(
        authors,
        vec![
            ("alice@example.com", 3),
            (
                "system-serviceaccount-kube-system-deployer@noreply.cluster.local",
                1
            ),
            ("bot@example.com", 1)
        ]
    );
    assert!(plan.commits[0].message.starts_with("Sync 2 objects in c: 2 created\n\n[CREATE] core/v1/configmaps/ns/a\n[CREATE] core/v1/configmaps/ns/c\n"));
}

#[test]
fn sweep_deletes_only_unseen_yaml_files_of_its_scope() {
    let d = destination("c", false);
    let t = tree(&[
        ("c/.configbutler/owner.yaml", &marker_for("uid-a")),
        ("c/apps/v1/deployments/shop/kept.yaml", CM),
        ("c/apps/v1/deployments/shop/orphan.yaml", CM),
        ("c/apps/v1/deployments/other/orphan2.yaml", CM),
        ("c/apps/v1/deployments/shop/README.md", "notes"),
        ("c/apps/v1/deployments/shop/deep/x.yaml", CM),
        ("c/apps/v1/statefulsets/shop/other-scope.yaml", CM),
        ("elsewhere/apps/v1/deployments/shop/x.yaml", CM),
    ]);
    let b = buffer(vec![
        snapshot(&d, 1, "apps/v1/deployments", false, 7, true),
        upsert(&d, 2, "apps/v1/deployments/shop/kept.yaml", CM, None),
        upsert(&d, 3, "apps/v1/deployments/shop/new.yaml", CM, None),
        snapshot(&d, 4, "apps/v1/deployments", false, 7, false),
    ]);
    let plan = plan(b.entries(), &t, &context(500)).unwrap();
    let mut paths = changed_paths(&plan);
    paths.sort();
    assert_eq!(
        paths,
        vec![
            ("c/apps/v1/deployments/other/orphan2.yaml".into(), false),
            ("c/apps/v1/deployments/shop/new.yaml".into(), true),
            ("c/apps/v1/deployments/shop/orphan.yaml".into(), false),
        ]
    );
    assert_eq!(plan.stats.orphans_deleted, 2);
    assert_eq!(plan.sweep_deletions, vec![(3, 2)], "the sweep is entry 3");
    assert!(
        plan.commits
            .iter()
            .any(|c| c.message.contains("(orphan: no longer in the cluster)"))
    );
}

/// The same tree and messages under each prune mode: a delete of `gone.yaml`, and a complete snapshot of the
/// scope that re-sent only `kept.yaml` (so `orphan.yaml` is an orphan).
fn paths_deleted_under(prune: Prune) -> Vec<String> {
    let mut d = destination("c", false);
    d.prune = prune;
    let t = tree(&[
        ("c/.configbutler/owner.yaml", &marker_for("uid-a")),
        ("c/core/v1/configmaps/shop/kept.yaml", CM),
        ("c/core/v1/configmaps/shop/orphan.yaml", CM),
        ("c/core/v1/configmaps/shop/gone.yaml", CM),
    ]);
    let mut b = Buffer::default();
    let now = Instant::now();
    for change in [
        delete(&d, 1, "core/v1/configmaps/shop/gone.yaml"),
        snapshot(&d, 2, "core/v1/configmaps", false, 3, true),
        upsert(&d, 3, "core/v1/configmaps/shop/kept.yaml", CM, None),
        snapshot(&d, 4, "core/v1/configmaps", false, 3, false),
    ] {
        assert_eq!(b.push(change, now), Accepted::Buffered, "{prune:?}");
    }
    // A mismatched end is still refused whatever the mode.
    assert!(matches!(
        b.push(snapshot(&d, 5, "core/v1/configmaps", false, 9, false), now),
        Accepted::SnapshotMismatch(_)
    ));
    let plan = plan(b.entries(), &t, &context(500)).unwrap();
    let mut deleted: Vec<String> = changed_paths(&plan)
        .into_iter()
        .filter(|(_, written)| !written)
        .map(|(path, _)| path)
        .collect();
    deleted.sort();
    deleted
}

#[test]
fn prune_modes_choose_which_deletions_happen() {
    assert_eq!(
        paths_deleted_under(Prune::OnSnapshot),
        vec![
            "c/core/v1/configmaps/shop/gone.yaml",
            "c/core/v1/configmaps/shop/orphan.yaml"
        ]
    );
    assert_eq!(
        paths_deleted_under(Prune::OnDelete),
        vec!["c/core/v1/configmaps/shop/gone.yaml"]
    );
    assert!(paths_deleted_under(Prune::Never).is_empty());
}

#[test]
fn sweep_respects_the_cap_and_zero_disables_it() {
    let d = destination("c", false);
    let files: Vec<(String, String)> = (0..10)
        .map(|i| (format!("c/core/v1/configmaps/ns/o{i}.yaml"), CM.to_owned()))
        .collect();
    let mut entries: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_str()))
        .collect();
    let marker = marker_for("uid-a");
    entries.push(("c/.configbutler/owner.yaml", &marker));
    let t = tree(&entries);
    let b = buffer(vec![
        snapshot(&d, 1, "core/v1/configmaps/ns", true, 1, true),
        snapshot(&d, 2, "core/v1/configmaps/ns", true, 1, false),
    ]);
    let capped = plan(b.entries(), &t, &context(3)).unwrap();
    assert_eq!(capped.stats.deleted, 3);
    let deleted: Vec<_> = changed_paths(&capped).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        deleted,
        vec![
            "c/core/v1/configmaps/ns/o0.yaml",
            "c/core/v1/configmaps/ns/o1.yaml",
            "c/core/v1/configmaps/ns/o2.yaml"
        ]
    );
    let disabled = plan(b.entries(), &t, &context(0)).unwrap();
    assert!(disabled.commits.is_empty());
    // The truncation is reported with what is left; a sweep under the cap completes.
    assert_eq!(capped.truncated_sweeps, vec![(1, 7)]);
    assert!(capped.completed_sweeps.is_empty());
    let complete = plan(b.entries(), &t, &context(10)).unwrap();
    assert!(complete.truncated_sweeps.is_empty());
    assert_eq!(complete.completed_sweeps, vec![1]);
}

fn refused(plan: &Plan) -> Vec<usize> {
    plan.path_conflicts.iter().map(|(i, _)| *i).collect()
}

#[test]
fn a_file_under_a_pending_file_is_refused_alone() {
    let d = destination("c", false);
    let b = buffer(vec![
        upsert(&d, 1, "a/x.yaml", CM, None),
        upsert(&d, 2, "a/x.yaml/y.yaml", CM, None),
        upsert(&d, 3, "a/z.yaml", CM, None),
    ]);
    let p = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
    assert_eq!(refused(&p), vec![1]);
    assert!(p.path_conflicts[0].1.contains("a/x.yaml/y.yaml"));
    let written: Vec<_> = changed_paths(&p).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        written,
        vec!["c/.configbutler/owner.yaml", "c/a/x.yaml", "c/a/z.yaml"]
    );
}

#[test]
fn a_file_where_a_pending_folder_is_is_refused_alone() {
    let d = destination("c", false);
    let b = buffer(vec![
        upsert(&d, 1, "a/x.yaml/y.yaml", CM, None),
        upsert(&d, 2, "a/x.yaml", CM, None),
    ]);
    let p = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
    assert_eq!(refused(&p), vec![1]);
    assert_eq!(p.stats.written, 1);
}

#[test]
fn conflicts_with_the_tree_are_refused_and_deletions_resolve_them() {
    let d = destination("c", false);
    let marker = marker_for("uid-a");
    // A person pushed a/x.yaml as a folder; another client owns a file b/f.yaml.
    let t = tree(&[
        ("c/.configbutler/owner.yaml", &marker),
        ("c/a/x.yaml/human.yaml", CM),
        ("c/b/f.yaml", CM),
    ]);
    let b = buffer(vec![
        upsert(&d, 1, "a/x.yaml", CM, None),
        upsert(&d, 2, "b/f.yaml/g.yaml", CM, None),
        upsert(&d, 3, "ok.yaml", CM, None),
    ]);
    let p = plan(b.entries(), &t, &context(500)).unwrap();
    assert_eq!(refused(&p), vec![0, 1]);
    for (_, message) in &p.path_conflicts {
        assert!(!message.contains("human.yaml") && !message.contains("b/f.yaml "));
    }
    assert_eq!(changed_paths(&p), vec![("c/ok.yaml".to_owned(), true)]);
    // A deletion in the same batch does not make room (its commit may come after the write's): refused too.
    let b = buffer(vec![
        delete(&d, 1, "b/f.yaml"),
        upsert(&d, 2, "b/f.yaml/g.yaml", CM, Some("alice")),
    ]);
    let p = plan(b.entries(), &t, &context(500)).unwrap();
    assert_eq!(refused(&p), vec![1]);
    assert_eq!(changed_paths(&p), vec![("c/b/f.yaml".to_owned(), false)]);
}

#[test]
fn clients_sharing_a_branch_do_not_hold_each_other_back() {
    let a = destination_for("uid-a", "c", false);
    let b_dest = destination_for("uid-b", "c", false);
    let b = buffer(vec![
        upsert(&a, 1, "a/x.yaml", CM, None),
        upsert(&b_dest, 1, "a/x.yaml/y.yaml", CM, None),
        upsert(&b_dest, 2, "b.yaml", CM, None),
    ]);
    let p = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
    assert_eq!(refused(&p), vec![1]);
    assert!(!p.path_conflicts[0].1.contains("a/x.yaml:"));
    assert_eq!(p.stats.written, 2);
}

#[test]
fn snapshot_spanning_earlier_flushes_keeps_what_it_saw() {
    // Objects upserted (and pushed) earlier in the same epoch are in the tree, not the buffer: still kept.
    let d = destination("c", false);
    let mut b = buffer(vec![
        snapshot(&d, 1, "core/v1/configmaps", false, 1, true),
        upsert(&d, 2, "core/v1/configmaps/ns/early.yaml", CM, None),
    ]);
    b.take();
    b.push(
        snapshot(&d, 3, "core/v1/configmaps", false, 1, false),
        Instant::now(),
    );
    let t = tree(&[
        ("c/.configbutler/owner.yaml", &marker_for("uid-a")),
        ("c/core/v1/configmaps/ns/early.yaml", CM),
        ("c/core/v1/configmaps/ns/stale.yaml", CM),
    ]);
    let plan = plan(b.entries(), &t, &context(500)).unwrap();
    assert_eq!(
        changed_paths(&plan),
        vec![("c/core/v1/configmaps/ns/stale.yaml".into(), false)]
    );
}

#[test]
fn snapshot_end_without_begin_is_refused() {
    let d = destination("c", false);
    let mut b = Buffer::default();
    let result = b.push(
        snapshot(&d, 1, "core/v1/configmaps", false, 1, false),
        Instant::now(),
    );
    assert!(matches!(result, Accepted::SnapshotMismatch(_)));
    b.push(
        snapshot(&d, 2, "core/v1/configmaps", false, 1, true),
        Instant::now(),
    );
    let result = b.push(
        snapshot(&d, 3, "core/v1/configmaps", false, 2, false),
        Instant::now(),
    );
    assert!(
        matches!(result, Accepted::SnapshotMismatch(_)),
        "other epoch"
    );
    assert_eq!(b.len(), 1, "only the begin is buffered");
}

#[test]
fn foreign_marker_refuses_writes_in_exclusive_mode_and_warns_otherwise() {
    let t = tree(&[("c/.configbutler/owner.yaml", &marker_for("uid-other"))]);
    let exclusive = destination("c", true);
    let b = buffer(vec![upsert(
        &exclusive,
        1,
        "core/v1/configmaps/ns/a.yaml",
        CM,
        None,
    )]);
    let refused = plan(b.entries(), &t, &context(500)).unwrap();
    assert!(refused.commits.is_empty());
    assert_eq!(refused.refused_entries, vec![0]);
    assert_eq!(refused.marker_conflicts.len(), 1);
    assert!(
        refused.marker_conflicts[0]
            .found_owner
            .contains("uid-other")
    );

    let shared = destination("c", false);
    let b = buffer(vec![upsert(
        &shared,
        1,
        "core/v1/configmaps/ns/a.yaml",
        CM,
        None,
    )]);
    let warned = plan(b.entries(), &t, &context(500)).unwrap();
    assert_eq!(
        changed_paths(&warned),
        vec![("c/core/v1/configmaps/ns/a.yaml".into(), true)]
    );
    assert_eq!(warned.marker_conflicts.len(), 1);
    assert!(warned.refused_entries.is_empty());
}

#[test]
fn two_clusters_on_one_branch_commit_separately_with_their_trailers() {
    let a = destination_for("uid-a", "clusters/a", false);
    let b_dest = destination_for("uid-b", "clusters/b", false);
    let b = buffer(vec![
        upsert(&a, 1, "core/v1/configmaps/ns/x.yaml", CM, None),
        upsert(&b_dest, 1, "core/v1/configmaps/ns/x.yaml", CM, None),
    ]);
    let plan = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
    assert_eq!(plan.commits.len(), 2);
    assert!(plan.commits[0].message.contains("ClusterUID: uid-a"));
    assert!(plan.commits[1].message.contains("ClusterUID: uid-b"));
}

#[test]
fn flush_is_due_on_any_cap() {
    let limits = Limits {
        max_files: 2,
        max_bytes: 1000,
        max_wait: Duration::from_secs(20),
    };
    let d = destination("c", false);
    let start = Instant::now();
    let mut b = Buffer::default();
    assert!(!b.flush_due(&limits, start), "empty buffer never flushes");
    b.push(
        upsert(&d, 1, "core/v1/configmaps/ns/a.yaml", CM, None),
        start,
    );
    b.push(
        upsert(&d, 2, "core/v1/configmaps/ns/a.yaml", CM2, None),
        start,
    );
    assert!(!b.flush_due(&limits, start), "same path counts once");
    assert!(
        b.flush_due(&limits, start + Duration::from_secs(20)),
        "time cap"
    );
    b.push(
        upsert(&d, 3, "core/v1/configmaps/ns/b.yaml", CM, None),
        start,
    );
    assert!(b.flush_due(&limits, start), "file cap");
    let mut big = Buffer::default();
    big.push(
        upsert(
            &d,
            1,
            "core/v1/configmaps/ns/a.yaml",
            &"x: 1\n".repeat(300),
            None,
        ),
        start,
    );
    assert!(big.flush_due(&limits, start), "byte cap");
}

#[test]
fn author_identities_are_safe_and_deterministic() {
    assert_eq!(
        author_identity("alice@example.com"),
        ("alice@example.com".into(), "alice@example.com".into())
    );
    assert_eq!(
        author_identity("bob"),
        ("bob".into(), "bob@noreply.cluster.local".into())
    );
    assert_eq!(
        author_identity("Eve <evil@x.com>\nInjected: yes"),
        (
            "Eve evil@x.comInjected: yes".into(),
            "eve-evil-x.cominjected--yes@noreply.cluster.local".into()
        )
    );
    assert_eq!(author_identity(":::").1, "unknown@noreply.cluster.local");
}

fn templated(base: &str, subject: &str, body: &str) -> DestinationRef {
    let mut d = destination(base, false);
    d.commit_template = Some(Arc::new(
        template::CommitTemplate::parse(subject, body).unwrap(),
    ));
    d
}

fn upsert_of(d: &DestinationRef, seq: u64, ns: &str, name: &str, author: Option<&str>) -> Change {
    let mut change = upsert(
        d,
        seq,
        &format!("core/v1/configmaps/{ns}/{name}.yaml"),
        &CM.replace("name: a", &format!("name: {name}")),
        author,
    );
    if let Operation::Upsert { object, .. } = &mut change.operation {
        *object = ObjectId {
            group: String::new(),
            version: "v1".into(),
            resource: "configmaps".into(),
            namespace: ns.into(),
            name: name.into(),
        };
    }
    change
}

const TRAILERS: &str = "X-ConfigButler-ClusterUID: uid-a\nX-ConfigButler-ControllerNS: gitops\nX-ConfigButler-ControllerName: reverser\nX-ConfigButler-InstanceID: agent-0";

#[test]
fn a_template_writes_subject_and_body_and_keeps_the_trailers() {
    let d = templated(
        "clusters/prod",
        "{operation}({kind}): {namespace}/{name}",
        "Changed by {author} ({count} object(s): {summary})\n\n{objects}",
    );
    let t = tree(&[(
        "clusters/prod/.configbutler/owner.yaml",
        &marker_for("uid-a"),
    )]);
    let b = buffer(vec![upsert_of(
        &d,
        1,
        "shop",
        "settings",
        Some("alice@example.com"),
    )]);
    let plan = plan(b.entries(), &t, &context(500)).unwrap();
    assert_eq!(
        plan.commits[0].message,
        format!(
            "create(ConfigMap): shop/settings\n\nChanged by alice@example.com (1 object(s): 1 created)\n\n\
                 [CREATE] core/v1/configmaps/shop/settings\n\n{TRAILERS}\n"
        )
    );
}

#[test]
fn a_template_over_several_objects_names_what_they_share() {
    let d = templated(
        "c",
        "{operation} {count} {kind} in {namespace} ({name}) by {author}",
        "",
    );
    let t = tree(&[
        ("c/.configbutler/owner.yaml", &marker_for("uid-a")),
        ("c/core/v1/configmaps/shop/old.yaml", CM),
    ]);
    let b = buffer(vec![
        upsert_of(&d, 1, "shop", "a", None),
        upsert_of(&d, 2, "shop", "b", None),
    ]);
    let planned = plan(b.entries(), &t, &context(500)).unwrap();
    assert_eq!(
        planned.commits[0].message,
        format!("create 2 ConfigMap in shop (various) by Bot\n\n{TRAILERS}\n")
    );
    // A deletion's kind comes from the file it removes; mixed operations read "sync".
    let b = buffer(vec![
        upsert_of(&d, 1, "shop", "a", None),
        delete(&d, 2, "core/v1/configmaps/shop/old.yaml"),
    ]);
    let plan = plan(b.entries(), &t, &context(500)).unwrap();
    assert_eq!(
        plan.commits[0].message,
        format!("sync 2 ConfigMap in shop (various) by Bot\n\n{TRAILERS}\n")
    );
}

#[test]
fn a_template_names_orphans_by_their_path() {
    let d = templated(
        "c",
        "{operation} {group}/{version} {resource} {namespace}/{name}",
        "{objects}",
    );
    let t = tree(&[
        ("c/.configbutler/owner.yaml", &marker_for("uid-a")),
        ("c/apps/v1/deployments/shop/orphan.yaml", CM),
    ]);
    let b = buffer(vec![
        snapshot(&d, 1, "apps/v1/deployments", false, 7, true),
        snapshot(&d, 2, "apps/v1/deployments", false, 7, false),
    ]);
    let plan = plan(b.entries(), &t, &context(500)).unwrap();
    assert_eq!(
        plan.commits[0].message,
        format!(
            "delete apps/v1 deployments shop/orphan\n\n\
                 [DELETE] apps/v1/deployments/shop/orphan (orphan: no longer in the cluster)\n\n{TRAILERS}\n"
        )
    );
}

#[test]
fn destinations_with_different_templates_commit_separately() {
    let a = templated("a", "first {name}", "");
    let b_dest = templated("b", "second {name}", "");
    let plain = destination("p", false);
    let t = tree(&[
        ("a/.configbutler/owner.yaml", &marker_for("uid-a")),
        ("b/.configbutler/owner.yaml", &marker_for("uid-a")),
        ("p/.configbutler/owner.yaml", &marker_for("uid-a")),
    ]);
    let b = buffer(vec![
        upsert_of(&a, 1, "ns", "x", None),
        upsert_of(&b_dest, 2, "ns", "y", None),
        upsert_of(&plain, 3, "ns", "z", None),
    ]);
    let plan = plan(b.entries(), &t, &context(500)).unwrap();
    let subjects: Vec<&str> = plan
        .commits
        .iter()
        .map(|c| c.message.lines().next().unwrap())
        .collect();
    assert_eq!(
        subjects,
        ["first x", "second y", "[CREATE] core/v1/configmaps/ns/z"]
    );
    assert!(
        plan.commits
            .iter()
            .all(|c| c.message.ends_with(&format!("{TRAILERS}\n")))
    );
}

fn flush(d: &DestinationRef, seq: u64, author: Option<&str>, message: Option<&str>) -> Change {
    Change {
        destination: d.clone(),
        sequence: seq,
        operation: Operation::Flush(Arc::new(FlushOrder {
            message: message.map(str::to_owned),
            author: author.map(str::to_owned),
            request_name: "ns/req".into(),
            request_uid: "uid-req".into(),
        })),
    }
}

#[test]
fn a_flush_makes_its_destinations_earlier_changes_one_commit_by_the_requester() {
    let d = destination("c", false);
    let b = buffer(vec![
        upsert(&d, 1, "core/v1/configmaps/ns/a.yaml", CM, Some("bob")),
        upsert(&d, 2, "core/v1/configmaps/ns/b.yaml", CM2, Some("carol")),
        flush(&d, 3, Some("alice"), Some("Release\n\nBody")),
        upsert(&d, 4, "core/v1/configmaps/ns/c.yaml", CM, Some("bob")),
    ]);
    assert!(b.flush_requested());
    assert!(b.flush_due(
        &Limits {
            max_files: 100,
            max_bytes: 1 << 20,
            max_wait: Duration::from_secs(3600)
        },
        Instant::now()
    ));
    let plan = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
    assert_eq!(plan.commits.len(), 2, "{:?}", plan.commits);
    let requested = &plan.commits[0];
    assert_eq!(requested.flush, Some(2));
    assert_eq!(requested.author_name, "alice");
    assert!(
        requested
            .message
            .starts_with("Release\n\nBody\n\nX-ConfigButler-ClusterUID: "),
        "{}",
        requested.message
    );
    assert!(
        requested
            .message
            .ends_with("X-ConfigButler-CommitRequest: ns/req\n"),
        "{}",
        requested.message
    );
    let paths: Vec<&str> = requested.changes.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "c/.configbutler/owner.yaml",
            "c/.sourceignore",
            "c/core/v1/configmaps/ns/a.yaml",
            "c/core/v1/configmaps/ns/b.yaml"
        ]
    );
    // A change after the request is not part of it.
    assert_eq!(plan.commits[1].flush, None);
    assert_eq!(plan.commits[1].author_name, "bob");
    assert_eq!(plan.commits[1].changes.len(), 1);
    // Nothing pending before a request: no commit answers it.
    let only = buffer(vec![flush(&d, 5, Some("alice"), None)]);
    assert!(plan_of(&only, &tree(&[])).commits.is_empty());
}
