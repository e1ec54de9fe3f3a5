//! Repository path rules shared by the agent (which produces paths) and the writer (which refuses bad ones).
//!
//! All paths are repository-relative, `/`-separated, and never leave the folder they are relative to. The ownership
//! marker `{baseFolder}/.configbutler/owner.yaml` and everything else under `.configbutler/` belong to the
//! writer, never to an object.

use thiserror::Error;

/// Folder inside every base folder that holds the writer's own bookkeeping (the ownership marker).
pub const CONTROL_DIR: &str = ".configbutler";
/// Ownership marker file name inside [`CONTROL_DIR`].
pub const MARKER_FILE: &str = "owner.yaml";
/// Longest path we accept, in bytes (git itself allows more; filesystems and humans do not).
pub const MAX_PATH_BYTES: usize = 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path {0:?} is absolute; it must be relative")]
    Absolute(String),
    #[error("path {0:?} contains a '..' segment")]
    ParentSegment(String),
    #[error("path {0:?} contains an empty or '.' segment")]
    EmptySegment(String),
    #[error("path {0:?} contains a backslash, NUL or control character")]
    ForbiddenCharacter(String),
    #[error("path {0:?} does not end in .yaml")]
    NotYaml(String),
    #[error("path {0:?} points into the writer's {CONTROL_DIR}/ folder")]
    ControlFolder(String),
    #[error("path {0:?} is longer than {MAX_PATH_BYTES} bytes")]
    TooLong(String),
    #[error("path {0:?} contains a .git segment")]
    GitDir(String),
}

/// Checks the segments shared by base folders and file paths.
fn check_segments(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong(path.chars().take(64).collect()));
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute(path.to_owned()));
    }
    if path.chars().any(|c| c == '\\' || c.is_control()) {
        return Err(PathError::ForbiddenCharacter(
            path.escape_debug().to_string(),
        ));
    }
    for segment in path.split('/') {
        match segment {
            ".." => return Err(PathError::ParentSegment(path.to_owned())),
            "" | "." => return Err(PathError::EmptySegment(path.to_owned())),
            s if s.eq_ignore_ascii_case(".git") => return Err(PathError::GitDir(path.to_owned())),
            _ => {}
        }
    }
    Ok(())
}

/// Validates a destination base folder: relative, normalised (no `.`/`..`/empty segments, no trailing `/`).
pub fn validate_base_folder(base_folder: &str) -> Result<(), PathError> {
    check_segments(base_folder)?;
    if base_folder.split('/').next() == Some(CONTROL_DIR) {
        return Err(PathError::ControlFolder(base_folder.to_owned()));
    }
    Ok(())
}

/// Validates an object file path relative to a base folder: like a base folder, plus it must end in `.yaml`
/// and must not point into `.configbutler/`.
pub fn validate_object_path(path: &str) -> Result<(), PathError> {
    check_segments(path)?;
    if path.split('/').any(|s| s == CONTROL_DIR) {
        return Err(PathError::ControlFolder(path.to_owned()));
    }
    let file_name = path.rsplit('/').next().unwrap_or(path);
    if !file_name.ends_with(".yaml") || file_name == ".yaml" {
        return Err(PathError::NotYaml(path.to_owned()));
    }
    Ok(())
}

/// `{base}/{relative}`.
pub fn join(base_folder: &str, relative: &str) -> String {
    format!("{base_folder}/{relative}")
}

/// The marker path of a base folder.
pub fn marker_path(base_folder: &str) -> String {
    format!("{base_folder}/{CONTROL_DIR}/{MARKER_FILE}")
}

/// Whether two base folders overlap: equal, or one contains the other (segment-wise, so `a/b` and `a/bc` do not).
pub fn folders_overlap(a: &str, b: &str) -> bool {
    fn contains(outer: &str, inner: &str) -> bool {
        inner == outer
            || (inner.starts_with(outer) && inner.as_bytes().get(outer.len()) == Some(&b'/'))
    }
    contains(a, b) || contains(b, a)
}

/// Folder of one snapshot scope, relative to the base folder: `{group or core}/{version}/{resource}[/{namespace}]`.
pub fn scope_folder(group: &str, version: &str, resource: &str, namespace: &str) -> String {
    let group = if group.is_empty() { "core" } else { group };
    if namespace.is_empty() {
        format!("{group}/{version}/{resource}")
    } else {
        format!("{group}/{version}/{resource}/{namespace}")
    }
}

/// Whether `relative` (a path relative to the base folder) is a managed object file of a snapshot scope whose
/// folder is `folder`. Object files sit at `{folder}/{name}.yaml` (cluster-scoped or one namespace) or
/// `{folder}/{namespace}/{name}.yaml` (all namespaces); deeper files and non-`.yaml` files are never ours.
pub fn in_scope(folder: &str, namespace_given: bool, relative: &str) -> bool {
    let Some(rest) = relative
        .strip_prefix(folder)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return false;
    };
    if validate_object_path(rest).is_err() {
        return false;
    }
    let depth = rest.split('/').count();
    if namespace_given {
        depth == 1
    } else {
        depth <= 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_object_paths() {
        assert_eq!(
            validate_object_path("apps/v1/deployments/shop/web.yaml"),
            Ok(())
        );
        assert_eq!(validate_object_path("core/v1/namespaces/shop.yaml"), Ok(()));
        assert_eq!(
            validate_object_path("rbac.authorization.k8s.io/v1/clusterroles/system%3Aauth.yaml"),
            Ok(())
        );
    }

    #[test]
    fn rejects_escaping_and_odd_object_paths() {
        assert!(matches!(
            validate_object_path("/etc/passwd.yaml"),
            Err(PathError::Absolute(_))
        ));
        assert!(matches!(
            validate_object_path("../x.yaml"),
            Err(PathError::ParentSegment(_))
        ));
        assert!(matches!(
            validate_object_path("a/../../x.yaml"),
            Err(PathError::ParentSegment(_))
        ));
        assert!(matches!(
            validate_object_path("a//x.yaml"),
            Err(PathError::EmptySegment(_))
        ));
        assert!(matches!(
            validate_object_path("a/./x.yaml"),
            Err(PathError::EmptySegment(_))
        ));
        assert!(matches!(
            validate_object_path("a/x.json"),
            Err(PathError::NotYaml(_))
        ));
        assert!(matches!(
            validate_object_path("a/.yaml"),
            Err(PathError::NotYaml(_))
        ));
        assert!(matches!(
            validate_object_path(".configbutler/owner.yaml"),
            Err(PathError::ControlFolder(_))
        ));
        assert!(matches!(
            validate_object_path("a/.configbutler/x.yaml"),
            Err(PathError::ControlFolder(_))
        ));
        assert!(matches!(
            validate_object_path(".git/config.yaml"),
            Err(PathError::GitDir(_))
        ));
        assert!(matches!(
            validate_object_path("a\\b.yaml"),
            Err(PathError::ForbiddenCharacter(_))
        ));
        assert!(matches!(
            validate_object_path("a\nb.yaml"),
            Err(PathError::ForbiddenCharacter(_))
        ));
        assert!(matches!(validate_object_path(""), Err(PathError::Empty)));
        assert!(matches!(
            validate_object_path(&"a/".repeat(600)),
            Err(PathError::TooLong(_))
        ));
    }

    #[test]
    fn rejects_bad_base_folders() {
        assert_eq!(validate_base_folder("clusters/prod"), Ok(()));
        assert!(validate_base_folder("clusters/prod/").is_err());
        assert!(validate_base_folder("/clusters").is_err());
        assert!(validate_base_folder("clusters/../x").is_err());
        assert!(validate_base_folder(".configbutler").is_err());
        assert!(validate_base_folder("").is_err());
    }

    #[test]
    fn overlap_is_segment_wise() {
        assert!(folders_overlap("clusters/prod", "clusters/prod"));
        assert!(folders_overlap("clusters", "clusters/prod"));
        assert!(folders_overlap("clusters/prod/a", "clusters/prod"));
        assert!(!folders_overlap("clusters/prod", "clusters/production"));
        assert!(!folders_overlap("clusters/prod", "clusters/staging"));
    }

    #[test]
    fn scope_membership_matches_layout() {
        let all_ns = scope_folder("apps", "v1", "deployments", "");
        assert_eq!(all_ns, "apps/v1/deployments");
        assert!(in_scope(
            &all_ns,
            false,
            "apps/v1/deployments/shop/web.yaml"
        ));
        assert!(!in_scope(
            &all_ns,
            false,
            "apps/v1/deployments/shop/deep/web.yaml"
        ));
        assert!(!in_scope(
            &all_ns,
            false,
            "apps/v1/deploymentsx/shop/web.yaml"
        ));
        assert!(!in_scope(
            &all_ns,
            false,
            "apps/v1/deployments/shop/README.md"
        ));
        let one_ns = scope_folder("", "v1", "configmaps", "shop");
        assert_eq!(one_ns, "core/v1/configmaps/shop");
        assert!(in_scope(&one_ns, true, "core/v1/configmaps/shop/a.yaml"));
        assert!(!in_scope(&one_ns, true, "core/v1/configmaps/other/a.yaml"));
    }
}
