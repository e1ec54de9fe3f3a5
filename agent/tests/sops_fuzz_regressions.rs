//! Inputs found by the `sops_round_trip` fuzz target (fuzz/), kept as plain tests.

use reverser_agent::sops::{self, Encryption, FingerprintKey};
use reverser_common::yaml;
use serde_json::{Value, json};

fn encrypt(object: &Value) -> String {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let encryption = Encryption {
        recipients: sops::parse_recipients([recipient.as_str()]).unwrap(),
        fingerprint_key: FingerprintKey::new([7; 32]),
    };
    let prepared = sops::prepare(object, &encryption).unwrap();
    sops::encrypt(&prepared, &encryption.recipients, "2026-01-02T03:04:05Z").unwrap()
}

/// The `encrypted_regex` the document carries, as a YAML reader reads it.
fn regex_of(document: &str) -> String {
    let value: Value = serde_saphyr::from_str(document).expect("the document is YAML");
    value["sops"]["encrypted_regex"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A sensitive custom type whose top-level field names hold a control character or a line break: the regex
/// listing them was written into a single-quoted scalar verbatim, which is not YAML (the writer refused the
/// whole document) or, for a line break, reads back as another regex (a space).
#[test]
fn top_level_keys_with_control_characters_or_line_breaks_keep_the_document_valid() {
    for key in [
        "kubelet-config-\u{11}.18",
        "a\nb",
        "tab\there",
        "del\u{7f}",
        "nel\u{85}",
        "ls\u{2028}x",
    ] {
        let object = json!({
            "apiVersion": "example.com/v1",
            "kind": "Vault",
            "metadata": {"name": "v", "namespace": "shop"},
            key: "secret value",
        });
        let document = encrypt(&object);
        if let Err(error) = yaml::validate_object(document.as_bytes()) {
            panic!("{key:?}: the writer refuses the encrypted document: {error}\n{document}");
        }
        let regex = regex_of(&document);
        let expected_key = key.replace('.', "\\.");
        assert_eq!(regex, format!("^({expected_key})$"), "{key:?}");
    }
}

#[test]
fn plain_regexes_stay_single_quoted_as_sops_writes_them() {
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s"},
        "data": {"k": "dg=="},
    });
    assert!(encrypt(&secret).contains("  encrypted_regex: '^(data|stringData)$'\n"));
    let quoted = json!({"apiVersion": "example.com/v1", "kind": "Vault", "metadata": {"name": "v"}, "it's": 1});
    let document = encrypt(&quoted);
    assert!(
        document.contains("  encrypted_regex: '^(it''s)$'\n"),
        "{document}"
    );
    assert_eq!(regex_of(&document), "^(it's)$");
}

/// A sensitive custom type with a top-level field named `sops`: the document got two `sops` keys, which is not
/// YAML the writer (or sops) reads. sops itself refuses such a file; so does the agent now, with a clear error.
#[test]
fn a_top_level_sops_field_is_refused_instead_of_written_twice() {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let encryption = Encryption {
        recipients: sops::parse_recipients([recipient.as_str()]).unwrap(),
        fingerprint_key: FingerprintKey::new([7; 32]),
    };
    let object = json!({
        "apiVersion": "example.com/v1",
        "kind": "Vault",
        "metadata": {"name": "v"},
        "sops": "a field of the type",
    });
    let prepared = sops::prepare(&object, &encryption).unwrap();
    let result = sops::encrypt(&prepared, &encryption.recipients, "2026-01-02T03:04:05Z");
    assert_eq!(
        result.as_ref().err(),
        Some(&sops::SopsError::ReservedSopsKey),
        "{result:?}"
    );
}
