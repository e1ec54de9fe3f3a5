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

/// Found by the `yaml_edit` fuzz target: a CRLF file edited towards a document whose own lines end in `\r\n` and
/// `\n` by turns. The edit was checked before it went back to CRLF, where the desired line's `\r` became `\r\r\n`
/// and the value changed. Whatever is returned must read as the desired value.
#[test]
fn an_edit_of_a_crlf_file_reads_as_the_desired_value_after_its_line_endings_are_restored() {
    let existing = "# edited on : win\r\ndata:\r\n  b: two # second\r\n  a: yone\r\n";
    let desired = "apiVersion: v1\nkind: ConfigMap\n\n  b8 threta6\r\n  bfour\n";
    let want = yaml::parse_document(desired.as_bytes()).expect("the desired document reads");
    if let Ok(edited) = yaml_edit::edit_in_place(existing, desired) {
        let got = yaml::parse_document(edited.as_bytes()).expect("the edit reads");
        assert_eq!(got, want, "the edit reads as another value:\n{edited:?}");
    }
}

/// Found by the `yaml_edit` fuzz target: with nothing to change, the editor handed back the existing text for a
/// desired document the project's parser refuses. An edit is only returned towards a readable document.
#[test]
fn nothing_is_returned_towards_a_desired_document_the_parser_refuses() {
    let existing = " ? #.i";
    let desired = " ? #..Na edNoit(\n";
    assert!(yaml::parse_document(desired.as_bytes()).is_err());
    assert!(yaml_edit::edit_in_place(existing, desired).is_err());
}
