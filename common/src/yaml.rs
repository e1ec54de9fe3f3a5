//! Semantic YAML comparison: two documents are equal when they parse to the same value, whatever their
//! formatting, key order or quoting. The writer uses this to turn re-sent or reformatted objects into no-ops.

use std::{borrow::Cow, collections::HashSet};

use serde_saphyr::granit_parser::ScalarStyle;
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

/// Checks that `bytes` is one YAML document whose top level is a mapping (a Kubernetes object), with plain data
/// only: every mapping key is a non-null scalar, no key repeats within its mapping, and there are no anchors or
/// aliases (canonical YAML never has them, and refusing them keeps later parses free of alias expansion).
///
/// The writer validates every upsert on the stream, so this is on the hot path: it walks the parser's events
/// without building a value (about twice as fast as deserializing into an ignored value).
pub fn validate_object(bytes: &[u8]) -> Result<ObjectShape, YamlError> {
    use serde_saphyr::granit_parser::{Event, Parser};

    /// What the walk is inside of.
    enum Frame<'a> {
        Sequence,
        Mapping {
            keys: HashSet<Cow<'a, str>>,
            expecting_key: bool,
        },
    }

    let text = std::str::from_utf8(bytes).map_err(|e| YamlError(format!("not UTF-8: {e}")))?;
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame<'_>> = Vec::new();
    let mut documents = 0usize;
    let mut root_seen = false;
    let mut shape = ObjectShape::default();
    // The top-level key whose value comes next, when it is one the shape records.
    let mut top_key: Option<TopKey> = None;
    while let Some(next) = parser.next_event() {
        let (event, span) = next.map_err(|e| {
            let at = e.marker();
            YamlError(format!(
                "line {} column {}: {}",
                at.line(),
                at.col() + 1,
                first_line(&e.kind().to_string())
            ))
        })?;
        let at = |what: &str| {
            YamlError(format!(
                "line {} column {}: {what}",
                span.start.line(),
                span.start.col() + 1
            ))
        };
        // A node (scalar, alias or collection start) takes the next position of its parent; in a mapping that
        // alternates between key and value.
        let is_node = matches!(
            event,
            Event::Scalar(..)
                | Event::SequenceStart(..)
                | Event::MappingStart(..)
                | Event::Alias(_)
        );
        if is_node {
            let anchored = match &event {
                Event::Scalar(_, _, anchor, _)
                | Event::SequenceStart(_, anchor, _)
                | Event::MappingStart(_, anchor, _) => *anchor != 0,
                _ => true,
            };
            if anchored {
                return Err(at("anchors and aliases are not allowed in an object"));
            }
            let at_top = stack.len() == 1;
            match stack.last_mut() {
                None => {
                    if root_seen {
                        return Err(at("more than one document"));
                    }
                    root_seen = true;
                    if !matches!(event, Event::MappingStart(..)) {
                        return Err(at("the document is not a mapping (a Kubernetes object)"));
                    }
                }
                Some(Frame::Mapping {
                    keys,
                    expecting_key,
                }) => {
                    if *expecting_key {
                        let Event::Scalar(key, style, _, _) = &event else {
                            return Err(at("mapping keys must be strings"));
                        };
                        let null = style == &ScalarStyle::Plain
                            && matches!(key.as_ref(), "" | "~" | "null" | "Null" | "NULL");
                        if null {
                            return Err(at("mapping keys must not be null"));
                        }
                        if !keys.insert(key.clone()) {
                            let key: String = key.chars().take(100).collect();
                            return Err(at(&format!("duplicate mapping key {key:?}")));
                        }
                        if at_top {
                            top_key = match key.as_ref() {
                                "apiVersion" => Some(TopKey::ApiVersion),
                                "kind" => Some(TopKey::Kind),
                                "sops" => Some(TopKey::Sops),
                                _ => None,
                            };
                        }
                    } else if at_top {
                        match (top_key.take(), &event) {
                            (Some(TopKey::ApiVersion), Event::Scalar(value, ..)) => {
                                shape.api_version = Some(value.to_string());
                            }
                            (Some(TopKey::Kind), Event::Scalar(value, ..)) => {
                                shape.kind = Some(value.to_string());
                            }
                            (Some(TopKey::Sops), Event::MappingStart(..)) => shape.sops = true,
                            _ => {}
                        }
                    }
                    *expecting_key = !*expecting_key;
                }
                Some(Frame::Sequence) => {}
            }
        }
        match event {
            Event::DocumentStart(..) => {
                documents += 1;
                if documents > 1 {
                    return Err(at("more than one document"));
                }
            }
            Event::SequenceStart(..) => stack.push(Frame::Sequence),
            Event::MappingStart(..) => stack.push(Frame::Mapping {
                keys: HashSet::new(),
                expecting_key: true,
            }),
            Event::SequenceEnd | Event::MappingEnd => {
                stack.pop();
            }
            Event::StreamEnd => break,
            _ => {}
        }
    }
    if !root_seen {
        return Err(YamlError("empty document: expected a mapping".into()));
    }
    Ok(shape)
}

/// The top-level facts [`validate_object`] reports about an object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectShape {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    /// Whether it has a top-level `sops` mapping (a SOPS-encrypted document).
    pub sops: bool,
}

impl ObjectShape {
    /// A core Secret without SOPS metadata: plaintext (base64 is not encryption), never to be written.
    pub fn is_plaintext_secret(&self) -> bool {
        self.api_version.as_deref() == Some("v1")
            && self.kind.as_deref() == Some("Secret")
            && !self.sops
    }
}

enum TopKey {
    ApiVersion,
    Kind,
    Sops,
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

/// A parse error of a file that may hold secrets (credentials, tokens), fit for a log line: the first line of the
/// parser's message (it may add a snippet of the input below) with every quoted value replaced by `…`; field names,
/// which serde quotes with backticks, and the line and column stay.
pub fn error_without_values(error: &impl std::fmt::Display) -> String {
    let message = first_line(&error.to_string());
    let mut out = String::with_capacity(message.len());
    let mut quote: Option<char> = None;
    for c in message.chars() {
        match quote {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                quote = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '"' || c == '\'' {
                    quote = Some(c);
                }
            }
        }
    }
    if let Some(q) = quote {
        // An unterminated quote: drop what followed it.
        out.push('…');
        out.push(q);
    }
    out
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

    #[test]
    fn errors_of_secret_files_keep_no_values() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Creds {
            token: String,
            insecure: bool,
        }
        let bad_value =
            serde_saphyr::from_str::<Creds>("token: ghp_SECRET123\ninsecure: ghp_OTHER456\n")
                .unwrap_err();
        let typo =
            serde_saphyr::from_str::<Creds>("token: ghp_SECRET123\ninsecur: true\n").unwrap_err();
        for error in [&bad_value, &typo] {
            let message = error_without_values(error);
            assert!(
                !message.contains("SECRET") && !message.contains("OTHER"),
                "{message} (from {error})"
            );
            assert!(message.contains("line"), "{message}");
        }
        assert!(
            error_without_values(&typo).contains("insecur"),
            "field names stay"
        );
        assert_eq!(
            error_without_values(&"invalid value: string \"hunter2\", expected bool"),
            "invalid value: string \"…\", expected bool"
        );
    }

    #[test]
    fn validation_reports_the_top_level_shape() {
        let plain = validate_object(b"apiVersion: v1\nkind: Secret\nmetadata: {name: a, labels: {kind: x}}\ndata: {k: dg==}\n").unwrap();
        assert_eq!(plain.kind.as_deref(), Some("Secret"));
        assert!(plain.is_plaintext_secret());
        let encrypted = validate_object(
            b"apiVersion: v1\nkind: Secret\ndata: {k: 'ENC[AES256_GCM,data:x,iv:y,tag:z,type:str]'}\nsops: {version: 3.9.4}\n",
        )
        .unwrap();
        assert!(encrypted.sops && !encrypted.is_plaintext_secret());
        // A nested `sops` or `kind` is not the object's.
        let nested =
            validate_object(b"apiVersion: v1\nkind: Secret\nmetadata: {sops: {a: b}}\n").unwrap();
        assert!(nested.is_plaintext_secret());
        let scalar_sops = validate_object(b"apiVersion: v1\nkind: Secret\nsops: yes\n").unwrap();
        assert!(scalar_sops.is_plaintext_secret());
        let configmap =
            validate_object(b"apiVersion: v1\nkind: ConfigMap\ndata: {kind: Secret}\n").unwrap();
        assert!(!configmap.is_plaintext_secret());
        assert!(
            !validate_object(b"apiVersion: example.com/v1\nkind: Secret\n")
                .unwrap()
                .is_plaintext_secret()
        );
    }

    #[test]
    fn validation_requires_one_plain_mapping() {
        let refused = [
            ("", "empty document"),
            ("---\n", "not a mapping"),
            ("a: 1\n---\nb: 2\n", "more than one document"),
            ("a: 1\n---\n", "more than one document"),
            ("a: {b: 1, b: 2}\n", "duplicate mapping key \"b\""),
            ("a: [1, {b: 1, b: 2}]\n", "duplicate mapping key"),
            ("'a': 1\na: 2\n", "duplicate mapping key"),
            ("? [x]\n: 1\n", "keys must be strings"),
            ("a:\n  ? {x: 1}\n  : 1\n", "keys must be strings"),
            ("a: &x {b: 1}\nc: *x\n", "anchors and aliases"),
            ("*x\n", ""),
            ("null: a\n", "must not be null"),
            ("~: b\n", "must not be null"),
            (": 1\n", "must not be null"),
            ("a: 'x\n", "line 1"),
            ("a: 1\n b: 2\n", "line 2"),
            ("x\n", "not a mapping"),
        ];
        for (input, expected) in refused {
            let error = validate_object(input.as_bytes())
                .expect_err(input)
                .to_string();
            assert!(error.contains(expected), "{input:?}: {error}");
        }
        for accepted in [
            "a: 1\n...\n",
            "1: a\n",
            "true: a\n",
            "'null': a\n",
            "--- !!map\na: 1\n",
            "%YAML 1.2\n---\na: 1\n",
            "a: 1\n# comment\n",
            "{}\n",
            "a:\n",
            "a: !!binary aGVsbG8=\n",
            "a: [{b: 1}, {b: 1}]\nc: {b: 1}\n",
        ] {
            assert!(
                validate_object(accepted.as_bytes()).is_ok(),
                "{accepted:?}: {:?}",
                validate_object(accepted.as_bytes())
            );
        }
    }
}
