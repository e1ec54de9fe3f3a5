//! The fast path of [`super::validate_object`]: a line scanner for the plain block style the agent renders.
//!
//! It recognizes a strict subset of YAML: printable ASCII lines indented with spaces, block mappings and block
//! sequences (the compact `- ` form included), and on each line one plain scalar, one quoted scalar without escapes,
//! `[]` or `{}`. Within that subset the meaning of a document follows from its lines alone, so the facts the full
//! check needs (keys, their repeats, the top-level fields) can be read without a YAML parser, several times faster.
//!
//! It only ever *accepts*: anything outside the subset, and anything the full check would refuse (a repeated key,
//! a missing name, a key that is not a string), returns `None`, and the caller runs the full check, which gives
//! the precise error. So the fast path can be conservative without changing what is accepted; the differential
//! tests below and the `yaml_validate` fuzz target hold it to giving the full check's answer whenever it answers.

use std::collections::HashSet;

use super::{Field, ObjectShape, is_string_value, plain_scalar_type};

/// Longest key taken here: YAML limits an implicit key to 1024 characters.
const MAX_KEY_BYTES: usize = 1000;

/// Keys of one mapping: a short list, a set once it grows.
#[derive(Default)]
struct Keys<'a> {
    list: Vec<&'a str>,
    set: Option<HashSet<&'a str>>,
}

impl<'a> Keys<'a> {
    /// Adds a key; false when it is already there.
    fn insert(&mut self, key: &'a str) -> bool {
        if let Some(set) = &mut self.set {
            return set.insert(key);
        }
        if self.list.contains(&key) {
            return false;
        }
        self.list.push(key);
        if self.list.len() > 16 {
            self.set = Some(self.list.drain(..).collect());
        }
        true
    }
}

enum Frame<'a> {
    Mapping {
        indent: usize,
        keys: Keys<'a>,
        /// The object's top-level `metadata` mapping.
        metadata: bool,
    },
    Sequence {
        indent: usize,
    },
}

/// A key whose value starts on the next line (`key:` at the end of its line).
struct Open {
    field: Option<Field>,
    /// The indentation of its mapping's keys.
    indent: usize,
}

/// What one line holds after its indentation (and after `- ` in a sequence).
enum Line<'a> {
    /// A key (decoded) and its value on the same line, or `None` when it is [`Open`].
    Entry(&'a str, Option<&'a str>),
    Scalar,
}

/// A value on the same line as its key.
enum Value<'a> {
    /// The string of a quoted scalar, or the text of a plain one (`plain`).
    Scalar {
        text: &'a str,
        plain: bool,
    },
    EmptyMapping,
    EmptySequence,
}

/// The object's shape when the document is in the subset and the full check accepts it; `None` otherwise (then the
/// full check decides).
pub(super) fn validate(text: &str) -> Option<ObjectShape> {
    if !text
        .bytes()
        .all(|b| b == b'\n' || (b' '..=b'~').contains(&b))
    {
        return None;
    }
    let body = text.strip_suffix('\n').unwrap_or(text);
    let mut scan = Scan::default();
    for line in body.split('\n') {
        scan.line(line)?;
    }
    scan.finish()
}

#[derive(Default)]
struct Scan<'a> {
    stack: Vec<Frame<'a>>,
    open: Option<Open>,
    root_seen: bool,
    shape: ObjectShape,
    metadata_seen: bool,
    name_seen: bool,
}

impl<'a> Scan<'a> {
    fn line(&mut self, line: &'a str) -> Option<()> {
        let content = line.trim_start_matches(' ');
        let indent = line.len() - content.len();
        // Blank lines, trailing spaces and document markers are left to the parser.
        if content.is_empty()
            || line.ends_with(' ')
            || (indent == 0 && (content.starts_with("---") || content.starts_with("...")))
        {
            return None;
        }
        let dash = content == "-" || content.starts_with("- ");
        if let Some(open) = self.open.take() {
            // A sequence may start at its key's indentation; a mapping must be deeper.
            if (dash && indent >= open.indent) || (!dash && indent > open.indent) {
                let mut metadata = false;
                match open.field {
                    None => {}
                    Some(Field::Metadata) if !dash => {
                        self.metadata_seen = true;
                        metadata = true;
                    }
                    Some(Field::Sops) => self.shape.sops = !dash,
                    Some(_) => return None,
                }
                self.stack.push(if dash {
                    Frame::Sequence { indent }
                } else {
                    Frame::Mapping {
                        indent,
                        keys: Keys::default(),
                        metadata,
                    }
                });
            } else {
                // An empty value (null): refused for the recorded fields but `sops`.
                null_value(open.field)?;
            }
        }
        while let Some(top) = self.stack.last() {
            let closed = match top {
                Frame::Mapping { indent: at, .. } => *at > indent,
                // A compact sequence ends at the next key of its mapping, on the same column.
                Frame::Sequence { indent: at } => *at > indent || (*at == indent && !dash),
            };
            if !closed {
                break;
            }
            self.stack.pop();
        }
        if self.stack.is_empty() {
            if self.root_seen || indent != 0 || dash {
                return None;
            }
            self.root_seen = true;
            self.stack.push(Frame::Mapping {
                indent: 0,
                keys: Keys::default(),
                metadata: false,
            });
        }
        let (sequence, at) = match self.stack.last()? {
            Frame::Sequence { indent } => (true, *indent),
            Frame::Mapping { indent, .. } => (false, *indent),
        };
        if at != indent {
            return None;
        }
        if sequence {
            let item = content.strip_prefix("- ")?;
            if let Line::Entry(key, value) = split(item)? {
                // A mapping in the item: its keys are on the column after `- `.
                self.stack.push(Frame::Mapping {
                    indent: indent + 2,
                    keys: Keys::default(),
                    metadata: false,
                });
                self.entry(key, value)?;
            }
        } else {
            match split(content)? {
                Line::Entry(key, value) if !dash => self.entry(key, value)?,
                _ => return None,
            }
        }
        Some(())
    }

    /// A key of the mapping on top of the stack, with its value on the same line or opening one below.
    fn entry(&mut self, key: &'a str, value: Option<&'a str>) -> Option<()> {
        let depth = self.stack.len();
        let Some(Frame::Mapping {
            indent,
            keys,
            metadata,
        }) = self.stack.last_mut()
        else {
            return None;
        };
        if !keys.insert(key) {
            return None;
        }
        let field = Field::of_key(key, depth == 1, *metadata);
        let Some(value) = value else {
            self.open = Some(Open {
                field,
                indent: *indent,
            });
            return Some(());
        };
        let value = parse_value(value)?;
        match field {
            None => {}
            Some(Field::Sops) => self.shape.sops = matches!(value, Value::EmptyMapping),
            Some(Field::Metadata) => return None,
            Some(field) => {
                let Value::Scalar { text, plain } = value else {
                    return None;
                };
                if !is_string_value(text, plain) {
                    return None;
                }
                match field {
                    Field::ApiVersion => self.shape.api_version = Some(text.to_owned()),
                    Field::Kind => self.shape.kind = Some(text.to_owned()),
                    _ => self.name_seen = true,
                }
            }
        }
        Some(())
    }

    fn finish(self) -> Option<ObjectShape> {
        if let Some(open) = self.open {
            null_value(open.field)?;
        }
        let complete = self.root_seen
            && self.shape.api_version.is_some()
            && self.shape.kind.is_some()
            && self.metadata_seen
            && self.name_seen;
        complete.then_some(self.shape)
    }
}

/// An empty value is fine but for the fields that must be strings or a mapping.
fn null_value(field: Option<Field>) -> Option<()> {
    matches!(field, None | Some(Field::Sops)).then_some(())
}

/// Splits a line (after its indentation and any `- `) into a key and its value, or takes it for a scalar.
fn split(text: &str) -> Option<Line<'_>> {
    if text.starts_with(['"', '\'']) {
        let (key, after) = quoted(text)?;
        return match after {
            "" => Some(Line::Scalar),
            // A quoted key counts its quotes in YAML's limit.
            _ if key.len() + 2 > MAX_KEY_BYTES => None,
            ":" => Some(Line::Entry(key, None)),
            after => Some(Line::Entry(key, Some(after.strip_prefix(": ")?))),
        };
    }
    match text.find(':') {
        None => plain_value(text).map(|_| Line::Scalar),
        Some(colon) => {
            let after = &text[colon + 1..];
            let value = if after.is_empty() {
                None
            } else if let Some(value) = after.strip_prefix(' ') {
                Some(value)
            } else {
                // A colon inside a scalar (`http://…`), unless a key follows later on the line.
                return plain_value(text).map(|_| Line::Scalar);
            };
            let key = &text[..colon];
            if key.len() > MAX_KEY_BYTES || !plain_text(key) || plain_scalar_type(key).is_some() {
                return None;
            }
            Some(Line::Entry(key, value))
        }
    }
}

/// A quoted scalar without escapes at the start of `text`: its string, and what follows its closing quote.
fn quoted(text: &str) -> Option<(&str, &str)> {
    let quote = char::from(*text.as_bytes().first()?);
    let close = 1 + text[1..].find(quote)?;
    let inner = &text[1..close];
    (!inner.contains('\\')).then_some((inner, &text[close + 1..]))
}

/// A value written after `key: `.
fn parse_value(text: &str) -> Option<Value<'_>> {
    match text {
        "[]" => return Some(Value::EmptySequence),
        "{}" => return Some(Value::EmptyMapping),
        _ => {}
    }
    if text.starts_with(['"', '\'']) {
        let (inner, "") = quoted(text)? else {
            return None;
        };
        return Some(Value::Scalar {
            text: inner,
            plain: false,
        });
    }
    plain_value(text)
}

/// A plain scalar that is a whole value: no `: ` within and no `:` at its end (those would make it a key).
fn plain_value(text: &str) -> Option<Value<'_>> {
    (plain_text(text) && !text.contains(": ") && !text.ends_with(':'))
        .then_some(Value::Scalar { text, plain: true })
}

/// Text that reads as one plain scalar on one line: it starts with no indicator (`-` only before a character
/// that is not a space, as in `-1` or `--flag`), and holds no comment.
fn plain_text(text: &str) -> bool {
    let bytes = text.as_bytes();
    let Some(&first) = bytes.first() else {
        return false;
    };
    let starts_well = match first {
        b'-' => bytes.get(1).is_some_and(|&next| next != b' '),
        b'?' | b':' | b',' | b'[' | b']' | b'{' | b'}' | b'#' | b'&' | b'*' | b'!' | b'|'
        | b'>' | b'\'' | b'"' | b'%' | b'@' | b'`' | b' ' => false,
        _ => true,
    };
    starts_well && !text.contains(" #") && !text.ends_with(' ')
}

#[cfg(test)]
mod tests {
    use super::super::{validate_object_by_lines, validate_object_by_parser};

    /// Documents in the agent's style, each touching a part of the subset.
    const CANONICAL: &[&str] = &[
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  labels:\n    app.kubernetes.io/name: a\n  name: a\n  \
         namespace: ns-00\ndata:\n  ENDPOINT: http://a.ns-00.svc.cluster.local:8080\n  FEATURE_FLAGS: alpha,beta\n  \
         revision: \"7\"\n  empty: ''\n  yes-or-no: 'yes'\n",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  annotations:\n    example.com/note: \"a # not a comment\"\n  \
         name: web\n  namespace: shop\nspec:\n  replicas: 3\n  selector:\n    matchLabels:\n      app: web\n  \
         template:\n    metadata:\n      creationTimestamp: null\n      labels:\n        app: web\n    spec:\n      \
         containers:\n      - args:\n        - --port=8080\n        - -v\n        command: []\n        env:\n        \
         - name: A\n          value: \"1\"\n        - name: B\n          valueFrom:\n            fieldRef:\n              \
         fieldPath: metadata.namespace\n        image: registry.example.com:5000/web@sha256:0123\n        name: web\n        \
         ports:\n        - containerPort: 8080\n          protocol: TCP\n        resources: {}\n      \
         securityContext:\n        runAsUser: -1\n      volumes:\n      - emptyDir: {}\n        name: tmp\n",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\ndata:\n  password: ENC[AES256_GCM,data:abc,iv:def,tag:ghi,type:str]\n\
         sops:\n  age:\n  - enc: x\n    recipient: age1abc\n  lastmodified: \"2026-01-01T00:00:00Z\"\n  version: 3.9.0\n",
        "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n\"quoted key\": 1\n'single': 2\n\"<<\": 3\n\
         \"1\": one\nlist:\n- a\n- b: c\n  d: e\n-   spaced\nnested:\n  - x\n  - y\n",
    ];

    fn both(
        text: &str,
    ) -> (
        Option<super::ObjectShape>,
        Result<super::ObjectShape, String>,
    ) {
        (
            validate_object_by_lines(text.as_bytes()),
            validate_object_by_parser(text.as_bytes()).map_err(|e| e.to_string()),
        )
    }

    #[test]
    fn documents_in_the_agents_style_are_answered_by_lines_as_the_parser_answers() {
        for text in CANONICAL {
            let (lines, parser) = both(text);
            // `-   spaced` (an item after several spaces) is outside the subset: that document takes the parser.
            if text.contains("-   spaced") {
                assert_eq!(lines, None, "{text}");
                let text = text.replace("-   spaced", "- spaced");
                let (lines, parser) = both(&text);
                assert_eq!(lines.map(Ok), Some(parser), "{text}");
                continue;
            }
            assert!(lines.is_some(), "not taken by lines: {parser:?}\n{text}");
            assert_eq!(lines.map(Ok), Some(parser), "{text}");
        }
    }

    #[test]
    fn what_the_parser_refuses_is_never_accepted_by_lines() {
        let refused = [
            // A repeated key, a missing name, keys that are not strings, a plaintext value in the wrong place.
            "apiVersion: v1\nkind: A\nmetadata:\n  name: a\n  name: b\n",
            "apiVersion: v1\nkind: A\nmetadata:\n  name: a\ndata:\n  k: 1\n  \"k\": 2\n",
            "apiVersion: v1\nkind: A\nmetadata:\n  namespace: a\n",
            "apiVersion: v1\nkind: A\nmetadata:\n  name: a\ndata:\n  yes: 1\n",
            "apiVersion: v1\nkind: A\nmetadata:\n  name: a\ndata:\n  <<: 1\n",
            "apiVersion: 1.0\nkind: A\nmetadata:\n  name: a\n",
            "apiVersion: v1\nkind: \"\"\nmetadata:\n  name: a\n",
            "apiVersion: v1\nkind: A\nmetadata:\n  name:\n",
            "apiVersion: v1\nkind: A\nmetadata: {}\n",
            "apiVersion: v1\nkind: A\nmetadata:\n- name: a\n",
            // Tags, anchors, aliases, a second document, a comment, a multi-line scalar.
            "apiVersion: v1\nkind: A\nmetadata:\n  name: !x a\n",
            "apiVersion: v1\nkind: A\nmetadata: &m\n  name: a\nother: *m\n",
            "apiVersion: v1\nkind: A\nmetadata:\n  name: a\n---\napiVersion: v1\n",
            "apiVersion: v1\nkind: A\nmetadata:\n  name: a # comment\n",
            "apiVersion: v1\nkind: A\nmetadata:\n  name: a\n    b\n",
            "apiVersion: v1\nkind: A\nmetadata:\n  name: a\ndata:\n  k: a: b\n",
        ];
        for text in refused {
            assert_eq!(validate_object_by_lines(text.as_bytes()), None, "{text}");
        }
    }

    #[test]
    fn a_key_repeated_in_a_large_mapping_is_left_to_the_parser() {
        let data: String = (0..40).map(|i| format!("  key-{i}: v\n")).collect();
        let text = format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n{data}");
        assert!(validate_object_by_lines(text.as_bytes()).is_some());
        for repeated in ["key-0", "key-39", "\"key-17\""] {
            let text = format!("{text}  {repeated}: again\n");
            assert_eq!(
                validate_object_by_lines(text.as_bytes()),
                None,
                "{repeated}"
            );
            assert!(
                validate_object_by_parser(text.as_bytes()).is_err(),
                "{repeated}"
            );
        }
    }

    /// A small deterministic generator (xorshift), so that a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// Tokens that mean something to YAML, inserted anywhere.
    const TOKENS: &[&str] = &[
        " ",
        "  ",
        "-",
        "- ",
        ":",
        ": ",
        "#",
        " #",
        "\"",
        "'",
        "\n",
        "\\",
        "{}",
        "[]",
        "{",
        "}",
        "[",
        "]",
        ",",
        "|",
        ">",
        "&a ",
        "*a",
        "!t ",
        "?",
        "? ",
        "~",
        "<<",
        "=",
        "yes",
        "null",
        "1",
        "0x1",
        "1:20",
        "---",
        "...",
        "%",
        "@",
        "`",
        "\t",
        "\r",
        "name",
        "kind",
        "metadata",
        "apiVersion",
        "sops",
        "\u{85}",
        "\u{2028}",
        "\u{feff}",
        " :",
        ":x",
        "-x",
        "- -",
        "''",
        "\"\"",
        "\\\"",
        "'a'",
        "\"a\"",
    ];

    fn mutate(text: &str, rng: &mut Rng) -> String {
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(lines.len());
            match rng.below(6) {
                0 => {
                    let line = &mut lines[at];
                    let mut position = rng.below(line.len() + 1);
                    while !line.is_char_boundary(position) {
                        position -= 1;
                    }
                    line.insert_str(position, TOKENS[rng.below(TOKENS.len())]);
                }
                1 => {
                    let line = &mut lines[at];
                    let start = rng.below(line.len() + 1);
                    let end = (start + 1 + rng.below(8)).min(line.len());
                    if line.is_char_boundary(start) && line.is_char_boundary(end) && start < end {
                        line.replace_range(start..end, "");
                    }
                }
                2 => {
                    let copy = lines[at].clone();
                    lines.insert(rng.below(lines.len() + 1), copy);
                }
                3 if lines.len() > 1 => {
                    lines.remove(at);
                }
                4 => {
                    let line = &mut lines[at];
                    match rng.below(4) {
                        0 => line.insert(0, ' '),
                        1 => line.insert_str(0, "  "),
                        _ => {
                            let spaces = line.len() - line.trim_start_matches(' ').len();
                            line.replace_range(..spaces.min(1 + rng.below(2)), "");
                        }
                    }
                }
                _ => {
                    let other = rng.below(lines.len());
                    lines.swap(at, other);
                }
            }
        }
        let mut out = lines.join("\n");
        if rng.below(8) != 0 {
            out.push('\n');
        }
        out
    }

    /// Mutants of the documents above and of the raw objects in the fixtures: whenever the line scanner answers, the
    /// parser gives the same shape. The counts show both outcomes were exercised.
    #[test]
    fn mutated_documents_answered_by_lines_get_the_parsers_answer() {
        const ROUNDS: usize = 3000;
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/real-objects");
        let mut bases: Vec<String> = CANONICAL
            .iter()
            .map(|t| t.replace("-   spaced", "- spaced"))
            .collect();
        for entry in std::fs::read_dir(&fixtures).expect("the real-objects fixtures") {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                bases.push(std::fs::read_to_string(&path).unwrap());
            }
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut answered, mut declined, mut refused) = (0, 0, 0);
        for base in &bases {
            for _ in 0..ROUNDS {
                let text = mutate(base, &mut rng);
                let (lines, parser) = both(&text);
                match lines {
                    Some(shape) => {
                        answered += 1;
                        assert_eq!(
                            parser,
                            Ok(shape),
                            "the line scanner accepted what the parser answers otherwise:\n{text}"
                        );
                    }
                    None if parser.is_ok() => declined += 1,
                    None => refused += 1,
                }
            }
        }
        eprintln!(
            "mutants: {answered} answered by lines, {declined} accepted only by the parser, {refused} refused"
        );
        assert!(
            answered > 1000 && declined > 100 && refused > 1000,
            "{answered} / {declined} / {refused}"
        );
    }
}
