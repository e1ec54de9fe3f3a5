//! Semantic YAML comparison: two documents are equal when they parse to the same value, whatever their
//! formatting, key order or quoting. The writer uses this to turn re-sent or reformatted objects into no-ops.

use std::{borrow::Cow, collections::HashSet};

use serde_saphyr::granit_parser::ScalarStyle;
use thiserror::Error;

mod simple;

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

/// Checks that `bytes` is one YAML document whose top level is a Kubernetes object in the plain form the agent
/// renders, so that every YAML reader (YAML 1.1 ones such as PyYAML and go-yaml v2 included) reads it the same way:
///
/// - a mapping at the top, one document, no byte-order mark;
/// - `apiVersion` and `kind` strings, and a `metadata` mapping with a `name` string (none of them empty);
/// - every mapping key is a string: not null, not a plain scalar a reader resolves to a boolean, number or
///   timestamp (`yes`, `1`, `0x1f`, `1:20`, `2001-12-14`), not `<<` (a merge key) or `=`, not a collection;
/// - no key repeats within its mapping;
/// - no tags (`!!python/object:…`, `!foo`, `!!str`), anchors or aliases (canonical YAML never has them, and
///   refusing them keeps later parses free of alias expansion and of application-specific constructors).
///
/// Quoted scalars are always strings, so `"<<"`, `'yes'` or `"1"` are fine keys: that is how the agent renders them.
///
/// The writer validates every upsert on the stream, so this is on the hot path: documents in the agent's plain block
/// style are read by a line scanner (`simple`), which only ever accepts; the rest walks the parser's events without
/// building a value (about twice as fast as deserializing into an ignored value).
pub fn validate_object(bytes: &[u8]) -> Result<ObjectShape, YamlError> {
    let text = object_text(bytes)?;
    // The agent's plain block style is read line by line; anything else, and every refusal, takes the parser.
    match simple::validate(text) {
        Some(shape) => Ok(shape),
        None => validate_events(text),
    }
}

/// [`validate_object`] by the YAML parser alone, for the tests and the fuzz target that hold the fast path to it.
#[doc(hidden)]
pub fn validate_object_by_parser(bytes: &[u8]) -> Result<ObjectShape, YamlError> {
    validate_events(object_text(bytes)?)
}

/// The fast path of [`validate_object`] alone: `Some` only when it answers (for the same tests).
#[doc(hidden)]
pub fn validate_object_by_lines(bytes: &[u8]) -> Option<ObjectShape> {
    simple::validate(object_text(bytes).ok()?)
}

fn object_text(bytes: &[u8]) -> Result<&str, YamlError> {
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        return Err(YamlError(
            "the document starts with a byte-order mark".into(),
        ));
    }
    std::str::from_utf8(bytes).map_err(|e| YamlError(format!("not UTF-8: {e}")))
}

/// The full check: walks the parser's events.
fn validate_events(text: &str) -> Result<ObjectShape, YamlError> {
    use serde_saphyr::granit_parser::{Event, Parser};

    /// What the walk is inside of.
    enum Frame<'a> {
        Sequence,
        Mapping {
            keys: HashSet<Cow<'a, str>>,
            expecting_key: bool,
            /// The object's top-level `metadata` mapping.
            metadata: bool,
        },
    }

    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame<'_>> = Vec::new();
    let mut documents = 0usize;
    let mut root_seen = false;
    let mut shape = ObjectShape::default();
    let mut name_seen = false;
    let mut metadata_seen = false;
    // The recorded field whose value comes next (the key was just read).
    let mut pending: Option<Field> = None;
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
        let (anchored, tagged) = match &event {
            Event::Scalar(_, _, anchor, tag) => (*anchor != 0, tag.is_some()),
            Event::SequenceStart(_, anchor, tag) | Event::MappingStart(_, anchor, tag) => {
                (*anchor != 0, tag.is_some())
            }
            Event::Alias(_) => (true, false),
            _ => {
                match event {
                    Event::DocumentStart(..) => {
                        documents += 1;
                        if documents > 1 {
                            return Err(at("more than one document"));
                        }
                    }
                    Event::SequenceEnd | Event::MappingEnd => {
                        stack.pop();
                    }
                    Event::StreamEnd => break,
                    _ => {}
                }
                continue;
            }
        };
        if anchored {
            return Err(at("anchors and aliases are not allowed in an object"));
        }
        if tagged {
            return Err(at(
                "tags (such as !!python/object or !foo) are not allowed in an object",
            ));
        }
        let depth = stack.len();
        let mut opens_metadata = false;
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
                metadata,
            }) => {
                if *expecting_key {
                    let Event::Scalar(key, style, _, _) = &event else {
                        return Err(at("mapping keys must be strings"));
                    };
                    if *style == ScalarStyle::Plain {
                        match plain_scalar_type(key) {
                            None => {}
                            Some(PlainType::Null) => {
                                return Err(at("mapping keys must not be null"));
                            }
                            Some(PlainType::Merge) => {
                                return Err(at("merge keys (<<) are not allowed in an object"));
                            }
                            Some(other) => {
                                return Err(at(&format!(
                                    "mapping keys must be strings, not {} (quote the key)",
                                    other.describe()
                                )));
                            }
                        }
                    }
                    if !keys.insert(key.clone()) {
                        let key: String = key.chars().take(100).collect();
                        return Err(at(&format!("duplicate mapping key {key:?}")));
                    }
                    pending = Field::of_key(key, depth == 1, *metadata);
                } else if let Some(field) = pending.take() {
                    let string = match &event {
                        Event::Scalar(value, style, _, _)
                            if is_string_value(value, *style == ScalarStyle::Plain) =>
                        {
                            Some(value)
                        }
                        _ => None,
                    };
                    match field {
                        Field::ApiVersion | Field::Kind | Field::Name => {
                            let Some(value) = string else {
                                return Err(at(&format!(
                                    "{} must be a non-empty string",
                                    field.describe()
                                )));
                            };
                            match field {
                                Field::ApiVersion => shape.api_version = Some(value.to_string()),
                                Field::Kind => shape.kind = Some(value.to_string()),
                                _ => name_seen = true,
                            }
                        }
                        Field::Metadata => {
                            if !matches!(event, Event::MappingStart(..)) {
                                return Err(at("metadata must be a mapping"));
                            }
                            metadata_seen = true;
                            opens_metadata = true;
                        }
                        Field::Sops => shape.sops = matches!(event, Event::MappingStart(..)),
                    }
                }
                *expecting_key = !*expecting_key;
            }
            Some(Frame::Sequence) => {}
        }
        match event {
            Event::SequenceStart(..) => stack.push(Frame::Sequence),
            Event::MappingStart(..) => stack.push(Frame::Mapping {
                keys: HashSet::new(),
                expecting_key: true,
                metadata: opens_metadata,
            }),
            _ => {}
        }
    }
    if !root_seen {
        return Err(YamlError("empty document: expected a mapping".into()));
    }
    let missing = [
        ("apiVersion", shape.api_version.is_some()),
        ("kind", shape.kind.is_some()),
        ("metadata", metadata_seen),
        ("metadata.name", name_seen || !metadata_seen),
    ]
    .into_iter()
    .find(|(_, present)| !present);
    if let Some((field, _)) = missing {
        return Err(YamlError(format!(
            "not a Kubernetes object: {field} is missing"
        )));
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

/// A field [`validate_object`] checks or records.
#[derive(Clone, Copy)]
enum Field {
    ApiVersion,
    Kind,
    Metadata,
    Name,
    Sops,
}

impl Field {
    /// The field a mapping key names: in the object's top-level mapping, or in its `metadata` mapping.
    fn of_key(key: &str, top_level: bool, in_metadata: bool) -> Option<Field> {
        match key {
            "apiVersion" if top_level => Some(Field::ApiVersion),
            "kind" if top_level => Some(Field::Kind),
            "metadata" if top_level => Some(Field::Metadata),
            "sops" if top_level => Some(Field::Sops),
            "name" if in_metadata => Some(Field::Name),
            _ => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Field::ApiVersion => "apiVersion",
            Field::Kind => "kind",
            Field::Metadata => "metadata",
            Field::Name => "metadata.name",
            Field::Sops => "sops",
        }
    }
}

/// Whether a scalar value is a non-empty string (what `apiVersion`, `kind` and `metadata.name` must be).
fn is_string_value(value: &str, plain: bool) -> bool {
    !value.is_empty() && (!plain || plain_scalar_type(value).is_none())
}

/// What a plain (unquoted, untagged) scalar means to a YAML reader when it is not a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PlainType {
    Null,
    Boolean,
    Number,
    Timestamp,
    /// `<<`: a merge key in YAML 1.1 readers.
    Merge,
    /// `=`: the YAML 1.1 value key, which readers refuse to construct.
    Value,
}

impl PlainType {
    fn describe(self) -> &'static str {
        match self {
            PlainType::Null => "null",
            PlainType::Boolean => "a boolean",
            PlainType::Number => "a number",
            PlainType::Timestamp => "a timestamp",
            PlainType::Merge => "a merge key (<<)",
            PlainType::Value => "the value key (=)",
        }
    }
}

/// Whether a plain (unquoted) scalar reads as a string for every YAML 1.1 and 1.2 reader.
pub(crate) fn plain_scalar_is_string(s: &str) -> bool {
    plain_scalar_type(s).is_none()
}

/// The type a YAML 1.1 or 1.2 (core schema) reader gives a plain scalar, or `None` when it is a string. Exact
/// spellings of the specs; the agent's renderer quotes all of these (and a few more), so its output always passes.
fn plain_scalar_type(s: &str) -> Option<PlainType> {
    let Some(&first) = s.as_bytes().first() else {
        return Some(PlainType::Null);
    };
    // Most keys start with a letter that no special spelling starts with: one comparison.
    if !(first.is_ascii_digit()
        || matches!(
            first,
            b'~' | b'<'
                | b'='
                | b'+'
                | b'-'
                | b'.'
                | b'n'
                | b'N'
                | b'y'
                | b'Y'
                | b't'
                | b'T'
                | b'f'
                | b'F'
                | b'o'
                | b'O'
        ))
    {
        return None;
    }
    match s {
        "~" | "null" | "Null" | "NULL" => return Some(PlainType::Null),
        "true" | "True" | "TRUE" | "false" | "False" | "FALSE" | "y" | "Y" | "yes" | "Yes"
        | "YES" | "n" | "N" | "no" | "No" | "NO" | "on" | "On" | "ON" | "off" | "Off" | "OFF" => {
            return Some(PlainType::Boolean);
        }
        "<<" => return Some(PlainType::Merge),
        "=" => return Some(PlainType::Value),
        _ => {}
    }
    if is_plain_number(s) {
        Some(PlainType::Number)
    } else if is_plain_timestamp(s) {
        Some(PlainType::Timestamp)
    } else {
        None
    }
}

/// Leading bytes of `s` accepted by `accept`, and the rest.
fn take_while(s: &str, accept: impl Fn(u8) -> bool) -> (&str, &str) {
    let n = s.bytes().take_while(|&b| accept(b)).count();
    s.split_at(n)
}

/// YAML 1.1 and 1.2 ints and floats: decimal with `_` separators, `0x`/`0o`/`0b`, base 60 (`1:20`), `.5`, `1e3`,
/// `.inf`, `.nan`, with an optional sign.
fn is_plain_number(s: &str) -> bool {
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    if matches!(unsigned, ".inf" | ".Inf" | ".INF") || matches!(s, ".nan" | ".NaN" | ".NAN") {
        return true;
    }
    if is_go_yaml_v2_number(s) {
        return true;
    }
    for (prefix, radix) in [("0x", 16), ("0o", 8), ("0b", 2)] {
        if let Some(digits) = unsigned.strip_prefix(prefix) {
            let is_digit = |b: u8| char::from(b).is_digit(radix);
            // PyYAML takes `0x_` and `0b_` for ints too (and then fails to load them); `0o` is YAML 1.2 only.
            return !digits.is_empty()
                && (radix != 8 || digits.bytes().any(is_digit))
                && digits.bytes().all(|b| is_digit(b) || b == b'_');
        }
    }
    let digit_or_underscore = |b: u8| b.is_ascii_digit() || b == b'_';
    let (whole, rest) = take_while(unsigned, digit_or_underscore);
    if !whole.is_empty() && !whole.as_bytes()[0].is_ascii_digit() {
        return false;
    }
    // Base 60 (YAML 1.1): 1:20, 190:20:30.15; a float may start with 0 (PyYAML: 0:30.5)
    let base_60_start = match whole.as_bytes().first() {
        Some(b'1'..=b'9') => true,
        Some(b'0') => rest.contains('.'),
        _ => false,
    };
    if base_60_start && rest.starts_with(':') {
        let (sexagesimal, fraction) = rest.split_once('.').unwrap_or((rest, ""));
        let parts_ok = sexagesimal[1..]
            .split(':')
            .all(|part| match part.as_bytes() {
                [units] => units.is_ascii_digit(),
                [tens, units] => (b'0'..=b'5').contains(tens) && units.is_ascii_digit(),
                _ => false,
            });
        return parts_ok && fraction.bytes().all(digit_or_underscore);
    }
    let (fraction, rest) = match rest.strip_prefix('.') {
        Some(after_dot) => take_while(after_dot, digit_or_underscore),
        None => ("", rest),
    };
    let mantissa_ok = if whole.is_empty() {
        // `.5`, but not `.` or `._`
        fraction.as_bytes().first().is_some_and(u8::is_ascii_digit)
    } else {
        true
    };
    let exponent_ok = match rest.strip_prefix(['e', 'E']) {
        None => rest.is_empty(),
        Some(exponent) => {
            let exponent = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            !exponent.is_empty() && exponent.bytes().all(|b| b.is_ascii_digit())
        }
    };
    mantissa_ok && exponent_ok
}

/// go-yaml v2 (kubectl, Flux, Argo CD): a scalar starting with a sign or a digit is a number when, with every `_`
/// removed, it is a Go integer literal as `strconv.ParseInt(s, 0, 64)` reads it (`0x`/`0X`, `0o`/`0O`, `0b`/`0B`
/// prefixes, decimal) or matches its float pattern `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`.
fn is_go_yaml_v2_number(s: &str) -> bool {
    if !s.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-') {
        return false;
    }
    let plain: String = s.chars().filter(|&c| c != '_').collect();
    let unsigned = plain.strip_prefix(['+', '-']).unwrap_or(&plain);
    let all_digits = |d: &str, radix: u32| !d.is_empty() && d.chars().all(|c| c.is_digit(radix));
    let bytes = unsigned.as_bytes();
    if bytes.len() > 2 && bytes[0] == b'0' {
        let radix = match bytes[1] {
            b'x' | b'X' => Some(16),
            b'o' | b'O' => Some(8),
            b'b' | b'B' => Some(2),
            _ => None,
        };
        if let Some(radix) = radix {
            return all_digits(&unsigned[2..], radix);
        }
    }
    let (whole, rest) = take_while(unsigned, |b| b.is_ascii_digit());
    let (fraction, rest) = match rest.strip_prefix('.') {
        Some(after) => take_while(after, |b| b.is_ascii_digit()),
        None if whole.is_empty() => return false,
        None => ("", rest),
    };
    if whole.is_empty() && fraction.is_empty() {
        return false;
    }
    match rest.strip_prefix(['e', 'E']) {
        None => rest.is_empty(),
        Some(exponent) => all_digits(exponent.strip_prefix(['+', '-']).unwrap_or(exponent), 10),
    }
}

/// YAML 1.1 timestamps: `2001-12-14`, `2001-12-14t21:59:43.10-05:00`, `2001-12-14 21:59:43.10 -5`, `…Z`.
fn is_plain_timestamp(s: &str) -> bool {
    fn digits(s: &str, min: usize, max: usize) -> Option<&str> {
        let (run, rest) = take_while(s, |b| b.is_ascii_digit());
        (min..=max).contains(&run.len()).then_some(rest)
    }
    let date = digits(s, 4, 4)
        .and_then(|r| r.strip_prefix('-'))
        .and_then(|r| digits(r, 1, 2))
        .and_then(|r| r.strip_prefix('-'))
        .and_then(|r| digits(r, 1, 2));
    let Some(rest) = date else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    let rest = match rest.strip_prefix(['T', 't']) {
        Some(r) => r,
        None => {
            let trimmed = rest.trim_start_matches([' ', '\t']);
            if trimmed.len() == rest.len() {
                return false;
            }
            trimmed
        }
    };
    let time = digits(rest, 1, 2)
        .and_then(|r| r.strip_prefix(':'))
        .and_then(|r| digits(r, 2, 2))
        .and_then(|r| r.strip_prefix(':'))
        .and_then(|r| digits(r, 2, 2));
    let Some(mut rest) = time else {
        return false;
    };
    if let Some(fraction) = rest.strip_prefix('.') {
        rest = take_while(fraction, |b| b.is_ascii_digit()).1;
    }
    let rest = rest.trim_start_matches([' ', '\t']);
    if rest.is_empty() || rest == "Z" {
        return true;
    }
    let Some(zone) = rest.strip_prefix(['+', '-']).and_then(|r| digits(r, 1, 2)) else {
        return false;
    };
    match zone.strip_prefix(':') {
        Some(minutes) => digits(minutes, 2, 2).is_some_and(str::is_empty),
        None => zone.is_empty(),
    }
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
            validate_object(
                b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {a: [1, {b: c}]}\n"
            )
            .is_ok()
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
            b"apiVersion: v1\nkind: Secret\nmetadata: {name: a}\ndata: {k: 'ENC[AES256_GCM,data:x,iv:y,tag:z,type:str]'}\nsops: {version: 3.9.4}\n",
        )
        .unwrap();
        assert!(encrypted.sops && !encrypted.is_plaintext_secret());
        // A nested `sops` or `kind` is not the object's.
        let nested =
            validate_object(b"apiVersion: v1\nkind: Secret\nmetadata: {name: a, sops: {a: b}}\n")
                .unwrap();
        assert!(nested.is_plaintext_secret());
        let scalar_sops =
            validate_object(b"apiVersion: v1\nkind: Secret\nmetadata: {name: a}\nsops: yes\n")
                .unwrap();
        assert!(scalar_sops.is_plaintext_secret());
        let configmap = validate_object(
            b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {kind: Secret}\n",
        )
        .unwrap();
        assert!(!configmap.is_plaintext_secret());
        assert!(
            !validate_object(b"apiVersion: example.com/v1\nkind: Secret\nmetadata: {name: a}\n")
                .unwrap()
                .is_plaintext_secret()
        );
    }

    /// The smallest Kubernetes object; the cases below add to it.
    const HEADER: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n";

    fn refused(input: &str) -> String {
        match validate_object(input.as_bytes()) {
            Ok(shape) => panic!("{input:?} was accepted: {shape:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn assert_accepted(input: &str) {
        if let Err(e) = validate_object(input.as_bytes()) {
            panic!("{input:?} was refused: {e}");
        }
    }

    #[test]
    fn validation_requires_one_plain_mapping() {
        let cases = [
            ("a: 1\n---\nb: 2\n", "more than one document"),
            ("a: 1\n---\n", "more than one document"),
            ("a: {b: 1, b: 2}\n", "duplicate mapping key \"b\""),
            ("a: [1, {b: 1, b: 2}]\n", "duplicate mapping key"),
            ("'a': 1\na: 2\n", "duplicate mapping key"),
            ("? [x]\n: 1\n", "keys must be strings"),
            ("a:\n  ? {x: 1}\n  : 1\n", "keys must be strings"),
            ("a: &x {b: 1}\nc: *x\n", "anchors and aliases"),
            ("null: a\n", "must not be null"),
            ("~: b\n", "must not be null"),
            (": 1\n", "must not be null"),
            ("a: 'x\n", "line 4"),
            ("a: 1\n b: 2\n", "line 5"),
        ];
        for (input, expected) in cases {
            let error = refused(&format!("{HEADER}{input}"));
            assert!(error.contains(expected), "{input:?}: {error}");
        }
        for (input, expected) in [
            ("", "empty document"),
            ("---\n", "not a mapping"),
            ("*x\n", ""),
            ("x\n", "not a mapping"),
        ] {
            assert!(refused(input).contains(expected), "{input:?}");
        }
        for accepted in [
            "a: 1\n...\n",
            "'1': a\n",
            "\"true\": a\n",
            "'null': a\n",
            "a: 1\n# comment\n",
            "a:\n",
            "a: [{b: 1}, {b: 1}]\nc: {b: 1}\n",
        ] {
            assert_accepted(&format!("{HEADER}{accepted}"));
        }
        assert_accepted(&format!("%YAML 1.2\n---\n{HEADER}"));
        assert_accepted("{apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n");
    }

    #[test]
    fn refuses_tags_anywhere() {
        for tagged in [
            "a: !!python/object:os.system {}\n",
            "a: !!python/object/apply:os.system [echo hi]\n",
            "a: !foo bar\n",
            "a: !foo\n  b: 1\n",
            "a: ! bar\n",
            "a: !!str 1\n",
            "a: !!binary aGVsbG8=\n",
            "a: !!seq [1]\n",
            "a: [1, !!int 2]\n",
            "!!str b: 1\n",
            "a: !<tag:yaml.org,2002:str> x\n",
            "%TAG !e! tag:example.com,2000:\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\na: !e!x 1\n",
        ] {
            let input = if tagged.starts_with('%') {
                tagged.to_owned()
            } else {
                format!("{HEADER}{tagged}")
            };
            assert!(refused(&input).contains("tags"), "{input:?}");
        }
        assert!(refused(&format!("--- !!map\n{HEADER}")).contains("tags"));
        // An exclamation mark inside a string is no tag.
        assert_accepted(&format!(
            "{HEADER}a: '!foo'\nb: \"!!python/object:x\"\nc: x!y\n"
        ));
    }

    #[test]
    fn refuses_merge_keys() {
        let error = refused(&format!("{HEADER}base: {{x: 1}}\nspec:\n  <<: {{x: 1}}\n"));
        assert!(error.contains("merge keys"), "{error}");
        let error = refused(&format!("{HEADER}<<: {{x: 1}}\n"));
        assert!(error.contains("merge keys"), "{error}");
        assert!(refused(&format!("{HEADER}=: 1\n")).contains("value key"));
        // Quoted, it is the string "<<"; as a value it is a string either way.
        assert_accepted(&format!("{HEADER}spec: {{'<<': 1, \"=\": 2}}\nop: <<\n"));
    }

    #[test]
    fn refuses_a_byte_order_mark() {
        let error = refused(&format!("\u{FEFF}{HEADER}"));
        assert!(error.contains("byte-order mark"), "{error}");
    }

    #[test]
    fn refuses_keys_that_readers_take_for_other_types() {
        let non_strings = [
            ("1", "number"),
            ("-1", "number"),
            ("+12", "number"),
            ("007", "number"),
            ("0x1f", "number"),
            ("0o17", "number"),
            ("0b101", "number"),
            ("1_000", "number"),
            ("1.5", "number"),
            ("1.", "number"),
            (".5", "number"),
            ("1e3", "number"),
            ("-1.5E-3", "number"),
            (".inf", "number"),
            ("-.Inf", "number"),
            (".NaN", "number"),
            ("1:20", "number"),
            ("190:20:30.15", "number"),
            ("2001-12-14", "timestamp"),
            ("2001-12-14t21:59:43.10-05:00", "timestamp"),
            ("2001-12-14 21:59:43.10 -5", "timestamp"),
            ("2001-12-14T21:59:43Z", "timestamp"),
            ("true", "boolean"),
            ("False", "boolean"),
            ("yes", "boolean"),
            ("NO", "boolean"),
            ("On", "boolean"),
            ("off", "boolean"),
            ("y", "boolean"),
            ("N", "boolean"),
            ("Null", "must not be null"),
        ];
        for (key, expected) in non_strings {
            let error = refused(&format!("{HEADER}data:\n  {key}: v\n"));
            assert!(error.contains(expected), "{key:?}: {error}");
            // Quoted, the same text is a string key.
            assert_accepted(&format!("{HEADER}data:\n  \"{key}\": v\n"));
            assert_accepted(&format!("{HEADER}data:\n  '{key}': v\n"));
        }
        // Complex keys.
        assert!(refused(&format!("{HEADER}? {{a: 1}}\n: v\n")).contains("keys must be strings"));
        assert!(refused(&format!("{HEADER}? [a]\n: v\n")).contains("keys must be strings"));
        // Strings that only look close.
        for key in [
            "a1",
            "1a",
            "v1",
            "1.2.3",
            "0x",
            "0xg",
            "1:60",
            "0:20",
            "1:2:3:",
            "2001-12-14x",
            "2001-12-14 x",
            "20011-12-14",
            "_1",
            "nil",
            "yess",
            "tru",
            "one",
            "offset",
            "n1",
            "1e",
            "1e+",
            ".",
            "._",
            "-a",
            "+a",
            "1-2",
            "10.0.0.1",
            "3d",
            "ON_",
            "~a",
            "<<a",
            "==",
        ] {
            assert_accepted(&format!("{HEADER}data:\n  {key}: v\n"));
        }
    }

    /// Found by the `yaml_validate` fuzz target (fuzz/): go-yaml v2 (kubectl, Flux, Argo CD) removes every `_` from
    /// a scalar that starts with a sign or digit and parses it as a Go integer literal, upper-case base prefixes
    /// included; PyYAML's patterns take `0x_` and `0b_` for ints (and then fail to load them) and `0:30.5` for a
    /// base-60 float. These plain keys were accepted although those readers do not read them as strings.
    #[test]
    fn refuses_keys_that_go_yaml_v2_or_pyyaml_read_as_numbers() {
        for key in [
            "0X1F", "0B1", "0O7", "-0X1f", "-_1", "+_0x1", "1__", "0_x1", "_0", "0x_", "0b_",
            "+0x_", "0:30.5", "00:30.5", "0:3:0.", "1_e3", "-_.5",
        ] {
            if key.starts_with('_') {
                // `_` first: no reader takes it for a number.
                assert_accepted(&format!("{HEADER}data:\n  {key}: v\n"));
                continue;
            }
            let error = refused(&format!("{HEADER}data:\n  {key}: v\n"));
            assert!(error.contains("number"), "{key:?}: {error}");
            assert_accepted(&format!("{HEADER}data:\n  \"{key}\": v\n"));
        }
        for key in [
            "0X", "0B", "0xg", "0:30", "-_", "+_", "0_x", "0:30._x", "1_e", "-_a",
        ] {
            assert_accepted(&format!("{HEADER}data:\n  {key}: v\n"));
        }
    }

    #[test]
    fn requires_api_version_kind_and_metadata_name_strings() {
        let cases = [
            (
                "kind: ConfigMap\nmetadata: {name: a}\n",
                "apiVersion is missing",
            ),
            ("apiVersion: v1\nmetadata: {name: a}\n", "kind is missing"),
            ("apiVersion: v1\nkind: ConfigMap\n", "metadata is missing"),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n",
                "metadata.name is missing",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {labels: {name: a}}\nspec: {name: a}\n",
                "metadata.name is missing",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: a\n",
                "metadata must be a mapping",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: [name]\n",
                "metadata must be a mapping",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n",
                "metadata must be a mapping",
            ),
            (
                "apiVersion: 1\nkind: ConfigMap\nmetadata: {name: a}\n",
                "apiVersion must be",
            ),
            (
                "apiVersion: v1\nkind: true\nmetadata: {name: a}\n",
                "kind must be",
            ),
            (
                "apiVersion: v1\nkind:\nmetadata: {name: a}\n",
                "kind must be",
            ),
            (
                "apiVersion: v1\nkind: ''\nmetadata: {name: a}\n",
                "kind must be",
            ),
            (
                "apiVersion: v1\nkind: [a]\nmetadata: {name: a}\n",
                "kind must be",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: 12}\n",
                "metadata.name must be",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: null}\n",
                "metadata.name must be",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: {a: b}}\n",
                "metadata.name must be",
            ),
            (
                "apiVersion: {a: b}\nkind: ConfigMap\nmetadata: {name: a}\n",
                "apiVersion must be",
            ),
        ];
        for (input, expected) in cases {
            let error = refused(input);
            assert!(error.contains(expected), "{input:?}: {error}");
        }
        assert_accepted(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: '12', namespace: yes-no}\n",
        );
        assert_accepted(
            "metadata:\n  name: \"1:20\"\nkind: \"True\"\napiVersion: example.com/v1\n",
        );
        // An encrypted document keeps the header in the clear and its values are strings.
        assert_accepted(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n  namespace: shop\ndata:\n  password: ENC[AES256_GCM,data:x,iv:y,tag:z,type:str]\nsops:\n  age:\n    - recipient: age1x\n      enc: |\n        -----BEGIN AGE ENCRYPTED FILE-----\n        abc\n        -----END AGE ENCRYPTED FILE-----\n  lastmodified: \"2024-01-01T00:00:00Z\"\n  mac: ENC[AES256_GCM,data:m,iv:i,tag:t,type:str]\n  encrypted_regex: '^(data|stringData)$'\n  version: 3.9.4\n",
        );
    }
}
