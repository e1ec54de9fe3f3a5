//! Property test of the comment-preserving editor: for random objects rendered the way people edit files (keys
//! in any order, comments above and beside entries, 2- or 4-space indentation, indented or flush list dashes,
//! quoted or plain strings), changed at random (values, added and removed keys, list items added, removed and
//! changed), the edit towards the canonical rendering of the changed object always succeeds and always reads
//! back as that object.

use proptest::prelude::*;
use reverser_common::{yaml, yaml_edit};
use serde_json::{Map, Value, json};

/// splitmix64: the choices of one case, reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const KEYS: &[&str] = &[
    "apiVersion",
    "data",
    "env",
    "image",
    "labels",
    "on",
    "ports",
    "replicas",
    "spec",
    "value",
    "x-y",
    "yes",
    "zone",
];
const WORDS: &[&str] = &[
    "a",
    "web",
    "yes",
    "no",
    "on",
    "true",
    "null",
    "1",
    "0x1f",
    "1:20",
    "a b",
    "a: b",
    "# not a comment",
    "it's",
    "say \"hi\"",
    "",
    "multi\nline",
    "~",
    "2001-12-14",
    "-x",
];

fn scalar(rng: &mut Rng) -> Value {
    match rng.below(5) {
        0 => json!(rng.chance(50)),
        1 => json!(rng.below(2000) as i64 - 1000),
        2 => Value::Null,
        _ => json!(WORDS[rng.below(WORDS.len())]),
    }
}

fn value(rng: &mut Rng, depth: usize) -> Value {
    match if depth == 0 { 0 } else { rng.below(6) } {
        0..=2 => scalar(rng),
        3 => Value::Object(map(rng, depth - 1)),
        4 => Value::Array((0..rng.below(4)).map(|_| scalar(rng)).collect()),
        _ => Value::Array(
            (0..rng.below(4))
                .map(|i| named(rng, &format!("item-{i}"), depth - 1))
                .collect(),
        ),
    }
}

fn named(rng: &mut Rng, name: &str, depth: usize) -> Value {
    let mut m = map(rng, depth);
    m.insert("name".into(), json!(name));
    Value::Object(m)
}

fn map(rng: &mut Rng, depth: usize) -> Map<String, Value> {
    let mut m = Map::new();
    for _ in 0..rng.below(5) {
        m.insert(KEYS[rng.below(KEYS.len())].into(), value(rng, depth));
    }
    m
}

/// A random change somewhere in `v`.
fn mutate(rng: &mut Rng, v: &mut Value, depth: usize) {
    match v {
        Value::Object(m) if !m.is_empty() && rng.chance(80) => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let key = &keys[rng.below(keys.len())];
            match rng.below(4) {
                0 => {
                    m.remove(key);
                }
                1 => {
                    m.insert(KEYS[rng.below(KEYS.len())].into(), value(rng, depth));
                }
                _ => mutate(rng, m.get_mut(key).expect("present"), depth + 1),
            }
        }
        Value::Array(items) if !items.is_empty() && rng.chance(80) => {
            let i = rng.below(items.len());
            match rng.below(4) {
                0 => {
                    items.remove(i);
                }
                1 if items[i].get("name").is_some() => {
                    let name = format!("new-{}", rng.below(1000));
                    if !items.iter().any(|x| x["name"] == json!(name)) {
                        items.insert(rng.below(items.len() + 1), named(rng, &name, 1));
                    }
                }
                _ => mutate(rng, &mut items[i], depth + 1),
            }
        }
        _ => *v = value(rng, 2usize.saturating_sub(depth)),
    }
}

/// Renders a value as a person might have written it.
struct Person {
    rng: Rng,
    step: usize,
    flush_dashes: bool,
    out: String,
}

impl Person {
    fn scalar(&mut self, v: &Value) -> String {
        match v {
            Value::String(s) => {
                if !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase()) && self.rng.chance(30)
                {
                    // Plain only when every reader takes it for a string.
                    if !["yes", "no", "on", "off", "true", "false", "null", "y", "n"]
                        .contains(&s.as_str())
                    {
                        return s.clone();
                    }
                }
                if !s.contains('\n') && self.rng.chance(30) {
                    format!("'{}'", s.replace('\'', "''"))
                } else {
                    serde_json::to_string(s).unwrap()
                }
            }
            Value::Object(m) if m.is_empty() => "{}".into(),
            Value::Array(a) if a.is_empty() => "[]".into(),
            other => other.to_string(),
        }
    }

    fn comment_above(&mut self, indent: usize) {
        if self.rng.chance(30) {
            self.out.push_str(&" ".repeat(indent));
            self.out.push_str("# a note: with - dashes\n");
        }
    }

    fn line_end(&mut self) {
        if self.rng.chance(30) {
            self.out.push_str(" # why");
        }
        self.out.push('\n');
    }

    fn is_leaf(v: &Value) -> bool {
        match v {
            Value::Object(m) => m.is_empty(),
            Value::Array(a) => a.is_empty(),
            _ => true,
        }
    }

    /// Entries of `m` at `indent`; the first one's indentation is already written when `first_written`.
    fn map(&mut self, m: &Map<String, Value>, indent: usize, mut first_written: bool) {
        let mut keys: Vec<&String> = m.keys().collect();
        for i in (1..keys.len()).rev() {
            keys.swap(i, self.rng.below(i + 1));
        }
        for key in keys {
            if !first_written {
                self.comment_above(indent);
                self.out.push_str(&" ".repeat(indent));
            }
            first_written = false;
            let v = &m[key];
            let key_text = if ["on", "yes"].contains(&key.as_str()) {
                format!("\"{key}\"")
            } else {
                key.clone()
            };
            if Self::is_leaf(v) {
                let text = self.scalar(v);
                self.out.push_str(&format!("{key_text}: {text}"));
                self.line_end();
            } else {
                self.out.push_str(&format!("{key_text}:"));
                self.line_end();
                self.node(v, indent + self.step);
            }
        }
    }

    fn node(&mut self, v: &Value, indent: usize) {
        match v {
            Value::Object(m) => self.map(m, indent, false),
            Value::Array(items) => {
                let dash = if self.flush_dashes {
                    indent - self.step
                } else {
                    indent
                };
                for item in items {
                    self.comment_above(dash);
                    self.out.push_str(&" ".repeat(dash));
                    self.out.push_str("- ");
                    match item {
                        Value::Object(m) if !m.is_empty() => self.map(m, dash + 2, true),
                        Value::Array(a) if !a.is_empty() => {
                            let text = serde_json::to_string(item).unwrap();
                            self.out.push_str(&text);
                            self.line_end();
                        }
                        leaf => {
                            let text = self.scalar(leaf);
                            self.out.push_str(&text);
                            self.line_end();
                        }
                    }
                }
            }
            _ => unreachable!("leaves are written on their key's line"),
        }
    }
}

fn person(seed: u64, v: &Map<String, Value>) -> String {
    let mut rng = Rng(seed ^ 0x5555);
    let step = if rng.chance(50) { 2 } else { 4 };
    let flush_dashes = rng.chance(50);
    let mut p = Person {
        rng,
        step,
        flush_dashes,
        out: String::from("# kept by hand\n"),
    };
    p.map(v, 0, false);
    p.out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn edits_always_read_as_the_desired_object(seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let mut before = map(&mut rng, 3);
        before.insert("apiVersion".into(), json!("v1"));
        before.insert("kind".into(), json!("Thing"));
        let existing = person(seed, &before);
        prop_assert_eq!(
            yaml::parse_document(existing.as_bytes()).unwrap(),
            Value::Object(before.clone()),
            "the person's rendering reads as the object:\n{}", existing
        );
        let mut after = Value::Object(before);
        for _ in 0..1 + rng.below(3) {
            mutate(&mut rng, &mut after, 0);
        }
        if !after.is_object() || after.as_object().is_some_and(Map::is_empty) {
            return Ok(());
        }
        let desired = serde_saphyr::to_string(&after).unwrap();
        match yaml_edit::edit_in_place(&existing, &desired) {
            Ok(edited) => {
                prop_assert_eq!(
                    yaml::parse_document(edited.as_bytes()).unwrap(),
                    yaml::parse_document(desired.as_bytes()).unwrap(),
                    "existing:\n{}\ndesired:\n{}\nedited:\n{}", existing, desired, edited
                );
                prop_assert!(edited.starts_with("# kept by hand\n"), "{}", edited);
            }
            Err(fallback) => prop_assert!(
                false,
                "fell back ({}):\nexisting:\n{}\ndesired:\n{}", fallback, existing, desired
            ),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Arbitrary YAML-ish text on both sides (indentation, comments, flow and block markers, quotes, CRLF, tabs):
    /// never a panic, and an edit, when there is one, reads as the desired document.
    #[test]
    fn any_text_edits_or_falls_back(
        existing in "((# c\n)?( {0,4}|  - |- )(a|b|c|on|\"d\"|'e')(:|: )(1|x|y|'x'|\"z\"|\\{\\}|\\[x\\]|\\|\n   t|&a x|\\*a|!t x|[a-c]: 2)?( #c)?\n){0,10}",
        desired in "(( {0,4}|  - |- )(a|b|c|on|\"d\")(: )(1|x|'x'|\\{\\}|\\[x\\]|[a-c]: 2)?\n){0,10}",
        crlf in any::<bool>(),
    ) {
        let existing = if crlf { existing.replace('\n', "\r\n") } else { existing };
        if let Ok(edited) = yaml_edit::edit_in_place(&existing, &desired) {
            prop_assert_eq!(
                yaml::parse_document(edited.as_bytes()).ok(),
                yaml::parse_document(desired.as_bytes()).ok(),
                "existing:\n{}\ndesired:\n{}\nedited:\n{}", existing, desired, edited
            );
        }
        let _ = yaml_edit::same_layout(existing.as_bytes(), desired.as_bytes());
    }
}
