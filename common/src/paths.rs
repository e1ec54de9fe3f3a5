//! Repository path rules shared by the agent (which produces paths) and the writer (which refuses bad ones).
//!
//! All paths are repository-relative, `/`-separated, and never leave the folder they are relative to. The ownership
//! marker `{baseFolder}/.configbutler/owner.yaml` and everything else under `.configbutler/` belong to the
//! writer, never to an object.
//!
//! # Portable names
//!
//! Every path the writer accepts can be checked out on Linux, macOS and Windows. Kubernetes names are not all
//! portable file names, so the agent names folders and files with [`encode_segment`] (README "File names"):
//!
//! - percent-encoding (`%XX`, upper-case hex) of `%`, `/`, `\`, `:`, `*`, `?`, `"`, `<`, `>`, `|`, `~`, control
//!   characters, upper-case ASCII letters (so no two names differ only in case on a case-insensitive file system)
//!   and every non-ASCII byte (so no Unicode case folding or normalisation can merge two names);
//! - the dot of a trailing `.sops` is encoded (`x.sops` would otherwise be stored as `x.sops.yaml`, the name of an
//!   encrypted file);
//! - a trailing `.` or space is encoded (Windows drops them), and so is the first character of a Windows device
//!   name (`con`, `nul`, `aux`, `prn`, `com0`..`com9`, `lpt0`..`lpt9`, `conin$`, `conout$`, `clock$`, also with an
//!   extension: `con.d`);
//! - an encoded segment longer than [`MAX_SEGMENT_BYTES`] is cut to its first [`HASHED_PREFIX_BYTES`] bytes
//!   (never inside an escape) followed by `~` and 32 hex digits of the SHA-256 of the raw segment, so a file name
//!   with its `.sops.yaml` suffix stays within [`MAX_COMPONENT_BYTES`].
//!
//! Lower-case DNS names (almost every Kubernetes name) are left as they are. The mapping is injective, also
//! ignoring ASCII case; [`decode_segment`] reverses it, except for cut names, whose full name is the object's
//! `metadata.name`. [`validate_object_path`] enforces the same rules on whatever a client sends.

use sha2::{Digest, Sha256};
use thiserror::Error;

/// Folder inside every base folder that holds the writer's own bookkeeping (the ownership marker).
pub const CONTROL_DIR: &str = ".configbutler";
/// Ownership marker file name inside [`CONTROL_DIR`].
pub const MARKER_FILE: &str = "owner.yaml";
/// Longest path we accept, in bytes (git itself allows more; filesystems and humans do not).
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest path component (folder or file name) in bytes: the limit of ext4, XFS, APFS and NTFS (in UTF-16 units).
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Longest segment [`encode_segment`] produces: room for the longest file suffix (`.sops.yaml`, 10 bytes).
pub const MAX_SEGMENT_BYTES: usize = MAX_COMPONENT_BYTES - 10;
/// A segment ending in this would make a plain object's file look encrypted (`{name}.sops.yaml`).
const SOPS_STEM_SUFFIX: &str = ".sops";
/// Hex digits of the SHA-256 that ends a cut segment (128 bits: no collision can be searched for).
const HASH_HEX_DIGITS: usize = 32;
/// Bytes of the encoded segment kept before `~` and the hash when a segment is cut.
pub const HASHED_PREFIX_BYTES: usize = MAX_SEGMENT_BYTES - 1 - HASH_HEX_DIGITS;
/// Names Windows reserves for devices, with or without an extension (compared ignoring case).
const WINDOWS_DEVICE_NAMES: &[&str] = &[
    "con", "prn", "aux", "nul", "com0", "com1", "com2", "com3", "com4", "com5", "com6", "com7",
    "com8", "com9", "lpt0", "lpt1", "lpt2", "lpt3", "lpt4", "lpt5", "lpt6", "lpt7", "lpt8", "lpt9",
    "conin$", "conout$", "clock$",
];

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
    #[error(
        "path {path:?} has a component of {bytes} bytes; at most {MAX_COMPONENT_BYTES} can be checked out"
    )]
    ComponentTooLong { path: String, bytes: usize },
    #[error(
        "path {0:?} contains a name Windows reserves for a device (con, nul, aux, prn, com1, lpt1, …)"
    )]
    WindowsDeviceName(String),
    #[error("path {0:?} has a component ending in a dot or space, which Windows drops")]
    TrailingDotOrSpace(String),
    #[error(
        "path {0:?} is not in the portable form: only lower-case ASCII letters, digits and printable ASCII \
         punctuation other than \\ : * ? \" < > |; anything else as %XX with upper-case hex"
    )]
    NotPortable(String),
}

/// Errors from [`decode_segment`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("invalid percent escape at byte {position} in {segment:?}")]
    InvalidEscape { segment: String, position: usize },
    #[error("decoded segment {0:?} is not valid UTF-8")]
    NotUtf8(String),
    #[error("segment {0:?} was cut to fit a file name; the full name is in the object")]
    Cut(String),
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

/// Checks what every file system needs of each component: a length it can store, no Windows device name, no
/// trailing dot or space, and no name that git itself refuses to check out (`git~1`, the NTFS short name of `.git`).
/// With `portable_form`, also the character rules of [`encode_segment`]'s output (no upper case, ASCII only,
/// well-formed `%XX`), which make case-only twins impossible.
fn check_components(path: &str, portable_form: bool) -> Result<(), PathError> {
    for component in path.split('/') {
        if component.len() > MAX_COMPONENT_BYTES {
            return Err(PathError::ComponentTooLong {
                path: path.chars().take(64).collect(),
                bytes: component.len(),
            });
        }
        if component.ends_with(['.', ' ']) {
            return Err(PathError::TrailingDotOrSpace(path.to_owned()));
        }
        if is_windows_device_name(component) {
            return Err(PathError::WindowsDeviceName(path.to_owned()));
        }
        if component.eq_ignore_ascii_case("git~1") {
            return Err(PathError::GitDir(path.to_owned()));
        }
        let bytes = component.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            let allowed = match b {
                b':' | b'*' | b'?' | b'"' | b'<' | b'>' | b'|' => false,
                b'%' if portable_form => {
                    let hex = |b: &u8| b.is_ascii_digit() || (b'A'..=b'F').contains(b);
                    let escape_ok = bytes.get(i + 1..i + 3).is_some_and(|h| h.iter().all(hex));
                    i += 2;
                    escape_ok
                }
                b'A'..=b'Z' | 0x80..=0xFF if portable_form => false,
                _ => true,
            };
            if !allowed {
                return Err(PathError::NotPortable(path.escape_debug().to_string()));
            }
            i += 1;
        }
    }
    Ok(())
}

/// Whether Windows takes `component` for a device: its part before the first dot, trailing spaces dropped, is a
/// device name in any case (`CON`, `nul.yaml`, `Aux .d.yaml`).
fn is_windows_device_name(component: &str) -> bool {
    let stem = component.split('.').next().unwrap_or(component);
    let stem = stem.trim_end_matches(' ');
    stem.len() <= 7
        && WINDOWS_DEVICE_NAMES
            .iter()
            .any(|name| stem.eq_ignore_ascii_case(name))
}

/// Validates a destination base folder: relative, normalised (no `.`/`..`/empty segments, no trailing `/`), and
/// checkable out everywhere (component length, no Windows device names, no `: * ? " < > |`, no trailing dot or
/// space). Unlike object paths it may use upper case and non-ASCII: a base folder is chosen by a person, once.
pub fn validate_base_folder(base_folder: &str) -> Result<(), PathError> {
    check_segments(base_folder)?;
    if base_folder.split('/').next() == Some(CONTROL_DIR) {
        return Err(PathError::ControlFolder(base_folder.to_owned()));
    }
    check_components(base_folder, false)
}

/// The rules every object path has always had to follow: relative, normalised, a `.yaml` file, not under
/// `.configbutler/`. Files that follow them are the writer's to sweep, even when named before the portable form.
fn check_object_path_structure(path: &str) -> Result<(), PathError> {
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

/// Validates an object file path relative to a base folder: like a base folder, plus it must end in `.yaml`, must
/// not point into `.configbutler/`, and must be in the portable form [`encode_segment`] produces (so it can be
/// checked out on every file system, and no two paths differ only in case).
pub fn validate_object_path(path: &str) -> Result<(), PathError> {
    check_object_path_structure(path)?;
    check_components(path, true)
}

fn must_encode(byte: u8) -> bool {
    matches!(
        byte,
        b'%' | b'/' | b'\\' | b':' | b'*' | b'?' | b'"' | b'<' | b'>' | b'|' | b'~' | b'A'..=b'Z'
            | 0x00..=0x1F | 0x7F..=0xFF
    )
}

fn push_escape(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0xF)]));
}

/// Encodes one raw path segment (a group, version, resource, namespace or object name) into its portable form;
/// see the module docs. Deterministic and injective; lower-case DNS names come out unchanged.
pub fn encode_segment(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    for (i, &byte) in bytes.iter().enumerate() {
        let trailing = i + 1 == bytes.len() && matches!(byte, b'.' | b' ');
        if must_encode(byte) || trailing {
            push_escape(&mut out, byte);
        } else {
            out.push(char::from(byte));
        }
    }
    // `x.sops` would become `x.sops.yaml`, which the generated `.sops.yaml` rules (and readers) take for an
    // encrypted file: encode that dot.
    if let Some(stem) = out.strip_suffix(SOPS_STEM_SUFFIX) {
        out = format!("{stem}%2Esops");
    }
    if is_windows_device_name(&out) {
        // The first byte of a device name is a letter, kept literally so far: encode it instead.
        let first = out.as_bytes()[0];
        let mut escaped = String::with_capacity(out.len() + 2);
        push_escape(&mut escaped, first);
        escaped.push_str(&out[1..]);
        out = escaped;
    }
    if out.len() > MAX_SEGMENT_BYTES {
        let mut cut = HASHED_PREFIX_BYTES;
        // Never split an escape: step back to its `%`.
        if let Some(back) = (1..=2).find(|&back| out.as_bytes()[cut - back] == b'%') {
            cut -= back;
        }
        out.truncate(cut);
        out.push('~');
        let digest = Sha256::digest(bytes);
        out.push_str(&hex::encode(&digest[..HASH_HEX_DIGITS / 2]));
    }
    out
}

/// Decodes a segment produced by [`encode_segment`]. A cut segment (`…~` and a hash) cannot be decoded: the full
/// name is the object's own; check it with `encode_segment(name) == segment`.
pub fn decode_segment(segment: &str) -> Result<String, DecodeError> {
    if segment.contains('~') {
        return Err(DecodeError::Cut(segment.to_owned()));
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| DecodeError::InvalidEscape {
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
    String::from_utf8(out).map_err(|_| DecodeError::NotUtf8(segment.to_owned()))
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
/// ASCII case does not count: `clusters/Prod` and `clusters/prod` are one folder on macOS and Windows.
pub fn folders_overlap(a: &str, b: &str) -> bool {
    fn contains(outer: &str, inner: &str) -> bool {
        inner.len() >= outer.len()
            && inner.as_bytes()[..outer.len()].eq_ignore_ascii_case(outer.as_bytes())
            && (inner.len() == outer.len() || inner.as_bytes()[outer.len()] == b'/')
    }
    contains(a, b) || contains(b, a)
}

/// Folder of one snapshot scope, relative to the base folder: `{group or core}/{version}/{resource}[/{namespace}]`,
/// each segment in its portable form ([`encode_segment`]), exactly as the agent names the objects' folders.
pub fn scope_folder(group: &str, version: &str, resource: &str, namespace: &str) -> String {
    let group = if group.is_empty() { "core" } else { group };
    let mut folder = format!(
        "{}/{}/{}",
        encode_segment(group),
        encode_segment(version),
        encode_segment(resource)
    );
    if !namespace.is_empty() {
        folder.push('/');
        folder.push_str(&encode_segment(namespace));
    }
    folder
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
    // Structure only: a file named before the portable form (`Case-Demo.yaml`) is still swept once the agent
    // sends its portable twin instead.
    if check_object_path_structure(rest).is_err() {
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

    #[test]
    fn refuses_object_paths_that_cannot_be_checked_out_everywhere() {
        let long = format!("core/v1/configmaps/ns/{}.yaml", "a".repeat(253));
        let long_folder = format!("core/v1/configmaps/{}/a.yaml", "a".repeat(256));
        let cases = [
            (long.as_str(), "component of 258 bytes"),
            (long_folder.as_str(), "component of 256 bytes"),
            ("core/v1/configmaps/ns/con.yaml", "reserves for a device"),
            ("core/v1/configmaps/ns/CON.yaml", "reserves for a device"),
            ("core/v1/configmaps/nul/a.yaml", "reserves for a device"),
            ("core/v1/configmaps/NUL/a.yaml", "reserves for a device"),
            ("core/v1/configmaps/ns/aux.d.yaml", "reserves for a device"),
            ("core/v1/configmaps/ns/Aux .d.yaml", "reserves for a device"),
            (
                "core/v1/configmaps/ns/prn.sops.yaml",
                "reserves for a device",
            ),
            ("core/v1/configmaps/ns/com1.yaml", "reserves for a device"),
            ("core/v1/configmaps/ns/lpt9.yaml", "reserves for a device"),
            ("core/v1/configmaps/ns/conin$.yaml", "reserves for a device"),
            ("core/v1/configmaps/ns./a.yaml", "dot or space"),
            ("core/v1/configmaps/ns /a.yaml", "dot or space"),
            ("core/v1/configmaps/git~1/a.yaml", ".git"),
            ("core/v1/configmaps/GIT~1/a.yaml", ".git"),
            (
                "rbac.authorization.k8s.io/v1/clusterroles/Case-Demo.yaml",
                "portable",
            ),
            (
                "rbac.authorization.k8s.io/v1/clusterroles/system:auth.yaml",
                "portable",
            ),
            ("core/v1/configmaps/ns/a*b.yaml", "portable"),
            ("core/v1/configmaps/ns/a<b>.yaml", "portable"),
            ("core/v1/configmaps/ns/a|b.yaml", "portable"),
            ("core/v1/configmaps/ns/a?.yaml", "portable"),
            ("core/v1/configmaps/ns/a\"b.yaml", "portable"),
            ("core/v1/configmaps/ns/caf\u{e9}.yaml", "portable"),
            ("core/v1/configmaps/ns/a%3a.yaml", "portable"),
            ("core/v1/configmaps/ns/a%zz.yaml", "portable"),
            ("core/v1/configmaps/ns/a%2.yaml", "portable"),
            ("core/v1/configmaps/ns/a%.yaml", "portable"),
        ];
        for (path, expected) in cases {
            let error = validate_object_path(path).expect_err(path).to_string();
            assert!(error.contains(expected), "{path:?}: {error}");
        }
        for fine in [
            "rbac.authorization.k8s.io/v1/clusterroles/%43ase-%44emo.yaml",
            "core/v1/configmaps/ns/%63on.yaml",
            "core/v1/configmaps/%6Eul/a.yaml",
            "core/v1/configmaps/ns/console.yaml",
            "core/v1/configmaps/ns/com10.yaml",
            "core/v1/configmaps/ns/a.b.yaml",
            "core/v1/configmaps/ns/a_b+c@d=e,f;g!h#i$j&k'l(m)n[o]p{q}r^s`t~u.yaml",
            "core/v1/configmaps/ns/with space.yaml",
            &format!("core/v1/configmaps/ns/{}.sops.yaml", "a".repeat(245)),
        ] {
            assert_eq!(validate_object_path(fine), Ok(()), "{fine}");
        }
    }

    #[test]
    fn base_folders_must_be_portable_but_may_use_upper_case() {
        assert_eq!(validate_base_folder("clusters/Prod"), Ok(()));
        assert_eq!(validate_base_folder("clusters/\u{e9}t\u{e9}"), Ok(()));
        for bad in [
            "clusters/con",
            "clusters/LPT1.d",
            "clusters/a:b",
            "clusters/a.",
            "clusters/a ",
            "git~1/x",
        ] {
            assert!(validate_base_folder(bad).is_err(), "{bad}");
        }
        assert!(validate_base_folder(&"a".repeat(256)).is_err());
        assert_eq!(validate_base_folder(&"a".repeat(255)), Ok(()));
    }

    #[test]
    fn overlap_ignores_ascii_case() {
        assert!(folders_overlap("clusters/Prod", "clusters/prod"));
        assert!(folders_overlap("Clusters", "clusters/prod/a"));
        assert!(!folders_overlap("clusters/Prod", "clusters/production"));
    }

    #[test]
    fn encodes_named_cases() {
        let long = "a".repeat(253);
        let cases = [
            ("web", "web"),
            ("kube-root-ca.crt", "kube-root-ca.crt"),
            ("system:controller:foo", "system%3Acontroller%3Afoo"),
            (
                "kubeadm:kubelet-config-1.18",
                "kubeadm%3Akubelet-config-1.18",
            ),
            ("Case-Demo", "%43ase-%44emo"),
            ("case-demo", "case-demo"),
            ("con", "%63on"),
            ("CON", "%43%4F%4E"),
            ("nul", "%6Eul"),
            ("aux", "%61ux"),
            ("prn", "%70rn"),
            ("com1", "%63om1"),
            ("lpt9", "%6Cpt9"),
            ("con.d", "%63on.d"),
            ("x.sops", "x%2Esops"),
            ("con.sops", "con%2Esops"),
            (".sops", "%2Esops"),
            ("x.sops.d", "x.sops.d"),
            ("x.SOPS", "x.%53%4F%50%53"),
            ("con .d", "%63on .d"),
            ("console", "console"),
            ("a.", "a%2E"),
            ("a ", "a%20"),
            ("a b", "a b"),
            (".", "%2E"),
            ("..", ".%2E"),
            (".hidden", ".hidden"),
            ("a%b", "a%25b"),
            ("a/b", "a%2Fb"),
            ("a\\b", "a%5Cb"),
            ("*?\"<>|~", "%2A%3F%22%3C%3E%7C%7E"),
            ("tab\there", "tab%09here"),
            ("del\u{7f}", "del%7F"),
            ("\u{e9}:\u{2713}", "%C3%A9%3A%E2%9C%93"),
        ];
        for (raw, encoded) in cases {
            assert_eq!(encode_segment(raw), encoded, "encode({raw:?})");
            assert_eq!(decode_segment(encoded).unwrap(), raw, "decode({encoded:?})");
        }
        // Long names: cut, then `~` and 32 hex digits of the SHA-256 of the name.
        let encoded = encode_segment(&long);
        assert_eq!(encoded.len(), MAX_SEGMENT_BYTES);
        let digest = hex::encode(Sha256::digest(long.as_bytes()));
        assert_eq!(
            encoded,
            format!("{}~{}", "a".repeat(HASHED_PREFIX_BYTES), &digest[..32])
        );
        assert!(
            encoded.ends_with("~32859a3ab65ac52932e16fad60606536"),
            "the README's example"
        );
        assert!(matches!(decode_segment(&encoded), Err(DecodeError::Cut(_))));
        assert_eq!(encode_segment(&"a".repeat(245)), "a".repeat(245));
        assert!(encode_segment(&"a".repeat(246)).contains('~'));
        // A cut never splits an escape.
        for pad in 0..3 {
            let name = format!(
                "{}{}",
                "a".repeat(HASHED_PREFIX_BYTES - 3 + pad),
                ":".repeat(40)
            );
            let encoded = encode_segment(&name);
            let prefix = encoded.split('~').next().unwrap();
            assert!(decode_segment(prefix).is_ok(), "{prefix}");
            assert!(prefix.len() <= HASHED_PREFIX_BYTES);
        }
    }

    #[test]
    fn scope_folders_use_the_portable_form() {
        assert_eq!(
            scope_folder("", "v1", "configmaps", "con"),
            "core/v1/configmaps/%63on"
        );
        assert_eq!(
            scope_folder("example.com", "v1", "things", ""),
            "example.com/v1/things"
        );
    }

    #[test]
    fn sweeps_still_see_files_named_before_the_portable_form() {
        let folder = scope_folder("rbac.authorization.k8s.io", "v1", "clusterroles", "");
        assert!(in_scope(
            &folder,
            false,
            "rbac.authorization.k8s.io/v1/clusterroles/Case-Demo.yaml"
        ));
    }

    #[test]
    fn rejects_malformed_escapes() {
        for bad in ["%", "%4", "%zz", "a%g0"] {
            assert!(
                matches!(decode_segment(bad), Err(DecodeError::InvalidEscape { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            decode_segment("%FF"),
            Err(DecodeError::NotUtf8(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn encoding_round_trips_and_passes_the_writer(raw in "\\PC{1,300}|[a-zA-Z0-9.:%~ -]{1,300}") {
            let encoded = encode_segment(&raw);
            proptest::prop_assert!(encoded.len() <= MAX_SEGMENT_BYTES);
            if encoded.contains('~') {
                proptest::prop_assert!(raw.len() > HASHED_PREFIX_BYTES / 3);
            } else {
                proptest::prop_assert_eq!(decode_segment(&encoded).unwrap(), raw.clone());
            }
            for file in [format!("x/{encoded}.yaml"), format!("x/{encoded}.sops.yaml"), format!("{encoded}/a.yaml")] {
                proptest::prop_assert_eq!(validate_object_path(&file), Ok(()), "{:?} from {:?}", file, raw);
            }
        }

        #[test]
        fn encoding_is_injective_ignoring_case(a in "[a-zA-Z.:~ -]{1,6}", b in "[a-zA-Z.:~ -]{1,6}") {
            if a != b {
                let (x, y) = (encode_segment(&a), encode_segment(&b));
                proptest::prop_assert!(!x.eq_ignore_ascii_case(&y), "{:?} and {:?} both give {:?}", a, b, x);
            }
        }
    }
}
