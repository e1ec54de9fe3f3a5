//! Canonical YAML must read back to the same JSON value, both with serde-saphyr
//! and with a YAML 1.1 reader (PyYAML `safe_load`, which resolves scalars the way
//! go-yaml v2 inside kubectl, Flux and Argo CD does).

use std::io::Write;
use std::process::{Command, Stdio};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use reverser_agent::canonical::{parse_yaml, render, sanitize, to_canonical_yaml};
use reverser_common::yaml::validate_object;
use serde_json::{Map, Value, json};

/// Strings a naive YAML writer gets wrong: YAML 1.1 booleans and nulls, numbers
/// in every base, timestamps, indicators, significant whitespace, line breaks.
const ADVERSARIAL: &[&str] = &[
    "on",
    "On",
    "ON",
    "off",
    "yes",
    "Yes",
    "YES",
    "no",
    "No",
    "NO",
    "y",
    "Y",
    "n",
    "N",
    "true",
    "True",
    "TRUE",
    "false",
    "False",
    "null",
    "Null",
    "NULL",
    "~",
    "",
    "1",
    "0",
    "-1",
    "+1",
    "0x10",
    "0o17",
    "0b101",
    "010",
    "0777",
    "1e3",
    "1E3",
    "1.5",
    ".5",
    "1.",
    "1_000",
    "1:20",
    "1:20:30.5",
    ".inf",
    "-.inf",
    ".NaN",
    "nan",
    "2001-12-14",
    "2001-12-14T21:59:43.10-05:00",
    "=",
    "<<",
    "-",
    "--",
    "---",
    "...",
    "- x",
    "? x",
    ": x",
    "a: b",
    "a #b",
    "#c",
    "&a",
    "*a",
    "!tag",
    "!!str",
    "%YAML",
    "@x",
    "`x",
    "|",
    ">",
    "[a]",
    "{a: 1}",
    "'q'",
    "\"q\"",
    "a,b",
    " lead",
    "trail ",
    "  ",
    "\t",
    "a\tb",
    "\n",
    "\n\n",
    "line1\nline2",
    "line1\nline2\n",
    "line1\nline2\n\n",
    "  indented\nnext",
    "x \ny",
    "a\r\nb",
    "\r",
    "nul\u{0}",
    "bell\u{7}",
    "\u{feff}bom",
    "nel\u{85}x",
    "ls\u{2028}x",
    "é✓ 漢字 🚀",
    "C:\\path\\to",
    "key: |\n  block",
    "%25",
    "system:controller:foo",
];

fn adversarial_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(ADVERSARIAL).prop_map(str::to_owned),
        1 => any::<String>(),
        1 => "[ -~\n\t]{0,24}",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN/inf", |f| f.is_finite())
            .prop_map(Value::from),
        adversarial_string().prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(adversarial_string(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A Kubernetes-shaped object whose body is random.
fn object() -> impl Strategy<Value = Value> {
    (
        adversarial_string(),
        prop::collection::btree_map(adversarial_string(), adversarial_string(), 0..4),
        prop::collection::btree_map(adversarial_string(), json_value(), 0..6),
    )
        .prop_map(|(name, labels, body)| {
            let mut obj: Map<String, Value> = body.into_iter().collect();
            obj.insert("apiVersion".into(), json!("example.com/v1"));
            obj.insert("kind".into(), json!("Widget"));
            obj.insert(
                "metadata".into(),
                json!({"name": name, "labels": labels, "annotations": {"note": "x"}}),
            );
            Value::Object(obj)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn canonical_yaml_parses_back_to_the_sanitized_object(obj in object()) {
        let yaml = to_canonical_yaml(&obj).unwrap();
        prop_assert_eq!(parse_yaml(&yaml).unwrap(), sanitize(&obj));
    }

    #[test]
    fn rendering_is_idempotent(obj in object()) {
        let once = to_canonical_yaml(&obj).unwrap();
        let twice = render(&parse_yaml(&once).unwrap()).unwrap();
        prop_assert_eq!(twice, once);
    }

    #[test]
    fn rendering_has_canonical_framing(obj in object()) {
        let yaml = to_canonical_yaml(&obj).unwrap();
        prop_assert!(yaml.starts_with("apiVersion: "));
        prop_assert!(!yaml.starts_with("---"));
        prop_assert!(yaml.ends_with('\n'));
        prop_assert!(!yaml.contains('\r'), "CR must be escaped, never raw");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The writer refuses what YAML readers misread (tags, merge keys, keys that are not strings, a missing
    /// header); nothing the agent renders may be refused.
    #[test]
    fn canonical_yaml_passes_the_writers_check(obj in object()) {
        prop_assume!(obj["metadata"]["name"] != "");
        let yaml = to_canonical_yaml(&obj).unwrap();
        let checked = validate_object(yaml.as_bytes());
        prop_assert!(checked.is_ok(), "{:?}\n{}", checked, yaml);
    }
}

#[test]
fn the_writer_accepts_tricky_keys_names_and_kinds_as_rendered() {
    let mut data = Map::new();
    for (i, s) in ADVERSARIAL.iter().enumerate() {
        data.insert((*s).to_owned(), json!(i));
    }
    for s in ADVERSARIAL.iter().filter(|s| !s.is_empty()) {
        let obj = json!({
            "apiVersion": s, "kind": s, "metadata": {"name": s, "labels": {*s: s}},
            "data": data, "spec": {"nested": [{*s: {*s: s}}]}
        });
        let yaml = to_canonical_yaml(&obj).unwrap();
        if let Err(e) = validate_object(yaml.as_bytes()) {
            panic!("{s:?}: {e}\n{yaml}");
        }
    }
}

/// The golden snapshots are real objects exactly as they land in Git: the writer accepts every one.
#[test]
fn the_writer_accepts_every_golden_snapshot() {
    let dir = testkit::manifest_dir().join("tests/snapshots");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("agent/tests/snapshots") {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        // insta's header is a front-matter document: `---`, metadata, `---`, then the snapshot.
        let Some((_, yaml)) = text
            .strip_prefix("---\n")
            .and_then(|t| t.split_once("\n---\n"))
        else {
            continue;
        };
        if let Err(e) = validate_object(yaml.as_bytes()) {
            panic!("{}: {e}", path.display());
        }
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} snapshots found");
}

/// Parses each YAML document with PyYAML `safe_load` in one python3 process.
/// Missing python3 or PyYAML is a failure, not a skip: this is the YAML 1.1 check.
fn pyyaml_load_all(docs: &[String]) -> Vec<Value> {
    // Floats travel as repr strings: serde_json's default float parser is not
    // correctly rounded, Rust's `str::parse::<f64>` is.
    const SCRIPT: &str = "import json, sys, yaml\n\
        def tag(v):\n\
        \x20   if isinstance(v, float): return {'__float__': repr(v)}\n\
        \x20   if isinstance(v, list): return [tag(x) for x in v]\n\
        \x20   if isinstance(v, dict): return {k: tag(x) for k, x in v.items()}\n\
        \x20   return v\n\
        docs = json.load(sys.stdin)\n\
        print(json.dumps([tag(yaml.safe_load(d)) for d in docs]))\n";
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is required for the YAML 1.1 round-trip test (install python3 and `pip install pyyaml`)");
    let input = serde_json::to_vec(docs).expect("docs as JSON");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&input)
        .expect("writing to python3");
    let out = child.wait_with_output().expect("python3 runs");
    assert!(
        out.status.success(),
        "PyYAML failed (is it installed? `pip install pyyaml`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tagged: Vec<Value> = serde_json::from_slice(&out.stdout).expect("python3 printed JSON");
    tagged.into_iter().map(untag_floats).collect()
}

fn untag_floats(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(repr)) = map.get("__float__")
                && map.len() == 1
            {
                let f: f64 = repr.parse().expect("python float repr");
                return Value::from(f);
            }
            Value::Object(map.into_iter().map(|(k, v)| (k, untag_floats(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(untag_floats).collect()),
        other => other,
    }
}

#[test]
fn yaml_1_1_reader_reads_tricky_strings_back_unchanged() {
    let mut data = Map::new();
    for (i, s) in ADVERSARIAL.iter().enumerate() {
        data.insert(format!("v{i:03}"), json!(s));
        // The same strings as keys: `on:` or `<<:` as a key is just as dangerous.
        data.insert((*s).to_owned(), json!(i));
    }
    let obj = json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tricky"},
        "data": data,
        "numbers": [0, -1, 1.5, 1e300, 1e-7, 100.0, 18446744073709551615u64, -9223372036854775808i64],
        "flags": [true, false, null],
        "nested": {"list": ["on", ["no", {"yes": "off"}]], "empty": {}, "none": []}
    });
    let yaml = to_canonical_yaml(&obj).unwrap();
    let back = pyyaml_load_all(std::slice::from_ref(&yaml));
    assert_eq!(
        back[0],
        sanitize(&obj),
        "PyYAML read a different value from:\n{yaml}"
    );
    assert_eq!(parse_yaml(&yaml).unwrap(), sanitize(&obj));
}

#[test]
fn yaml_1_1_reader_reads_random_objects_back_unchanged() {
    let mut runner = TestRunner::deterministic();
    let strategy = object();
    let objects: Vec<Value> = (0..300)
        .map(|_| strategy.new_tree(&mut runner).expect("generate").current())
        .collect();
    let docs: Vec<String> = objects
        .iter()
        .map(|o| to_canonical_yaml(o).unwrap())
        .collect();
    let parsed = pyyaml_load_all(&docs);
    for ((obj, doc), back) in objects.iter().zip(&docs).zip(parsed) {
        assert_eq!(
            back,
            sanitize(obj),
            "PyYAML read a different value from:\n{doc}"
        );
    }
}
