//! An independent reader of the SOPS v3 + age documents the agent writes, following getsops/sops
//! (`aes/cipher.go`, `Tree.Decrypt`): open the data key with an age identity, decrypt every `ENC[…]` value with
//! AES-256-GCM (32-byte IV, AAD = key path joined with `:` plus a trailing `:`), rebuild its type, and check the
//! MAC (SHA-512 over every non-null leaf in document order, encrypted with AAD = `lastmodified`).

use std::io::Read;

use aes_gcm::aead::consts::U32;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::aes::Aes256;
use aes_gcm::{AesGcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha512};

type Cipher = AesGcm<Aes256, U32>;

/// Decrypts `doc` (already parsed) with `identity`; returns the plaintext object without the `sops` key.
pub fn decrypt(doc: &Value, identity: &age::x25519::Identity) -> Result<Value, String> {
    let map = doc.as_object().ok_or("not a mapping")?;
    let sops = map
        .get("sops")
        .and_then(Value::as_object)
        .ok_or("no sops mapping")?;
    let entries = sops
        .get("age")
        .and_then(Value::as_array)
        .ok_or("no sops.age")?;
    let mut data_key = None;
    for entry in entries {
        let armored = entry.get("enc").and_then(Value::as_str).ok_or("no enc")?;
        let decryptor = age::Decryptor::new(age::armor::ArmoredReader::new(armored.as_bytes()))
            .map_err(|e| format!("age header: {e}"))?;
        if let Ok(mut reader) = decryptor.decrypt(std::iter::once(identity as &dyn age::Identity)) {
            let mut key = Vec::new();
            reader
                .read_to_end(&mut key)
                .map_err(|e| format!("age body: {e}"))?;
            data_key = Some(key);
            break;
        }
    }
    let key = data_key.ok_or("no age entry opens with the identity")?;
    let cipher = Cipher::new_from_slice(&key).map_err(|_| "data key is not 32 bytes")?;
    let lastmodified = sops
        .get("lastmodified")
        .and_then(Value::as_str)
        .ok_or("no lastmodified")?;
    let mut hash = Sha512::new();
    let mut path = Vec::new();
    let mut plain = Map::new();
    // Document order: apiVersion, kind, metadata, then the rest sorted (as the agent renders it).
    let mut keys: Vec<&String> = map.keys().filter(|k| *k != "sops").collect();
    keys.sort_by_key(|k| (rank(k), k.to_string()));
    for k in keys {
        path.push(k.clone());
        let v = walk(&cipher, &map[k], &mut path, &mut hash)?;
        path.pop();
        plain.insert(k.clone(), v);
    }
    let mac = sops.get("mac").and_then(Value::as_str).ok_or("no mac")?;
    let (mac, _) = open(&cipher, mac, lastmodified)?;
    if mac != hex::encode_upper(hash.finalize()) {
        return Err("MAC mismatch".into());
    }
    Ok(Value::Object(plain))
}

fn rank(key: &str) -> u8 {
    match key {
        "apiVersion" => 0,
        "kind" => 1,
        "metadata" => 2,
        _ => 3,
    }
}

fn walk(
    cipher: &Cipher,
    value: &Value,
    path: &mut Vec<String>,
    hash: &mut Sha512,
) -> Result<Value, String> {
    match value {
        Value::Null => Ok(Value::Null),
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for k in keys {
                path.push(k.clone());
                let v = walk(cipher, &map[k], path, hash)?;
                path.pop();
                out.insert(k.clone(), v);
            }
            Ok(Value::Object(out))
        }
        Value::Array(items) => items
            .iter()
            .map(|item| walk(cipher, item, path, hash))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::String(s) if s.starts_with("ENC[") => {
            let aad = format!("{}:", path.join(":"));
            let (text, type_) = open(cipher, s, &aad)?;
            hash.update(text.as_bytes());
            typed(&text, &type_)
        }
        Value::String(s) => {
            hash.update(s.as_bytes());
            Ok(value.clone())
        }
        Value::Bool(b) => {
            hash.update(if *b {
                b"True".as_slice()
            } else {
                b"False".as_slice()
            });
            Ok(value.clone())
        }
        Value::Number(n) => {
            let text = match n.as_i64() {
                Some(i) => i.to_string(),
                None => n.as_f64().unwrap_or_default().to_string(),
            };
            hash.update(text.as_bytes());
            Ok(value.clone())
        }
    }
}

fn typed(text: &str, type_: &str) -> Result<Value, String> {
    Ok(match type_ {
        "str" => Value::String(text.to_owned()),
        "int" => Value::Number(text.parse::<i64>().map_err(|_| "bad int")?.into()),
        "float" => Number::from_f64(text.parse::<f64>().map_err(|_| "bad float")?)
            .map(Value::Number)
            .ok_or("non-finite float")?,
        "bool" => Value::Bool(match text {
            "True" => true,
            "False" => false,
            _ => return Err("bad bool".into()),
        }),
        other => return Err(format!("unknown type {other}")),
    })
}

/// `ENC[AES256_GCM,data:…,iv:…,tag:…,type:…]` → (plaintext, type).
fn open(cipher: &Cipher, value: &str, aad: &str) -> Result<(String, String), String> {
    let inner = value
        .strip_prefix("ENC[AES256_GCM,")
        .and_then(|v| v.strip_suffix(']'))
        .ok_or("not an ENC value")?;
    let mut data = None;
    let mut iv = None;
    let mut tag = None;
    let mut type_ = None;
    for part in inner.split(',') {
        let (k, v) = part.split_once(':').ok_or("bad ENC part")?;
        match k {
            "data" => data = Some(B64.decode(v).map_err(|_| "bad data")?),
            "iv" => iv = Some(B64.decode(v).map_err(|_| "bad iv")?),
            "tag" => tag = Some(B64.decode(v).map_err(|_| "bad tag")?),
            "type" => type_ = Some(v.to_owned()),
            _ => return Err("unknown ENC part".into()),
        }
    }
    let (mut data, iv, tag, type_) = (
        data.ok_or("no data")?,
        iv.ok_or("no iv")?,
        tag.ok_or("no tag")?,
        type_.ok_or("no type")?,
    );
    if iv.len() != 32 {
        return Err("iv is not 32 bytes".into());
    }
    data.extend_from_slice(&tag);
    let plain = cipher
        .decrypt(
            Nonce::<U32>::from_slice(&iv),
            Payload {
                msg: &data,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| format!("AES-GCM open failed (aad {aad:?})"))?;
    Ok((String::from_utf8(plain).map_err(|_| "not UTF-8")?, type_))
}
