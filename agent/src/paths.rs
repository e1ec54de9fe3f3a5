//! Where an object lives in Git, relative to its destination's base folder.
//!
//! ```text
//! {group or "core"}/{version}/{resource}/{namespace}/{name}.yaml   namespaced
//! {group or "core"}/{version}/{resource}/{name}.yaml               cluster-scoped
//! ```
//!
//! e.g. `apps/v1/deployments/shop/web.yaml`,
//! `rbac.authorization.k8s.io/v1/clusterroles/viewer.yaml`. The writer prefixes
//! the destination's `baseFolder`.
//!
//! # Escaping
//!
//! Kubernetes allows names that are not portable file names: RBAC objects such
//! as `system:controller:foo` contain `:`, which Windows and macOS tooling
//! reject or mangle. Every path segment is therefore escaped with
//! percent-encoding of exactly these bytes:
//!
//! - `%` itself (as `%25`), so that decoding is unambiguous,
//! - `/` and `\` (path separators),
//! - `:`, `*`, `?`, `"`, `<`, `>`, `|` (reserved on Windows),
//! - ASCII control characters `0x00..=0x1F` and `0x7F`,
//! - a leading `.` when the whole segment is dots (`.`, `..`, ...), so a
//!   segment can never mean "this" or "parent" directory.
//!
//! Escapes use upper-case hex (`%3A`). [`unescape`] reverses [`escape`]
//! exactly; all other bytes, including non-ASCII UTF-8, are kept as they are.
//! Valid Kubernetes names never need more than the `:` escape, so typical paths
//! stay readable. Case-insensitive filesystems can still collide on names that
//! differ only in case; that is not addressed here.

/// Errors from decoding an escaped path segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("invalid percent escape at byte {position} in {segment:?}")]
    InvalidEscape { segment: String, position: usize },
    #[error("decoded segment {0:?} is not valid UTF-8")]
    NotUtf8(String),
    #[error("object name must not be empty")]
    EmptyName,
}

/// The folder that holds all objects of one type in one namespace (or all of a
/// cluster-scoped type), without a trailing slash. An empty namespace counts as
/// cluster-scoped, as the API server reports it that way.
pub fn scope_folder(group: &str, version: &str, resource: &str, namespace: Option<&str>) -> String {
    let group = if group.is_empty() { "core" } else { group };
    let mut folder = format!("{}/{}/{}", escape(group), escape(version), escape(resource));
    if let Some(ns) = namespace.filter(|ns| !ns.is_empty()) {
        folder.push('/');
        folder.push_str(&escape(ns));
    }
    folder
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
        escape(name)
    ))
}

fn needs_escape(byte: u8) -> bool {
    matches!(
        byte,
        b'%' | b'/' | b'\\' | b':' | b'*' | b'?' | b'"' | b'<' | b'>' | b'|' | 0x00..=0x1F | 0x7F
    )
}

/// Escapes one path segment (see the module docs for the exact byte set).
pub fn escape(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let all_dots = !bytes.is_empty() && bytes.iter().all(|&b| b == b'.');
    let mut out = String::with_capacity(segment.len());
    for (i, ch) in segment.char_indices() {
        let byte = bytes[i];
        // Multi-byte characters never contain bytes from the escape set.
        if ch.is_ascii() && (needs_escape(byte) || (all_dots && i == 0)) {
            out.push_str(&format!("%{byte:02X}"));
        } else {
            out.push(ch);
        }
    }
    out
}

/// Decodes a segment produced by [`escape`]. Rejects a `%` that is not followed
/// by two hex digits.
pub fn unescape(segment: &str) -> Result<String, PathError> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| PathError::InvalidEscape {
                    segment: segment.to_owned(),
                    position: i,
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PathError::NotUtf8(segment.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
                "system-config",
                "core/v1/configmaps/shop/system-config.yaml",
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
            object_path(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterroles",
                None,
                "viewer"
            )
            .unwrap(),
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
            object_path(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterroles",
                None,
                "system:controller:foo"
            )
            .unwrap(),
            "rbac.authorization.k8s.io/v1/clusterroles/system%3Acontroller%3Afoo.yaml"
        );
    }

    #[test]
    fn escapes_reserved_bytes_and_percent() {
        let cases = [
            ("a%b", "a%25b"),
            ("a/b", "a%2Fb"),
            ("a\\b", "a%5Cb"),
            ("*?\"<>|", "%2A%3F%22%3C%3E%7C"),
            ("tab\there", "tab%09here"),
            ("del\u{7f}", "del%7F"),
            ("é:✓", "é%3A✓"),
            (".", "%2E"),
            ("..", "%2E."),
            ("...", "%2E.."),
            (".hidden", ".hidden"),
            ("a..b", "a..b"),
            (
                "kubeadm:kubelet-config-1.18",
                "kubeadm%3Akubelet-config-1.18",
            ),
        ];
        for (raw, escaped) in cases {
            assert_eq!(escape(raw), escaped, "escape({raw:?})");
            assert_eq!(unescape(escaped).unwrap(), raw, "unescape({escaped:?})");
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

    #[test]
    fn rejects_malformed_escapes() {
        for bad in ["%", "%4", "%zz", "a%g0"] {
            assert!(
                matches!(unescape(bad), Err(PathError::InvalidEscape { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(unescape("%FF"), Err(PathError::NotUtf8(_))));
    }

    proptest! {
        #[test]
        fn escape_round_trips_and_yields_portable_segments(s in any::<String>()) {
            let escaped = escape(&s);
            prop_assert_eq!(unescape(&escaped).unwrap(), s);
            prop_assert!(!escaped.bytes().any(|b| matches!(
                b,
                b'/' | b'\\' | b':' | b'*' | b'?' | b'"' | b'<' | b'>' | b'|' | 0x00..=0x1F | 0x7F
            )));
            prop_assert!(escaped.is_empty() || !escaped.bytes().all(|b| b == b'.'));
        }

        #[test]
        fn escape_round_trips_dot_and_reserved_heavy_names(s in "[.%:/\\\\a]{0,8}") {
            let escaped = escape(&s);
            prop_assert_eq!(unescape(&escaped).unwrap(), s);
            prop_assert!(!escaped.contains('/'));
            prop_assert!(escaped.is_empty() || !escaped.bytes().all(|b| b == b'.'));
        }

        #[test]
        fn object_paths_have_only_portable_segments(
            ns in proptest::option::of("[a-z0-9.:%-]{0,10}"),
            name in "\\PC{1,20}",
        ) {
            let path = object_path("g", "v1", "things", ns.as_deref(), &name).unwrap();
            let segments: Vec<&str> = path.split('/').collect();
            let expected_len = if ns.as_deref().is_some_and(|n| !n.is_empty()) { 5 } else { 4 };
            prop_assert_eq!(segments.len(), expected_len);
            for seg in &segments {
                prop_assert!(!seg.is_empty());
                prop_assert!(!seg.bytes().all(|b| b == b'.'));
            }
            let file = segments.last().unwrap().strip_suffix(".yaml").unwrap();
            prop_assert_eq!(unescape(file).unwrap(), name);
        }
    }
}
