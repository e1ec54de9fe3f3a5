//! Semantic YAML comparison: two documents are equal when they parse to the same value, whatever their
//! formatting, key order or quoting. The writer uses this to turn re-sent or reformatted objects into no-ops.

use thiserror::Error;

#[derive(Debug, Error)]
#[error("invalid YAML: {0}")]
pub struct YamlError(String);

/// Parses one YAML document into a JSON value (the data model Kubernetes objects live in).
pub fn parse_document(bytes: &[u8]) -> Result<serde_json::Value, YamlError> {
    let text = std::str::from_utf8(bytes).map_err(|e| YamlError(format!("not UTF-8: {e}")))?;
    serde_saphyr::from_str::<serde_json::Value>(text)
        .map_err(|e| YamlError(first_line(&e.to_string())))
}

/// Parses and requires a mapping at the top (a Kubernetes object), not a scalar or a list.
pub fn parse_object(bytes: &[u8]) -> Result<serde_json::Value, YamlError> {
    let value = parse_document(bytes)?;
    if !value.is_object() {
        return Err(YamlError(
            "the document is not a mapping (a Kubernetes object)".into(),
        ));
    }
    Ok(value)
}

/// Checks that `bytes` is one valid YAML document whose top level is a mapping with string keys (a Kubernetes
/// object), without building the value: the writer validates every upsert on the stream, so this is on the hot path.
pub fn validate_object(bytes: &[u8]) -> Result<(), YamlError> {
    let text = std::str::from_utf8(bytes).map_err(|e| YamlError(format!("not UTF-8: {e}")))?;
    serde_saphyr::from_str::<std::collections::HashMap<String, serde::de::IgnoredAny>>(text)
        .map(|_| ())
        .map_err(|e| YamlError(first_line(&e.to_string())))
}

/// Whether two YAML documents carry the same value. Unparseable documents are equal only byte for byte.
pub fn semantically_equal(a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return true;
    }
    match (parse_document(a), parse_document(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

// Parser errors can quote large parts of the input; keep messages short (and free of object content).
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default();
    line.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_and_key_order_do_not_matter() {
        let a = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  k: v\n";
        let b = b"kind: ConfigMap\napiVersion: \"v1\"\ndata: {k: v}\nmetadata: {name: a}\n";
        assert!(semantically_equal(a, b));
    }

    #[test]
    fn value_changes_matter() {
        let a = b"data:\n  k: v\n";
        let b = b"data:\n  k: w\n";
        assert!(!semantically_equal(a, b));
        assert!(!semantically_equal(b"n: 1\n", b"n: \"1\"\n"));
    }

    #[test]
    fn rejects_non_objects_and_garbage() {
        assert!(parse_object(b"- a\n- b\n").is_err());
        assert!(parse_object(b"key: [unclosed\n").is_err());
        assert!(parse_object(&[0xff, 0xfe]).is_err());
        assert!(parse_object(b"a: 1\n").is_ok());
        for bad in [
            &b"- a\n- b\n"[..],
            b"key: [unclosed\n",
            &[0xff, 0xfe],
            b"just a string\n",
            b"a: 1\na: 2\n",
        ] {
            assert!(
                validate_object(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(
            validate_object(b"apiVersion: v1\nkind: ConfigMap\ndata: {a: [1, {b: c}]}\n").is_ok()
        );
    }
}
