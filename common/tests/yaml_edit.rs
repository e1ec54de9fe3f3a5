//! Golden tests of the comment-preserving editor: `tests/yaml_edit/<case>/existing.yaml` (a file a person edited)
//! brought to `desired.yaml` (the canonical rendering of the changed object) must give `expected.yaml` byte for
//! byte, and read back as `desired.yaml`'s value. `UPDATE_GOLDEN=1` rewrites the expected files (review the diff).

use std::path::Path;

use reverser_common::{yaml, yaml_edit};

fn golden(case: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/yaml_edit")
        .join(case);
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let (existing, desired) = (read("existing.yaml"), read("desired.yaml"));
    let edited = yaml_edit::edit_in_place(&existing, &desired)
        .unwrap_or_else(|fallback| panic!("{case}: fell back ({fallback})"));
    assert_eq!(
        yaml::parse_document(edited.as_bytes()).unwrap(),
        yaml::parse_document(desired.as_bytes()).unwrap(),
        "{case}: the edit does not read as the desired value:\n{edited}"
    );
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(dir.join("expected.yaml"), &edited).unwrap();
    }
    assert_eq!(edited, read("expected.yaml"), "{case}");
}

#[test]
fn deployment_with_commented_containers_and_reordered_keys() {
    golden("deployment");
}

#[test]
fn configmap_with_a_comment_per_key_gains_changes_and_loses_keys() {
    golden("configmap");
}

#[test]
fn yaml_1_1_booleans_stay_quoted() {
    golden("yaml11");
}

#[test]
fn crlf_line_endings_are_kept() {
    golden("crlf");
}

#[test]
fn flow_collections_that_change_become_block_entries() {
    golden("flow_and_types");
}
