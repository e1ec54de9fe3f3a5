//! SOPS v3 + age encryption of sensitive objects (Secrets), in the format `sops --decrypt` and Flux's
//! kustomize-controller read. Pure apart from the random data key and IVs.
//!
//! ```text
//! sanitized object ──▶ fingerprint (HMAC-SHA256, per-destination key, recipients + canonical plaintext)
//!        │                   │ stored as annotation configbutler.ai/sops-fingerprint
//!        ▼                   ▼
//!  walk in canonical key order (apiVersion, kind, metadata, rest sorted; nested keys sorted):
//!    every non-null leaf  → SHA-512 (the MAC, over *all* values, as sops does without mac_only_encrypted)
//!    leaves under a key matching encrypted_regex → ENC[AES256_GCM,data:…,iv:…,tag:…,type:str|int|float|bool]
//!        with a fresh 32-byte IV and AAD = the key path joined with ':' plus a trailing ':' ("data:password:")
//!  MAC (upper-case hex) encrypted with the data key, AAD = `lastmodified` (RFC 3339, UTC, seconds)
//!  data key (32 random bytes) encrypted to every age recipient, armored: sops.age[] = {recipient, enc}
//! ```
//!
//! The same rules as getsops/sops `sops.go` (`Tree.Encrypt`, `shouldBeEncrypted`, `ToBytes`) and
//! `aes/cipher.go`: empty strings stay empty (not encrypted, nothing hashed), nulls are skipped, list items
//! share their list's key path, booleans are `True`/`False`, floats are formatted without exponent.
//! Nothing here logs, and errors never carry values.

use std::fmt;
use std::str::FromStr;

use aes_gcm::aead::consts::U32;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::aes::Aes256;
use aes_gcm::{AesGcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256, Sha512};

use crate::canonical;
pub use reverser_common::sops::{FILE_SUFFIX, FINGERPRINT_ANNOTATION, SECRET_ENCRYPTED_REGEX};

/// The sops version written into `sops.version`: files are read by sops >= 3.7 and Flux alike.
pub const SOPS_VERSION: &str = "3.9.4";
/// Largest canonical plaintext the agent encrypts (Kubernetes caps Secrets at 1 MiB; base64 and YAML add a
/// little): anything larger is refused with [`SopsError::TooLarge`] instead of sent.
pub const MAX_PLAINTEXT_BYTES: usize = 1536 * 1024;
/// Largest encrypted document the agent sends: the writer refuses objects above its `--max-object-bytes`
/// (3 MiB by default), and encryption inflates small values a lot (each becomes `ENC[…,iv:…,tag:…]`), so a
/// document above this is refused here with [`SopsError::DocumentTooLarge`] (3 MiB less 64 KiB of headroom)
/// rather than rejected by the writer.
pub const MAX_DOCUMENT_BYTES: usize = 3 * 1024 * 1024 - 64 * 1024;

/// AES-256-GCM with the 32-byte nonces sops uses.
type SopsCipher = AesGcm<Aes256, U32>;

/// Why an object cannot be encrypted. Messages name positions and sizes, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SopsError {
    #[error("no age recipients are configured")]
    NoRecipients,
    #[error("age recipient #{index} is not an age X25519 public key (age1…): {reason}")]
    InvalidRecipient { index: usize, reason: String },
    #[error("the object is not a mapping")]
    NotAnObject,
    #[error(
        "the object is {bytes} bytes of canonical YAML, more than the {limit} bytes the agent encrypts"
    )]
    TooLarge { bytes: usize, limit: usize },
    #[error("the encrypted document is {bytes} bytes, more than the {limit} bytes the agent sends")]
    DocumentTooLarge { bytes: usize, limit: usize },
    #[error(
        "a value at {path:?} is an integer outside the signed 64-bit range, which sops cannot represent"
    )]
    UnsupportedNumber { path: String },
    #[error("rendering the encrypted document failed: {0}")]
    Render(String),
    #[error("age encryption of the data key failed: {0}")]
    Age(String),
    #[error("AES-GCM encryption failed")]
    Aes,
    #[error(
        "the object has a top-level field named `sops`, which a SOPS document reserves for its metadata"
    )]
    ReservedSopsKey,
    #[error(
        "the object's `{field}` is not a mapping, so the fingerprint annotation (which the writer compares) has no place"
    )]
    NoPlaceForFingerprint { field: &'static str },
}

/// Validates age recipients: trimmed, empty entries and `#` comments dropped, each an `age1…` X25519 public
/// key; the result is sorted and deduplicated (so that the fingerprint does not depend on their order).
pub fn parse_recipients<'a>(
    entries: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<String>, SopsError> {
    let mut out = Vec::new();
    let mut index = 0;
    for entry in entries {
        for item in entry
            .lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .flat_map(|l| l.split([',', ' ', '\t']))
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            index += 1;
            age::x25519::Recipient::from_str(item).map_err(|reason| {
                SopsError::InvalidRecipient {
                    index,
                    reason: reason.to_owned(),
                }
            })?;
            out.push(item.to_owned());
        }
    }
    if out.is_empty() {
        return Err(SopsError::NoRecipients);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The per-destination HMAC key of fingerprints. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct FingerprintKey([u8; 32]);

impl FingerprintKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// From stored bytes (a Kubernetes Secret's value); `None` unless exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FingerprintKey(<redacted>)")
    }
}

/// How one destination encrypts: its recipients (validated, sorted) and its fingerprint key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encryption {
    pub recipients: Vec<String>,
    pub fingerprint_key: FingerprintKey,
}

/// A sensitive object as the index needs it: the fingerprint and the canonical plaintext to encrypt.
pub struct Prepared {
    /// `v1:` + hex HMAC-SHA256.
    pub fingerprint: String,
    /// The sanitized object without the fingerprint annotation.
    sanitized: Value,
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Sanitizes `obj` (dropping a fingerprint annotation a GitOps tool may have applied back to the cluster) and
/// fingerprints it for `encryption`: equal plaintext and recipients give equal fingerprints, anything else a
/// different one. Checks the size limit.
pub fn prepare(obj: &Value, encryption: &Encryption) -> Result<Prepared, SopsError> {
    let mut sanitized = canonical::sanitize(obj);
    strip_fingerprint_annotation(&mut sanitized);
    let plaintext = canonical::render(&sanitized).map_err(|e| SopsError::Render(e.to_string()))?;
    if plaintext.len() > MAX_PLAINTEXT_BYTES {
        return Err(SopsError::TooLarge {
            bytes: plaintext.len(),
            limit: MAX_PLAINTEXT_BYTES,
        });
    }
    let fingerprint = fingerprint(
        &encryption.fingerprint_key,
        &encryption.recipients,
        &plaintext,
    );
    Ok(Prepared {
        fingerprint,
        sanitized,
    })
}

/// HMAC-SHA256 over a domain tag, the recipients and the canonical plaintext: stable across restarts
/// (same key, same object), different when the recipients change (so each file is re-encrypted once).
pub fn fingerprint(
    key: &FingerprintKey,
    recipients: &[String],
    canonical_plaintext: &str,
) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(b"gitops-reverser/sops-fingerprint/v1\n");
    let mut sorted: Vec<&str> = recipients.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    for r in sorted {
        mac.update(r.as_bytes());
        mac.update(b"\n");
    }
    mac.update(b"\n");
    mac.update(canonical_plaintext.as_bytes());
    format!("v1:{}", hex::encode(mac.finalize().into_bytes()))
}

fn strip_fingerprint_annotation(obj: &mut Value) {
    if let Some(Value::Object(annotations)) = obj.pointer_mut("/metadata/annotations")
        && annotations.remove(FINGERPRINT_ANNOTATION).is_some()
        && annotations.is_empty()
        && let Some(Value::Object(meta)) = obj.get_mut("metadata")
    {
        meta.remove("annotations");
    }
}

/// The top-level keys whose values are encrypted: `data` and `stringData` for Secrets (what Flux and the
/// sops docs use), every key but `apiVersion`, `kind` and `metadata` for other sensitive types.
fn encrypted_keys(obj: &Map<String, Value>) -> Vec<String> {
    let is_secret = obj.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && obj.get("kind").and_then(Value::as_str) == Some("Secret");
    let mut keys: Vec<String> = obj
        .keys()
        .filter(|k| !matches!(k.as_str(), "apiVersion" | "kind" | "metadata"))
        .cloned()
        .collect();
    if is_secret || keys.is_empty() {
        keys = vec!["data".into(), "stringData".into()];
    }
    keys.sort();
    keys
}

/// `^(k1|k2)$` with Go-regexp metacharacters escaped.
fn encrypted_regex(keys: &[String]) -> String {
    if keys == ["data", "stringData"] {
        return SECRET_ENCRYPTED_REGEX.to_owned();
    }
    let escaped: Vec<String> = keys
        .iter()
        .map(|k| {
            k.chars()
                .flat_map(|c| {
                    let special = "\\.+*?()|[]{}^$".contains(c);
                    special
                        .then_some('\\')
                        .into_iter()
                        .chain(std::iter::once(c))
                })
                .collect()
        })
        .collect();
    format!("^({})$", escaped.join("|"))
}

/// Encrypts a prepared object into a SOPS v3 YAML document (with the fingerprint annotation) for
/// `recipients`, stamped `lastmodified` (RFC 3339, UTC, whole seconds: `2026-01-02T03:04:05Z`). A document
/// larger than [`MAX_DOCUMENT_BYTES`] is refused.
pub fn encrypt(
    prepared: &Prepared,
    recipients: &[String],
    lastmodified: &str,
) -> Result<String, SopsError> {
    if recipients.is_empty() {
        return Err(SopsError::NoRecipients);
    }
    let mut doc = prepared.sanitized.clone();
    let Value::Object(map) = &mut doc else {
        return Err(SopsError::NotAnObject);
    };
    // The document's own `sops` key holds the metadata (sops refuses such files too).
    if map.contains_key("sops") {
        return Err(SopsError::ReservedSopsKey);
    }
    // Without the fingerprint the writer could not tell an unchanged object from a changed one.
    let Value::Object(meta) = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()))
    else {
        return Err(SopsError::NoPlaceForFingerprint { field: "metadata" });
    };
    let Value::Object(annotations) = meta
        .entry("annotations")
        .or_insert_with(|| Value::Object(Map::new()))
    else {
        return Err(SopsError::NoPlaceForFingerprint {
            field: "metadata.annotations",
        });
    };
    annotations.insert(
        FINGERPRINT_ANNOTATION.to_owned(),
        Value::String(prepared.fingerprint.clone()),
    );
    let keys = encrypted_keys(map);
    let regex = encrypted_regex(&keys);

    let mut data_key = [0u8; 32];
    rand::rng().fill_bytes(&mut data_key);
    let cipher = SopsCipher::new_from_slice(&data_key).map_err(|_| SopsError::Aes)?;
    let mut walker = Walker {
        cipher: &cipher,
        keys: &keys,
        hash: Sha512::new(),
        path: Vec::new(),
    };
    let encrypted = walker.top(map)?;
    let mac = hex::encode_upper(walker.hash.finalize());
    let mac = encrypt_value(&cipher, mac.as_bytes(), "str", lastmodified)?;

    let mut age_entries = Vec::with_capacity(recipients.len());
    for recipient in recipients {
        let parsed = age::x25519::Recipient::from_str(recipient).map_err(|reason| {
            SopsError::InvalidRecipient {
                index: 0,
                reason: reason.to_owned(),
            }
        })?;
        let armored = age::encrypt_and_armor(&parsed, &data_key)
            .map_err(|e| SopsError::Age(e.to_string()))?;
        age_entries.push((recipient.as_str(), armored));
    }

    let mut out = canonical::render(&Value::Object(encrypted))
        .map_err(|e| SopsError::Render(e.to_string()))?;
    out.push_str("sops:\n  age:\n");
    for (recipient, armored) in age_entries {
        out.push_str(&format!("    - recipient: {recipient}\n      enc: |\n"));
        for line in armored.lines() {
            out.push_str("        ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(&format!(
        "  lastmodified: \"{lastmodified}\"\n  mac: {mac}\n  encrypted_regex: {}\n  version: {SOPS_VERSION}\n",
        yaml_scalar(&regex)
    ));
    if out.len() > MAX_DOCUMENT_BYTES {
        return Err(SopsError::DocumentTooLarge {
            bytes: out.len(),
            limit: MAX_DOCUMENT_BYTES,
        });
    }
    Ok(out)
}

/// `value` as a YAML scalar: single-quoted, as sops writes it, unless it holds a character a single-quoted scalar
/// cannot carry (control characters, and line breaks, which a reader would fold into a space); then
/// double-quoted with escapes. Top-level keys of a sensitive custom type, which make up the regex, may be anything.
fn yaml_scalar(value: &str) -> String {
    let plain_enough = |c: char| {
        !c.is_control()
            && !matches!(
                c,
                '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
            )
    };
    if value.chars().all(plain_enough) {
        return format!("'{}'", value.replace('\'', "''"));
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if plain_enough(c) => out.push(c),
            c => out.push_str(&format!("\\u{:04X}", u32::from(c))),
        }
    }
    out.push('"');
    out
}

/// Seals a prepared object into its SOPS document. The watch index decides what is sealed and when; a sealer
/// holds what is not pure in it: the encryption's randomness and the wall clock (`lastmodified`).
pub trait Sealer: Send + Sync + fmt::Debug {
    fn seal(&self, prepared: &Prepared, encryption: &Encryption) -> Result<String, SopsError>;
}

/// SOPS v3 + age for the destination's recipients, stamped with the system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct AgeSealer;

impl Sealer for AgeSealer {
    fn seal(&self, prepared: &Prepared, encryption: &Encryption) -> Result<String, SopsError> {
        encrypt(prepared, &encryption.recipients, &now_rfc3339())
    }
}

/// `lastmodified` for now: RFC 3339 in UTC, whole seconds (sops re-formats it with Go's `time.RFC3339`
/// to build the MAC's AAD, so fractions would break the MAC check).
pub fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .map(|t| t.to_string())
        .unwrap_or_else(|_| now.to_string())
}

fn encrypt_value(
    cipher: &SopsCipher,
    plaintext: &[u8],
    type_: &str,
    aad: &str,
) -> Result<String, SopsError> {
    let mut iv = [0u8; 32];
    rand::rng().fill_bytes(&mut iv);
    let sealed = cipher
        .encrypt(
            Nonce::<U32>::from_slice(&iv),
            Payload {
                msg: plaintext,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| SopsError::Aes)?;
    let (data, tag) = sealed.split_at(sealed.len() - 16);
    Ok(format!(
        "ENC[AES256_GCM,data:{},iv:{},tag:{},type:{type_}]",
        B64.encode(data),
        B64.encode(iv),
        B64.encode(tag)
    ))
}

struct Walker<'a> {
    cipher: &'a SopsCipher,
    keys: &'a [String],
    hash: Sha512,
    path: Vec<String>,
}

/// Position of a top-level key in canonical order.
fn top_level_rank(key: &str) -> u8 {
    match key {
        "apiVersion" => 0,
        "kind" => 1,
        "metadata" => 2,
        _ => 3,
    }
}

impl Walker<'_> {
    fn top(&mut self, map: &Map<String, Value>) -> Result<Map<String, Value>, SopsError> {
        let mut entries: Vec<(&String, &Value)> = map.iter().collect();
        entries.sort_by_key(|(k, _)| (top_level_rank(k), *k));
        self.entries(entries)
    }

    fn entries(
        &mut self,
        entries: Vec<(&String, &Value)>,
    ) -> Result<Map<String, Value>, SopsError> {
        let mut out = Map::new();
        for (key, value) in entries {
            self.path.push(key.clone());
            let walked = self.value(value);
            self.path.pop();
            out.insert(key.clone(), walked?);
        }
        Ok(out)
    }

    fn value(&mut self, value: &Value) -> Result<Value, SopsError> {
        let (bytes, type_) = match value {
            Value::Null => return Ok(Value::Null),
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by_key(|(k, _)| *k);
                return self.entries(entries).map(Value::Object);
            }
            Value::Array(items) => {
                return items
                    .iter()
                    .map(|item| self.value(item))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Value::Array);
            }
            Value::String(s) => (s.clone(), "str"),
            Value::Bool(b) => ((if *b { "True" } else { "False" }).to_owned(), "bool"),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    (i.to_string(), "int")
                } else if n.is_u64() {
                    return Err(SopsError::UnsupportedNumber {
                        path: self.path.join(":"),
                    });
                } else {
                    (n.as_f64().unwrap_or_default().to_string(), "float")
                }
            }
        };
        self.hash.update(bytes.as_bytes());
        let encrypted = self.path.iter().any(|p| self.keys.contains(p));
        if !encrypted {
            return Ok(value.clone());
        }
        if bytes.is_empty() {
            // sops leaves empty strings as they are.
            return Ok(Value::String(String::new()));
        }
        let aad = format!("{}:", self.path.join(":"));
        encrypt_value(self.cipher, bytes.as_bytes(), type_, &aad).map(Value::String)
    }
}

#[cfg(test)]
mod tests;
