//! Where an object lives in Git, relative to its destination's base folder.
//!
//! ```text
//! {group or "core"}/{version}/{resource}/{namespace}/{name}.yaml   namespaced
//! {group or "core"}/{version}/{resource}/{name}.yaml               cluster-scoped
//! ```
//!
//! e.g. `apps/v1/deployments/shop/web.yaml`,
//! `rbac.authorization.k8s.io/v1/clusterroles/viewer.yaml`. The writer prefixes
//! the destination's `baseFolder`; encrypted objects end in `.sops.yaml`.
//!
//! # Portable names
//!
//! Every segment goes through [`reverser_common::paths::encode_segment`] (README
//! "File names"), the same function the writer uses for snapshot folders and
//! whose output its path check accepts: lower-case DNS names stay as they are;
//! `:`, `%`, `~`, upper case, non-ASCII and other non-portable bytes become
//! `%XX`; Windows device names (`con`, `nul`, ...) and a trailing dot or space
//! are encoded; segments longer than 245 bytes are cut and end in `~` and a
//! hash. So every file can be checked out on Linux, macOS and Windows, and no
//! two objects of a folder get names that differ only in case.

pub use reverser_common::paths::{DecodeError, decode_segment, encode_segment};

/// Errors from naming an object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("object name must not be empty")]
    EmptyName,
}

/// The folder that holds all objects of one type in one namespace (or all of a
/// cluster-scoped type), without a trailing slash. An empty namespace counts as
/// cluster-scoped, as the API server reports it that way.
pub fn scope_folder(group: &str, version: &str, resource: &str, namespace: Option<&str>) -> String {
    reverser_common::paths::scope_folder(group, version, resource, namespace.unwrap_or(""))
}

/// The file path of one object, relative to the destination base folder.
pub fn object_path(
    group: &str,
    version: &str,
    resource: &str,
    namespace: Option<&str>,
    name: &str,
) -> Result<String, PathError> {
    if name.is_empty() {
        return Err(PathError::EmptyName);
    }
    Ok(format!(
        "{}/{}.yaml",
        scope_folder(group, version, resource, namespace),
        encode_segment(name)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use reverser_common::paths::{in_scope, validate_object_path};

    const RBAC: &str = "rbac.authorization.k8s.io";

    #[test]
    fn maps_namespaced_objects_under_group_version_resource_namespace() {
        let cases = [
            (
                "apps",
                "v1",
                "deployments",
                Some("shop"),
                "web",
                "apps/v1/deployments/shop/web.yaml",
            ),
            (
                "",
                "v1",
                "services",
                Some("shop"),
                "api",
                "core/v1/services/shop/api.yaml",
            ),
            (
                "",
                "v1",
                "configmaps",
                Some("shop"),
                "kube-root-ca.crt",
                "core/v1/configmaps/shop/kube-root-ca.crt.yaml",
            ),
        ];
        for (group, version, resource, ns, name, want) in cases {
            assert_eq!(
                object_path(group, version, resource, ns, name).unwrap(),
                want
            );
        }
    }

    #[test]
    fn omits_namespace_segment_for_cluster_scoped_objects() {
        assert_eq!(
            object_path(RBAC, "v1", "clusterroles", None, "viewer").unwrap(),
            "rbac.authorization.k8s.io/v1/clusterroles/viewer.yaml"
        );
        assert_eq!(
            object_path("storage.k8s.io", "v1", "storageclasses", Some(""), "fast").unwrap(),
            "storage.k8s.io/v1/storageclasses/fast.yaml"
        );
    }

    #[test]
    fn escapes_colons_in_system_cluster_role_names() {
        assert_eq!(
            object_path(RBAC, "v1", "clusterroles", None, "system:controller:foo").unwrap(),
            "rbac.authorization.k8s.io/v1/clusterroles/system%3Acontroller%3Afoo.yaml"
        );
    }

    #[test]
    fn names_that_break_checkouts_get_portable_file_names() {
        let cm =
            |ns: &str, name: &str| object_path("", "v1", "configmaps", Some(ns), name).unwrap();
        let role = |name: &str| object_path(RBAC, "v1", "clusterroles", None, name).unwrap();
        // 253 characters: 258 bytes with `.yaml` would not fit ext4's 255.
        let long = "a".repeat(253);
        let path = cm("shop", &long);
        let file = path.rsplit('/').next().unwrap();
        assert!(file.len() <= 255, "{} bytes", file.len());
        assert!(
            file.starts_with(&"a".repeat(200)) && file.contains('~'),
            "{file}"
        );
        // Case-only twins stay apart on case-insensitive file systems.
        assert_eq!(
            role("Case-Demo"),
            "rbac.authorization.k8s.io/v1/clusterroles/%43ase-%44emo.yaml"
        );
        assert_eq!(
            role("case-demo"),
            "rbac.authorization.k8s.io/v1/clusterroles/case-demo.yaml"
        );
        // Windows device names, as names and as namespaces, with and without an extension.
        assert_eq!(cm("shop", "con"), "core/v1/configmaps/shop/%63on.yaml");
        assert_eq!(cm("shop", "nul"), "core/v1/configmaps/shop/%6Eul.yaml");
        assert_eq!(cm("shop", "aux.d"), "core/v1/configmaps/shop/%61ux.d.yaml");
        assert_eq!(cm("shop", "com1"), "core/v1/configmaps/shop/%63om1.yaml");
        assert_eq!(cm("shop", "lpt1"), "core/v1/configmaps/shop/%6Cpt1.yaml");
        assert_eq!(cm("shop", "prn"), "core/v1/configmaps/shop/%70rn.yaml");
        assert_eq!(cm("con", "a"), "core/v1/configmaps/%63on/a.yaml");
        assert_eq!(cm("nul", "a"), "core/v1/configmaps/%6Eul/a.yaml");
        assert_eq!(
            role("NUL"),
            "rbac.authorization.k8s.io/v1/clusterroles/%4E%55%4C.yaml"
        );
        // Trailing dots and spaces, which Windows drops.
        assert_eq!(
            role("a."),
            "rbac.authorization.k8s.io/v1/clusterroles/a%2E.yaml"
        );
        assert_eq!(
            role("a "),
            "rbac.authorization.k8s.io/v1/clusterroles/a%20.yaml"
        );
        for path in [path, role("Case-Demo"), cm("con", "aux.d"), role("a.")] {
            assert_eq!(validate_object_path(&path), Ok(()), "{path}");
        }
    }

    #[test]
    fn scope_folder_has_no_trailing_slash() {
        assert_eq!(
            scope_folder("apps", "v1", "deployments", Some("shop")),
            "apps/v1/deployments/shop"
        );
        assert_eq!(
            scope_folder("", "v1", "namespaces", None),
            "core/v1/namespaces"
        );
    }

    #[test]
    fn rejects_empty_names() {
        assert_eq!(
            object_path("", "v1", "configmaps", Some("a"), ""),
            Err(PathError::EmptyName)
        );
    }

    /// The agent's path of an object, as `ingest::watch` builds it (encrypted objects in `.sops.yaml`).
    fn agent_path(
        group: &str,
        version: &str,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
        sensitive: bool,
    ) -> String {
        let path = object_path(group, version, resource, namespace, name).unwrap();
        if sensitive {
            format!("{}.sops.yaml", path.strip_suffix(".yaml").unwrap())
        } else {
            path
        }
    }

    /// Names Kubernetes accepts: DNS-1123 subdomains (most types; a superset: dots and dashes anywhere) and path
    /// segment names (RBAC and a few more: anything but `/` and `%`; we go wider still).
    fn object_name() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?",
            "[a-zA-Z0-9:._@ ~-]{1,253}",
            "\\PC{1,300}",
            prop::sample::select(vec![
                "con", "CON", "nul", "aux", "prn", "com1", "lpt1", "con.d", "Con", "a.", "a ", ".",
                "..", "git~1", ".git",
            ])
            .prop_map(str::to_owned),
        ]
    }

    fn dns_label() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
            prop::sample::select(vec!["con", "nul", "aux", "com1", "lpt9", "prn"])
                .prop_map(str::to_owned),
        ]
    }

    fn group() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?"]
    }

    fn version() -> impl Strategy<Value = String> {
        prop_oneof!["v[1-9][0-9]{0,2}((alpha|beta)[1-9])?", dns_label()]
    }

    proptest! {
        #[test]
        fn every_agent_path_passes_the_writer_and_is_in_its_scope(
            group in group(),
            version in version(),
            resource in dns_label(),
            namespace in proptest::option::of(dns_label()),
            name in object_name(),
            sensitive in any::<bool>(),
        ) {
            let path = agent_path(&group, &version, &resource, namespace.as_deref(), &name, sensitive);
            prop_assert_eq!(validate_object_path(&path), Ok(()), "{}", path);
            for component in path.split('/') {
                prop_assert!(component.len() <= 255, "{}", component);
            }
            // The writer's folder for the snapshot scope (from raw names) holds the file, in both scope shapes.
            let ns = namespace.as_deref().unwrap_or("");
            let one = reverser_common::paths::scope_folder(&group, &version, &resource, ns);
            prop_assert!(in_scope(&one, !ns.is_empty(), &path), "{} not in {}", path, one);
            let all = reverser_common::paths::scope_folder(&group, &version, &resource, "");
            prop_assert!(in_scope(&all, false, &path), "{} not in {}", path, all);
            // Every uncut segment decodes to what it names.
            let file = path.rsplit('/').next().unwrap();
            let stem = file.strip_suffix(if sensitive { ".sops.yaml" } else { ".yaml" }).unwrap();
            if !stem.contains('~') {
                prop_assert_eq!(decode_segment(stem).unwrap(), name);
            }
        }

        #[test]
        fn names_in_one_folder_never_collide_even_ignoring_case(
            a in object_name(),
            b in object_name(),
            shared in "[a-zA-Z:~.]{0,3}",
            long_prefix in any::<bool>(),
            sensitive in any::<bool>(),
        ) {
            // Sharing a prefix (sometimes long enough to be cut) makes near-collisions likely.
            let prefix = if long_prefix { "x".repeat(240) } else { String::new() };
            let a = format!("{prefix}{shared}{a}");
            let b = format!("{prefix}{shared}{b}");
            prop_assume!(a != b);
            let pa = agent_path(RBAC, "v1", "clusterroles", None, &a, sensitive);
            let pb = agent_path(RBAC, "v1", "clusterroles", None, &b, sensitive);
            prop_assert!(!pa.eq_ignore_ascii_case(&pb), "{:?} and {:?} both give {}", a, b, pa);
            prop_assert!(pa.to_lowercase() != pb.to_lowercase());
        }

        #[test]
        fn case_twins_never_collide(name in "[a-zA-Z:-]{1,20}") {
            let upper = name.to_uppercase();
            let lower = name.to_lowercase();
            if upper != lower {
                let pu = object_path(RBAC, "v1", "clusterroles", None, &upper).unwrap();
                let pl = object_path(RBAC, "v1", "clusterroles", None, &lower).unwrap();
                prop_assert!(!pu.eq_ignore_ascii_case(&pl), "{} / {}", pu, pl);
            }
        }
    }

    /// Real git: a repository whose files are named by the scheme for the nastiest legal names can be cloned (and
    /// checked out) into a fresh directory.
    #[test]
    fn a_repository_named_by_the_scheme_clones_and_checks_out() {
        let dir = tempfile::tempdir().unwrap();
        let git =
            |cwd: &std::path::Path, args: &[&str], stdin: Option<&str>| -> (bool, String, String) {
                use std::io::Write;
                let mut child = std::process::Command::new("git")
                    .args(args)
                    .current_dir(cwd)
                    // The source's commit is built in a scratch index; clones use their own.
                    .envs(
                        cwd.ends_with("source.git")
                            .then(|| ("GIT_INDEX_FILE", dir.path().join("index"))),
                    )
                    .env("GIT_AUTHOR_NAME", "t")
                    .env("GIT_AUTHOR_EMAIL", "t@example.com")
                    .env("GIT_COMMITTER_NAME", "t")
                    .env("GIT_COMMITTER_EMAIL", "t@example.com")
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("git must be installed for this test");
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(stdin.unwrap_or("").as_bytes())
                    .unwrap();
                let out = child.wait_with_output().unwrap();
                (
                    out.status.success(),
                    String::from_utf8_lossy(&out.stdout).trim().to_owned(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                )
            };
        let source = dir.path().join("source.git");
        std::fs::create_dir(&source).unwrap();
        assert!(git(&source, &["init", "--bare", "-q", "-b", "main"], None).0);
        let long = "a".repeat(253);
        let long_rbac = format!("system:{}", "B".repeat(246));
        let objects: Vec<(Option<&str>, &str, bool)> = vec![
            (Some("shop"), long.as_str(), false),
            (Some("shop"), long.as_str(), true),
            (None, long_rbac.as_str(), false),
            (None, "Case-Demo", false),
            (None, "case-demo", false),
            (Some("con"), "con", false),
            (Some("nul"), "NUL", false),
            (Some("aux"), "aux.yaml", false),
            (Some("shop"), "com1", false),
            (Some("shop"), "lpt1", false),
            (Some("shop"), "trailing.", false),
            (Some("shop"), "trailing ", false),
            (Some("shop"), "..", false),
            (Some("shop"), "git~1", false),
            (Some("shop"), "caf\u{e9}", false),
            (Some("shop"), "system:controller:foo", false),
        ];
        let mut written = Vec::new();
        for (i, (namespace, name, sensitive)) in objects.iter().enumerate() {
            let resource = if namespace.is_some() {
                "configmaps"
            } else {
                "clusterroles"
            };
            let group = if namespace.is_some() { "" } else { RBAC };
            let path = agent_path(group, "v1", resource, *namespace, name, *sensitive);
            let content = format!("object {i}\n");
            let (ok, blob, err) = git(&source, &["hash-object", "-w", "--stdin"], Some(&content));
            assert!(ok, "{err}");
            let info = format!("100644,{blob},{path}");
            let (ok, _, err) = git(
                &source,
                &["update-index", "--add", "--cacheinfo", &info],
                None,
            );
            assert!(ok, "{path}: {err}");
            written.push((path, content));
        }
        let (ok, tree, err) = git(&source, &["write-tree"], None);
        assert!(ok, "{err}");
        let (ok, commit, err) = git(&source, &["commit-tree", &tree, "-m", "objects"], None);
        assert!(ok, "{err}");
        assert!(git(&source, &["update-ref", "refs/heads/main", &commit], None).0);

        let (ok, _, err) = git(
            dir.path(),
            &[
                "clone",
                "-q",
                "-b",
                "main",
                source.to_str().unwrap(),
                "checkout",
            ],
            None,
        );
        assert!(ok, "git clone failed: {err}");
        let checkout = dir.path().join("checkout");
        for (path, content) in &written {
            let on_disk = std::fs::read_to_string(checkout.join(path))
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(&on_disk, content, "{path}");
        }
        let (ok, status, err) = git(&checkout, &["status", "--porcelain"], None);
        assert!(ok && status.is_empty(), "{status}{err}");
    }
}
