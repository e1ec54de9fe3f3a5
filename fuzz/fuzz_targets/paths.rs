//! Path rules. Differential: every path the agent names an object with (any name, Kubernetes-valid group,
//! version, resource and namespace, plain or `.sops.yaml`) passes the writer's object path check and lies in the
//! snapshot scope the writer computes for that type and namespace; `encode_segment` is injective ignoring ASCII
//! case and `decode_segment` reverses it. And whatever `validate_object_path` / `validate_base_folder` accept
//! follows the documented rules, checked here independently.
#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use reverser_agent::paths as agent_paths;
use reverser_common::paths;
use reverser_proto::v1 as pb;
use reverser_writer::grpc::convert;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = agent_names(&mut u);
    let _ = encoding(&mut u);
    let _ = validators(&mut u);
});

const LABEL_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-";

/// A DNS-1123 label (namespaces, versions, resource plurals).
fn label(u: &mut Unstructured<'_>) -> Result<String> {
    let len = u.int_in_range(1..=63)?;
    let mut s = String::with_capacity(len);
    for i in 0..len {
        let c = *u.choose(LABEL_CHARS)?;
        let edge = i == 0 || i + 1 == len;
        s.push(if edge && c == b'-' {
            'a'
        } else {
            char::from(c)
        });
    }
    Ok(s)
}

/// An API group: empty (core) or a DNS-1123 subdomain.
fn group(u: &mut Unstructured<'_>) -> Result<String> {
    let labels = u.int_in_range(0..=5)?;
    let mut parts = Vec::new();
    for _ in 0..labels {
        parts.push(label(u)?);
    }
    let mut group = parts.join(".");
    group.truncate(253);
    Ok(group.trim_end_matches(['.', '-']).to_owned())
}

fn agent_names(u: &mut Unstructured<'_>) -> Result<()> {
    let (group, version, resource) = (group(u)?, label(u)?, label(u)?);
    let namespace = if u.arbitrary()? {
        Some(label(u)?)
    } else {
        None
    };
    let name: String = u.arbitrary()?;
    if name.is_empty() || name.len() > 253 {
        assert!(
            name.is_empty()
                == agent_paths::object_path(
                    &group,
                    &version,
                    &resource,
                    namespace.as_deref(),
                    &name
                )
                .is_err()
        );
        return Ok(());
    }
    let path = agent_paths::object_path(&group, &version, &resource, namespace.as_deref(), &name)
        .expect("a non-empty name always has a path");
    // The `.sops.yaml` twin the agent sends for encrypted objects.
    let sops = format!(
        "{}{}",
        path.strip_suffix(".yaml").expect(".yaml"),
        reverser_common::sops::FILE_SUFFIX
    );
    for p in [&path, &sops] {
        if let Err(error) = paths::validate_object_path(p) {
            panic!(
                "the writer refuses the agent's path {p:?} for {group:?} {version:?} {resource:?} {namespace:?} {name:?}: {error}"
            );
        }
        // In the scope the writer derives from the agent's SnapshotBegin for this type (and namespace), so a
        // complete snapshot can sweep it, and in the all-namespaces scope of its type.
        let ns = namespace.clone().unwrap_or_default();
        let scope = convert::validate_scope(Some(&pb::SnapshotScope {
            group: group.clone(),
            version: version.clone(),
            resource: resource.clone(),
            namespace: ns.clone(),
        }))
        .unwrap_or_else(|e| panic!("the writer refuses the agent's scope: {e:?}"));
        assert_eq!(
            scope.folder,
            agent_paths::scope_folder(&group, &version, &resource, namespace.as_deref())
        );
        assert!(
            paths::in_scope(&scope.folder, !ns.is_empty(), p),
            "{p:?} not in scope {:?}",
            scope.folder
        );
        let all = paths::scope_folder(&group, &version, &resource, "");
        assert!(
            paths::in_scope(&all, false, p),
            "{p:?} not in all-namespaces scope {all:?}"
        );
        // Never in the scope of another type.
        let other = paths::scope_folder(&group, &version, &format!("{resource}x"), "");
        assert!(!paths::in_scope(&other, false, p));
    }
    Ok(())
}

fn encoding(u: &mut Unstructured<'_>) -> Result<()> {
    let a: String = u.arbitrary()?;
    let b: String = u.arbitrary()?;
    let (ea, eb) = (paths::encode_segment(&a), paths::encode_segment(&b));
    assert!(ea.len() <= paths::MAX_SEGMENT_BYTES);
    if a != b {
        assert_ne!(
            ea.to_ascii_lowercase(),
            eb.to_ascii_lowercase(),
            "{a:?} and {b:?} encode alike"
        );
    }
    if !a.is_empty() {
        if let Err(e) = paths::validate_object_path(&format!("{ea}.yaml")) {
            panic!("encoded segment {ea:?} of {a:?} is not a valid file name: {e}");
        }
        if ea != ".configbutler" && ea != ".git" {
            assert!(paths::validate_base_folder(&ea).is_ok(), "{ea:?}");
        }
    }
    match paths::decode_segment(&ea) {
        Ok(decoded) => assert_eq!(decoded, a),
        Err(paths::DecodeError::Cut(_)) => assert!(ea.len() > paths::HASHED_PREFIX_BYTES),
        Err(e) => panic!("cannot decode {ea:?}: {e}"),
    }
    // Decoding arbitrary text never panics.
    let _ = paths::decode_segment(&a);
    Ok(())
}

fn validators(u: &mut Unstructured<'_>) -> Result<()> {
    let path: String = if u.arbitrary()? {
        // Mostly path-like input.
        let n = u.int_in_range(1..=5)?;
        let mut parts = Vec::new();
        for _ in 0..n {
            parts.push(reverser_fuzz::value::pick_string(u)?);
        }
        let mut p = parts.join("/");
        if u.arbitrary()? {
            p.push_str(".yaml");
        }
        p
    } else {
        u.arbitrary()?
    };
    if paths::validate_object_path(&path).is_ok() {
        check_common(&path);
        assert!(
            path.ends_with(".yaml") && path.rsplit('/').next() != Some(".yaml"),
            "{path:?}"
        );
        for component in path.split('/') {
            assert_ne!(component, paths::CONTROL_DIR, "{path:?}");
            let bytes = component.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                let b = bytes[i];
                if b == b'%' {
                    // An escape: two upper-case hex digits.
                    let hex = |c: Option<&u8>| {
                        c.is_some_and(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
                    };
                    assert!(
                        hex(bytes.get(i + 1)) && hex(bytes.get(i + 2)),
                        "bad escape in {path:?}"
                    );
                    i += 3;
                    continue;
                }
                assert!(b.is_ascii() && !b.is_ascii_uppercase(), "{path:?}");
                i += 1;
            }
        }
    }
    if paths::validate_base_folder(&path).is_ok() {
        check_common(&path);
        assert_ne!(path.split('/').next(), Some(paths::CONTROL_DIR));
    }
    let other: String = u.arbitrary()?;
    assert_eq!(
        paths::folders_overlap(&path, &other),
        paths::folders_overlap(&other, &path)
    );
    assert!(paths::folders_overlap(&path, &path));
    let namespace_given: bool = u.arbitrary()?;
    if paths::in_scope(&other, namespace_given, &path) {
        let rest = path
            .strip_prefix(other.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .expect("under the folder");
        assert!(rest.ends_with(".yaml"));
        assert!(rest.split('/').count() <= if namespace_given { 1 } else { 2 });
    }
    Ok(())
}

/// What both validators promise.
fn check_common(path: &str) {
    assert!(
        !path.is_empty() && path.len() <= paths::MAX_PATH_BYTES && !path.starts_with('/'),
        "{path:?}"
    );
    assert!(
        !path.chars().any(|c| c == '\\' || c.is_control()),
        "{path:?}"
    );
    for component in path.split('/') {
        assert!(!matches!(component, "" | "." | ".."), "{path:?}");
        assert!(
            !component.eq_ignore_ascii_case(".git") && !component.eq_ignore_ascii_case("git~1"),
            "{path:?}"
        );
        assert!(component.len() <= paths::MAX_COMPONENT_BYTES, "{path:?}");
        assert!(!component.ends_with(['.', ' ']), "{path:?}");
        assert!(
            !component.contains([':', '*', '?', '"', '<', '>', '|']),
            "{path:?}"
        );
        let stem = component
            .split('.')
            .next()
            .unwrap_or("")
            .trim_end_matches(' ')
            .to_ascii_lowercase();
        let device = ["con", "prn", "aux", "nul", "conin$", "conout$", "clock$"]
            .contains(&stem.as_str())
            || ((stem.starts_with("com") || stem.starts_with("lpt"))
                && stem.len() == 4
                && stem.as_bytes()[3].is_ascii_digit());
        assert!(!device, "{path:?} has a Windows device name");
    }
}
