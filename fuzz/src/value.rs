//! Kubernetes-shaped JSON values from fuzz input: either the input itself when it is a JSON object (so the seed
//! corpus can hold real objects from `tests/fixtures`, which libFuzzer then mutates), or a value built with
//! `arbitrary` from the bytes, with strings drawn half the time from spellings YAML readers treat specially.

use arbitrary::{Result, Unstructured};
use serde_json::{Map, Number, Value};

/// Strings that mean something else to some YAML reader, or that need quoting or escaping.
pub const TRICKY: &[&str] = &[
    "",
    " ",
    "y",
    "n",
    "Y",
    "N",
    "yes",
    "No",
    "on",
    "OFF",
    "true",
    "False",
    "null",
    "~",
    "Null",
    "<<",
    "=",
    "-",
    "?",
    ":",
    "- a",
    "? a",
    "a: b",
    "a #b",
    "#",
    "&a",
    "*a",
    "!a",
    "!!str",
    "%",
    "@",
    "`",
    "|",
    ">",
    "'",
    "\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    "1",
    "-1",
    "+1",
    "01",
    "09",
    "0o17",
    "0O17",
    "0x1F",
    "0X1F",
    "0b1",
    "0B1",
    "0b_",
    "0x_",
    "-_1",
    "1_000",
    "1:20",
    "0:30.5",
    "190:20:30.15",
    "1.5",
    "1.",
    ".5",
    "1e3",
    "1E+3",
    "1.0e+30",
    ".inf",
    "-.Inf",
    ".NaN",
    "2001-12-14",
    "2001-12-14t21:59:43.10-05:00",
    "2001-12-14 21:59:43.10 -5",
    "1.2.3",
    "v1",
    "\t",
    "\n",
    "a\nb",
    "a\r\nb",
    "\u{85}",
    "\u{2028}",
    "\u{feff}",
    "\u{0}",
    "\u{7f}",
    "é",
    "😀",
    "a ",
    " a",
    "a\t",
    "---",
    "...",
    "--- a",
    "\\",
    "%YAML",
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "sops",
    "data",
    "stringData",
    "creationTimestamp",
    "status",
    "annotations",
    "labels",
    "finalizers",
    "spec",
    "clusterIP",
];

/// A JSON object (never another JSON type) from the input: parsed when the input is a JSON object, built with
/// `arbitrary` otherwise.
pub fn object_from(data: &[u8]) -> Option<Map<String, Value>> {
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(data) {
        return Some(map);
    }
    let mut u = Unstructured::new(data);
    let mut map = Map::new();
    // Usually a Kubernetes object header, so the writer's checks get past the shape.
    if u.ratio(7, 8).ok()? {
        map.insert(
            "apiVersion".into(),
            Value::String(pick_string(&mut u).ok()?),
        );
        map.insert("kind".into(), Value::String(pick_string(&mut u).ok()?));
        let mut meta = Map::new();
        meta.insert("name".into(), Value::String(pick_string(&mut u).ok()?));
        map.insert("metadata".into(), Value::Object(meta));
    }
    let extra = object(&mut u, 4).ok()?;
    for (k, v) in extra {
        match (map.get_mut(&k), v) {
            (Some(Value::Object(existing)), Value::Object(more)) => existing.extend(more),
            (Some(_), _) => {}
            (None, v) => {
                map.insert(k, v);
            }
        }
    }
    Some(map)
}

/// A string: half the time one of [`TRICKY`], otherwise arbitrary.
pub fn pick_string(u: &mut Unstructured<'_>) -> Result<String> {
    if u.arbitrary::<bool>()? {
        Ok((*u.choose(TRICKY)?).to_owned())
    } else {
        let s: String = u.arbitrary()?;
        Ok(s.chars().take(64).collect())
    }
}

fn object(u: &mut Unstructured<'_>, depth: u32) -> Result<Map<String, Value>> {
    let mut map = Map::new();
    let len = u.int_in_range(0..=6)?;
    for _ in 0..len {
        let key = pick_string(u)?;
        let value = value(u, depth.saturating_sub(1))?;
        map.insert(key, value);
    }
    Ok(map)
}

/// Any JSON value, at most `depth` levels deep.
pub fn value(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let choice = u.int_in_range(0..=if depth == 0 { 5 } else { 7 })?;
    Ok(match choice {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::Number(Number::from(u.arbitrary::<i64>()?)),
        3 => match u.int_in_range(0..=2)? {
            0 => Value::Number(Number::from(u.arbitrary::<u64>()?)),
            _ => Number::from_f64(u.arbitrary::<f64>()?).map_or(Value::Null, Value::Number),
        },
        4 | 5 => Value::String(pick_string(u)?),
        6 => {
            let len = u.int_in_range(0..=4)?;
            let mut items = Vec::with_capacity(len);
            for _ in 0..len {
                items.push(value(u, depth - 1)?);
            }
            Value::Array(items)
        }
        _ => Value::Object(object(u, depth)?),
    })
}
