//! The agent's SOPS files, read by independent implementations: the npm package `sops-age` decrypts them,
//! a node script (`tests/sops/verify.mjs`) recomputes the MAC as the SOPS format defines it with node's crypto,
//! the Debian `age` CLI opens the data key, and the real `sops` CLI (3.11, `.tools/bin/sops`) decrypts them —
//! checking the MAC itself — and encrypts new files with the writer's generated `.sops.yaml`. Needs
//! `scripts/install-test-deps.sh` (node modules in `.tools/node`, the `age` package, `.tools/bin/sops`).

use std::path::PathBuf;
use std::process::Command;

use reverser_agent::sops::{self, Encryption, FingerprintKey};
use serde_json::{Value, json};

fn root() -> PathBuf {
    testkit::manifest_dir().join("..")
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
        .arg(testkit::manifest_dir().join("tests/sops/verify.mjs"))
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

fn sops_cli() -> PathBuf {
    let path = root().join(".tools/bin/sops");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/install-test-deps.sh",
        path.display()
    );
    path
}

/// `sops --decrypt` of `yaml` (named like the agent's files) with `identity`; Err(stderr) when sops refuses.
fn sops_decrypt(yaml: &str, identity: &age::x25519::Identity) -> Result<Value, String> {
    use age::secrecy::ExposeSecret;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db.sops.yaml");
    let key = dir.path().join("key.txt");
    std::fs::write(&file, yaml).unwrap();
    std::fs::write(&key, format!("{}\n", identity.to_string().expose_secret())).unwrap();
    let out = Command::new(sops_cli())
        .args(["--decrypt", "--output-type", "json"])
        .arg(&file)
        .env("SOPS_AGE_KEY_FILE", &key)
        .env_remove("SOPS_AGE_KEY")
        .output()
        .expect("sops runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn the_sops_cli_decrypts_to_the_live_data_and_verifies_the_mac() {
    let (a, b) = (
        age::x25519::Identity::generate(),
        age::x25519::Identity::generate(),
    );
    let enc = encryption(&[&a, &b]);
    let mut secret = live_secret();
    // sops itself reads values under all-digit keys (sops-age does not, see live_secret).
    secret["data"]["12345"] = json!("ZGlnaXRz");
    let yaml = seal(&secret, &enc);
    for id in [&a, &b] {
        let decrypted = sops_decrypt(&yaml, id).unwrap();
        assert_eq!(decrypted["data"], secret["data"]);
        assert_eq!(
            decrypted["metadata"]["labels"],
            secret["metadata"]["labels"]
        );
        assert_eq!(decrypted["type"], "Opaque");
    }
    // sops checks the MAC: an edited unencrypted value is refused.
    let tampered = yaml.replacen("type: Opaque", "type: kubernetes.io/tls", 1);
    let refused = sops_decrypt(&tampered, &a).expect_err("a tampered file must not decrypt");
    assert!(refused.to_lowercase().contains("mac"), "{refused}");
    // A key that is not a recipient opens nothing.
    let stranger = age::x25519::Identity::generate();
    assert!(sops_decrypt(&yaml, &stranger).is_err());
}

#[test]
fn the_sops_cli_reads_typed_values_of_other_sensitive_types() {
    let a = age::x25519::Identity::generate();
    let enc = encryption(&[&a]);
    let obj = json!({
        "apiVersion": "example.com/v1", "kind": "Credential",
        "metadata": {"name": "c", "namespace": "shop"},
        "spec": {"token": "t0k", "port": 5432, "ratio": 0.5, "tls": true, "hosts": ["a", "b"]}
    });
    let decrypted = sops_decrypt(&seal(&obj, &enc), &a).unwrap();
    assert_eq!(decrypted["spec"], obj["spec"]);
}

#[test]
fn the_writers_generated_sops_config_lets_the_sops_cli_encrypt_a_new_file() {
    use age::secrecy::ExposeSecret;
    let a = age::x25519::Identity::generate();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".sops.yaml"),
        reverser_common::sops::render_config(&[a.to_public().to_string()]),
    )
    .unwrap();
    let folder = dir.path().join("core/v1/secrets/shop");
    std::fs::create_dir_all(&folder).unwrap();
    let file = folder.join("new.sops.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: new\n  namespace: shop\ndata:\n  k: dg==\n",
    )
    .unwrap();
    // As a person would: from inside the repository, `sops --encrypt --in-place` finds `.sops.yaml` upwards.
    let out = Command::new(sops_cli())
        .args(["--encrypt", "--in-place"])
        .arg(&file)
        .current_dir(&folder)
        .output()
        .expect("sops runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let encrypted = std::fs::read_to_string(&file).unwrap();
    assert!(encrypted.contains("ENC[AES256_GCM,"), "{encrypted}");
    assert!(
        encrypted.contains("name: new"),
        "metadata stays readable: {encrypted}"
    );
    assert!(
        encrypted.contains(&a.to_public().to_string()),
        "{encrypted}"
    );
    let key = dir.path().join("key.txt");
    std::fs::write(&key, format!("{}\n", a.to_string().expose_secret())).unwrap();
    let out = Command::new(sops_cli())
        .args(["--decrypt", "--output-type", "json"])
        .arg(&file)
        .env("SOPS_AGE_KEY_FILE", &key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let decrypted: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(decrypted["data"]["k"], "dg==");
}
