//! The agent's SOPS files, read by independent implementations: the npm package `sops-age` decrypts them,
//! a node script (`tests/sops/verify.mjs`) recomputes the MAC as the SOPS format defines it with node's crypto,
//! and the Debian `age` CLI opens the data key. Needs `scripts/install-test-deps.sh` (node modules in
//! `.tools/node`, the `age` package).

use std::path::{Path, PathBuf};
use std::process::Command;

use reverser_agent::sops::{self, Encryption, FingerprintKey};
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn node_modules() -> PathBuf {
    let dir = root().join(".tools/node/node_modules");
    assert!(
        dir.join("sops-age").is_dir(),
        "{} lacks sops-age: run scripts/install-test-deps.sh",
        dir.display()
    );
    dir
}

/// Runs the independent verifier on `yaml` with `identity`; returns its JSON report.
fn verify(yaml: &str, identity: &age::x25519::Identity) -> Value {
    use age::secrecy::ExposeSecret;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db.sops.yaml");
    let key = dir.path().join("key.txt");
    std::fs::write(&file, yaml).unwrap();
    std::fs::write(&key, format!("{}\n", identity.to_string().expose_secret())).unwrap();
    let out = Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sops/verify.mjs"))
        .arg(&file)
        .arg(&key)
        .env("SOPS_NODE_MODULES", node_modules())
        .output()
        .expect("node is required");
    assert!(
        out.status.success(),
        "verify.mjs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn encryption(ids: &[&age::x25519::Identity]) -> Encryption {
    let recipients: Vec<String> = ids.iter().map(|i| i.to_public().to_string()).collect();
    Encryption {
        recipients: sops::parse_recipients(recipients.iter().map(String::as_str)).unwrap(),
        fingerprint_key: FingerprintKey::generate(),
    }
}

fn seal(obj: &Value, enc: &Encryption) -> String {
    let prepared = sops::prepare(obj, enc).unwrap();
    sops::encrypt(&prepared, &enc.recipients, &sops::now_rfc3339()).unwrap()
}

fn live_secret() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": "db", "namespace": "shop", "uid": "u", "resourceVersion": "3",
            "labels": {"app": "shop", "tier": "true"},
            "annotations": {"note": "on", "data": "an annotation named data"}
        },
        "type": "Opaque",
        "immutable": false,
        "data": {
            "password": "aHVudGVyMg==",
            "user": "YWRtaW4=",
            // (no all-digit key: sops-age drops all-digit path segments from the AAD, taking them for
            // list indices, while sops itself uses the key; src/sops/tests.rs covers such keys)
            "empty": "",
            "multi": "bGluZTEKbGluZTIK"
        }
    })
}

#[test]
fn sops_age_decrypts_to_the_live_data_and_the_mac_verifies() {
    let (a, b) = (
        age::x25519::Identity::generate(),
        age::x25519::Identity::generate(),
    );
    let enc = encryption(&[&a, &b]);
    let yaml = seal(&live_secret(), &enc);
    for id in [&a, &b] {
        let report = verify(&yaml, id);
        assert_eq!(report["macOk"], true, "{report:#}");
        let decrypted = &report["decrypted"];
        assert_eq!(decrypted["data"], live_secret()["data"], "{report:#}");
        assert_eq!(decrypted["type"], "Opaque");
        assert_eq!(decrypted["metadata"]["name"], "db");
        // `data:` everywhere in a key path is encrypted, as sops' encrypted_regex does (the annotation too).
        let paths: Vec<&str> = report["encryptedPaths"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(paths.contains(&"data:password:"), "{paths:?}");
        assert!(paths.contains(&"metadata:annotations:data:"), "{paths:?}");
    }
}

#[test]
fn tampering_with_an_unencrypted_value_breaks_the_mac() {
    let a = age::x25519::Identity::generate();
    let enc = encryption(&[&a]);
    let yaml = seal(&live_secret(), &enc);
    let tampered = yaml.replacen("type: Opaque", "type: kubernetes.io/tls", 1);
    assert_ne!(tampered, yaml);
    let report = verify(&tampered, &a);
    assert_eq!(report["macOk"], false, "{report:#}");
}

#[test]
fn the_age_cli_opens_the_data_key() {
    use age::secrecy::ExposeSecret;
    let a = age::x25519::Identity::generate();
    let enc = encryption(&[&a]);
    let yaml = seal(&live_secret(), &enc);
    let doc: Value = serde_saphyr::from_str(&yaml).unwrap();
    let armored = doc["sops"]["age"][0]["enc"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.txt");
    std::fs::write(&key, format!("{}\n", a.to_string().expose_secret())).unwrap();
    let enc_file = dir.path().join("enc.age");
    std::fs::write(&enc_file, armored).unwrap();
    let out = Command::new("age")
        .args(["-d", "-i"])
        .arg(&key)
        .arg(&enc_file)
        .output()
        .expect("the age CLI (Debian package age) is required");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), 32, "the SOPS data key is 32 bytes");
}

#[test]
fn other_sensitive_types_round_trip_with_typed_values() {
    let a = age::x25519::Identity::generate();
    let enc = encryption(&[&a]);
    let obj = json!({
        "apiVersion": "example.com/v1", "kind": "Credential",
        "metadata": {"name": "c", "namespace": "shop"},
        "spec": {"token": "t0k", "port": 5432, "tls": true, "hosts": ["a", "b"]}
    });
    let report = verify(&seal(&obj, &enc), &a);
    assert_eq!(report["macOk"], true, "{report:#}");
    assert_eq!(report["decrypted"]["spec"], obj["spec"], "{report:#}");
}
