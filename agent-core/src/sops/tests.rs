use super::*;
use serde_json::json;

fn identity() -> age::x25519::Identity {
    age::x25519::Identity::generate()
}

fn encryption_for(ids: &[&age::x25519::Identity]) -> Encryption {
    Encryption {
        recipients: parse_recipients(
            ids.iter()
                .map(|i| i.to_public().to_string())
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str),
        )
        .unwrap(),
        fingerprint_key: FingerprintKey::new([7u8; 32]),
    }
}

fn secret() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "db", "namespace": "shop", "uid": "u-1", "resourceVersion": "9"},
        "type": "Opaque",
        "data": {"password": "aHVudGVyMg==", "user": "YWRtaW4=", "empty": ""},
        "immutable": true
    })
}

/// Parses an `ENC[…]` value.
fn parse_enc(value: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>, String) {
    let inner = value
        .strip_prefix("ENC[AES256_GCM,")
        .and_then(|v| v.strip_suffix(']'))
        .expect("sops value");
    let mut parts = std::collections::BTreeMap::new();
    for part in inner.split(',') {
        let (k, v) = part.split_once(':').unwrap();
        parts.insert(k, v);
    }
    (
        B64.decode(parts["data"]).unwrap(),
        B64.decode(parts["iv"]).unwrap(),
        B64.decode(parts["tag"]).unwrap(),
        parts["type"].to_owned(),
    )
}

fn decrypt_value(key: &[u8], value: &str, aad: &str) -> Result<(String, String), ()> {
    let (mut data, iv, tag, type_) = parse_enc(value);
    assert_eq!(iv.len(), 32, "sops uses 32-byte IVs");
    assert_eq!(tag.len(), 16);
    data.extend_from_slice(&tag);
    let cipher = SopsCipher::new_from_slice(key).unwrap();
    let plain = cipher
        .decrypt(
            Nonce::<U32>::from_slice(&iv),
            Payload {
                msg: &data,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| ())?;
    Ok((String::from_utf8(plain).unwrap(), type_))
}

fn data_key(doc: &Value, id: &age::x25519::Identity, index: usize) -> Vec<u8> {
    let enc = doc["sops"]["age"][index]["enc"].as_str().unwrap();
    age::decrypt(id, enc.as_bytes()).expect("age decrypts the data key")
}

fn encrypt_now(obj: &Value, enc: &Encryption, lastmodified: &str) -> String {
    let prepared = prepare(obj, enc).unwrap();
    encrypt(&prepared, &enc.recipients, lastmodified).unwrap()
}

#[test]
fn round_trip_decrypts_every_data_value_for_every_recipient() {
    let (a, b) = (identity(), identity());
    let enc = encryption_for(&[&a, &b]);
    let yaml = encrypt_now(&secret(), &enc, "2026-01-02T03:04:05Z");
    let doc: Value = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(doc["sops"]["age"].as_array().unwrap().len(), 2);
    assert_eq!(doc["sops"]["encrypted_regex"], SECRET_ENCRYPTED_REGEX);
    assert_eq!(doc["sops"]["lastmodified"], "2026-01-02T03:04:05Z");
    assert_eq!(doc["sops"]["version"], SOPS_VERSION);
    // Server metadata is sanitized away, the rest stays readable.
    assert_eq!(doc["metadata"]["name"], "db");
    assert!(doc["metadata"].get("uid").is_none());
    assert_eq!(doc["type"], "Opaque");
    assert_eq!(doc["immutable"], true);
    for id in [&a, &b] {
        // Entries are in recipient order; each opens with its own identity.
        let public = id.to_public().to_string();
        let index = (0..2)
            .find(|i| doc["sops"]["age"][*i]["recipient"] == public.as_str())
            .expect("an entry per recipient");
        let key = data_key(&doc, id, index);
        assert_eq!(key.len(), 32);
        let (password, type_) = decrypt_value(
            &key,
            doc["data"]["password"].as_str().unwrap(),
            "data:password:",
        )
        .unwrap();
        assert_eq!((password.as_str(), type_.as_str()), ("aHVudGVyMg==", "str"));
        let (user, _) =
            decrypt_value(&key, doc["data"]["user"].as_str().unwrap(), "data:user:").unwrap();
        assert_eq!(user, "YWRtaW4=");
    }
    assert_eq!(
        doc["data"]["empty"], "",
        "sops leaves empty strings unencrypted"
    );
    assert!(!yaml.contains("aHVudGVyMg=="));
    assert!(!yaml.contains("YWRtaW4="));
}

#[test]
fn aad_binds_each_value_to_its_key_path() {
    let a = identity();
    let enc = encryption_for(&[&a]);
    let doc: Value =
        serde_saphyr::from_str(&encrypt_now(&secret(), &enc, "2026-01-02T03:04:05Z")).unwrap();
    let key = data_key(&doc, &a, 0);
    let password = doc["data"]["password"].as_str().unwrap();
    assert!(decrypt_value(&key, password, "data:password:").is_ok());
    assert!(decrypt_value(&key, password, "data:user:").is_err());
    assert!(decrypt_value(&key, password, "data:password").is_err());
}

#[test]
fn mac_is_sha512_over_all_values_in_document_order_encrypted_with_lastmodified() {
    let a = identity();
    let enc = encryption_for(&[&a]);
    let prepared = prepare(&secret(), &enc).unwrap();
    let doc: Value = serde_saphyr::from_str(
        &encrypt(&prepared, &enc.recipients, "2026-01-02T03:04:05Z").unwrap(),
    )
    .unwrap();
    let key = data_key(&doc, &a, 0);
    // Canonical order: apiVersion, kind, metadata (sorted), then data (sorted), immutable, type.
    let values: Vec<&str> = vec![
        "v1",
        "Secret",
        &prepared.fingerprint,
        "db",
        "shop",
        "",
        "aHVudGVyMg==",
        "YWRtaW4=",
        "True",
        "Opaque",
    ];
    let mut hash = Sha512::new();
    for v in values {
        hash.update(v.as_bytes());
    }
    let expected = hex::encode_upper(hash.finalize());
    let mac = doc["sops"]["mac"].as_str().unwrap();
    let (found, type_) = decrypt_value(&key, mac, "2026-01-02T03:04:05Z").unwrap();
    assert_eq!(type_, "str");
    assert_eq!(found, expected);
    assert!(decrypt_value(&key, mac, "2026-01-02T03:04:06Z").is_err());
}

#[test]
fn fingerprint_is_stable_and_covers_key_recipients_and_plaintext() {
    let (a, b) = (identity(), identity());
    let enc = encryption_for(&[&a]);
    let first = prepare(&secret(), &enc).unwrap().fingerprint;
    assert_eq!(prepare(&secret(), &enc).unwrap().fingerprint, first);
    assert!(first.starts_with("v1:") && first.len() == 3 + 64);
    // Two encryptions of the same object differ, their fingerprints do not.
    let one = encrypt_now(&secret(), &enc, "2026-01-02T03:04:05Z");
    let two = encrypt_now(&secret(), &enc, "2026-01-02T03:04:05Z");
    assert_ne!(one, two);
    assert_eq!(
        reverser_common::sops::fingerprint_of(one.as_bytes()),
        reverser_common::sops::fingerprint_of(two.as_bytes())
    );
    assert_eq!(
        reverser_common::sops::fingerprint_of(one.as_bytes()),
        Some(first.clone())
    );
    // Server-side churn (resourceVersion) and an applied-back fingerprint annotation change nothing.
    let mut churned = secret();
    churned["metadata"]["resourceVersion"] = json!("10");
    churned["metadata"]["annotations"] = json!({FINGERPRINT_ANNOTATION: "v1:old"});
    assert_eq!(prepare(&churned, &enc).unwrap().fingerprint, first);
    // A changed value, other recipients or another key: another fingerprint.
    let mut changed = secret();
    changed["data"]["password"] = json!("b3RoZXI=");
    assert_ne!(prepare(&changed, &enc).unwrap().fingerprint, first);
    assert_ne!(
        prepare(&secret(), &encryption_for(&[&a, &b]))
            .unwrap()
            .fingerprint,
        first
    );
    let other_key = Encryption {
        fingerprint_key: FingerprintKey::new([8u8; 32]),
        ..enc.clone()
    };
    assert_ne!(prepare(&secret(), &other_key).unwrap().fingerprint, first);
}

#[test]
fn recipients_are_validated_sorted_and_deduplicated_without_echoing_input() {
    let (a, b) = (identity(), identity());
    let (ra, rb) = (a.to_public().to_string(), b.to_public().to_string());
    let text = format!("# team keys\n{rb}\n{ra}, {rb}\n");
    let parsed = parse_recipients([text.as_str()]).unwrap();
    let mut expected = vec![ra.clone(), rb.clone()];
    expected.sort();
    assert_eq!(parsed, expected);
    assert_eq!(
        parse_recipients(["", " # none"]),
        Err(SopsError::NoRecipients)
    );
    let err = parse_recipients([ra.as_str(), "AGE-SECRET-KEY-1QQQQ"]).unwrap_err();
    assert!(matches!(err, SopsError::InvalidRecipient { index: 2, .. }));
    assert!(!err.to_string().contains("AGE-SECRET-KEY"), "{err}");
    assert!(parse_recipients(["age1notbech32"]).is_err());
}

#[test]
fn huge_objects_are_refused_with_a_clear_error() {
    let a = identity();
    let enc = encryption_for(&[&a]);
    let mut big = secret();
    big["data"]["blob"] = json!("A".repeat(MAX_PLAINTEXT_BYTES + 1));
    let err = prepare(&big, &enc).unwrap_err();
    assert!(matches!(err, SopsError::TooLarge { .. }));
    assert!(err.to_string().contains("more than"));
}

#[test]
fn documents_the_writer_would_refuse_are_refused_here() {
    // Many tiny values: well under the plaintext limit, but each becomes a ~100-byte `ENC[…]`.
    let a = identity();
    let enc = encryption_for(&[&a]);
    let mut many = secret();
    let data: serde_json::Map<String, Value> = (0..40_000)
        .map(|i| (format!("k{i}"), json!("eA==")))
        .collect();
    many["data"] = Value::Object(data);
    let prepared = prepare(&many, &enc).unwrap();
    let err = encrypt(&prepared, &enc.recipients, "2026-01-02T03:04:05Z").unwrap_err();
    let SopsError::DocumentTooLarge { bytes, limit } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*limit, MAX_DOCUMENT_BYTES);
    assert!(*bytes > MAX_DOCUMENT_BYTES);
    assert!(err.to_string().contains("more than"), "{err}");
    assert!(!err.to_string().contains("eA=="), "{err}");
}

#[test]
fn other_sensitive_types_encrypt_everything_but_the_header_with_typed_values() {
    let a = identity();
    let enc = encryption_for(&[&a]);
    let obj = json!({
        "apiVersion": "example.com/v1", "kind": "Credential",
        "metadata": {"name": "c", "namespace": "shop"},
        "spec": {"token": "t0k", "port": 5432, "tls": false, "ratio": 1.5, "hosts": ["a", "b"], "none": null}
    });
    let doc: Value =
        serde_saphyr::from_str(&encrypt_now(&obj, &enc, "2026-01-02T03:04:05Z")).unwrap();
    assert_eq!(doc["sops"]["encrypted_regex"], "^(spec)$");
    let key = data_key(&doc, &a, 0);
    let check = |v: &Value, aad: &str, plain: &str, ty: &str| {
        let (p, t) = decrypt_value(&key, v.as_str().unwrap(), aad).unwrap();
        assert_eq!((p.as_str(), t.as_str()), (plain, ty));
    };
    check(&doc["spec"]["token"], "spec:token:", "t0k", "str");
    check(&doc["spec"]["port"], "spec:port:", "5432", "int");
    check(&doc["spec"]["tls"], "spec:tls:", "False", "bool");
    check(&doc["spec"]["ratio"], "spec:ratio:", "1.5", "float");
    check(&doc["spec"]["hosts"][1], "spec:hosts:", "b", "str");
    assert!(doc["spec"]["none"].is_null());
    assert_eq!(doc["metadata"]["name"], "c");
}

#[test]
fn keys_that_look_like_other_types_stay_string_keys() {
    let a = identity();
    let enc = encryption_for(&[&a]);
    let mut obj = secret();
    obj["data"] = json!({"123": "MQ==", "true": "Mg==", "null": "Mw=="});
    let yaml = encrypt_now(&obj, &enc, "2026-01-02T03:04:05Z");
    let doc: Value = serde_saphyr::from_str(&yaml).unwrap();
    let key = data_key(&doc, &a, 0);
    for (k, v) in [("123", "MQ=="), ("true", "Mg=="), ("null", "Mw==")] {
        let (p, _) = decrypt_value(
            &key,
            doc["data"][k].as_str().unwrap(),
            &format!("data:{k}:"),
        )
        .unwrap();
        assert_eq!(p, v);
    }
}

#[test]
fn debug_output_never_shows_keys_or_plaintext() {
    let a = identity();
    let enc = encryption_for(&[&a]);
    let prepared = prepare(&secret(), &enc).unwrap();
    let shown = format!("{enc:?} {prepared:?}");
    assert!(!shown.contains("aHVudGVyMg=="));
    assert!(!shown.contains("[7, 7"));
    assert!(shown.contains("redacted"));
}

#[test]
fn lastmodified_has_whole_seconds_in_utc() {
    let now = now_rfc3339();
    assert!(now.ends_with('Z') && !now.contains('.'), "{now}");
    assert_eq!(now.len(), "2026-01-02T03:04:05Z".len());
}

#[test]
fn encrypted_documents_pass_the_writers_yaml_check() {
    let a = identity();
    let b = identity();
    let enc = encryption_for(&[&a, &b]);
    let mut tricky = secret();
    tricky["data"] =
        json!({"123": "MQ==", "true": "Mg==", "null": "Mw==", "<<": "NA==", "2001-12-14": ""});
    let credential = json!({
        "apiVersion": "example.com/v1", "kind": "Credential",
        "metadata": {"name": "yes", "namespace": "on"},
        "spec": {"token": "t0k", "port": 5432, "tls": false, "ratio": 1.5, "hosts": ["a", "b"], "none": null}
    });
    for obj in [secret(), tricky, credential] {
        let yaml = encrypt_now(&obj, &enc, "2026-01-02T03:04:05Z");
        let shape = reverser_common::yaml::validate_object(yaml.as_bytes())
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert!(shape.sops && !shape.is_plaintext_secret(), "{yaml}");
    }
}

#[test]
fn an_object_whose_metadata_or_annotations_is_no_mapping_is_refused_not_written_without_its_fingerprint()
 {
    // Found by the sops_round_trip fuzz target: such a document had no fingerprint annotation, so the writer could
    // not read one back.
    let a = identity();
    let enc = encryption_for(&[&a]);
    for (object, field) in [
        (
            json!({"apiVersion": "example.com/v1", "kind": "Vault", "metadata": 7, "spec": {"a": 1}}),
            "metadata",
        ),
        (
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "annotations": "x"}, "data": {"k": "eA=="}}),
            "metadata.annotations",
        ),
    ] {
        let prepared = prepare(&object, &enc).unwrap();
        let err = encrypt(&prepared, &enc.recipients, "2026-01-02T03:04:05Z").unwrap_err();
        assert!(
            matches!(err, SopsError::NoPlaceForFingerprint { field: f } if f == field),
            "{err:?}"
        );
        assert!(err.to_string().contains(field), "{err}");
    }
}
