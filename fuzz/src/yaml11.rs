//! How YAML 1.1 readers type a plain (unquoted, untagged) scalar, written from their sources rather than from
//! the project's own classifier, so the two can be compared:
//!
//! - PyYAML's implicit resolvers (`resolver.py`: bool, float, int, merge, null, timestamp, value);
//! - the YAML 1.1 spec's booleans `y`/`n` (go-yaml v2, used by kubectl, Flux and Argo CD, has them too);
//! - go-yaml v2's `resolve()`: a scalar starting with a sign or digit is an int when `strconv.ParseInt(s, 0, 64)`
//!   (or `ParseUint`) accepts it with every `_` removed (so `0X1F`, `0O17`, `-_1` are ints), else a float when
//!   it matches `yamlStyleFloat`; one starting with `.` is a float when `strconv.ParseFloat` accepts it.

use std::sync::OnceLock;

use regex::Regex;
use serde_json::Value;
use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle};

/// What a YAML 1.1 reader makes of a plain scalar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plain {
    Str,
    Null,
    Bool(bool),
    Int,
    Float,
    Timestamp,
    /// `<<` or `=`: keys with a meaning of their own.
    Special,
}

struct Resolvers {
    py_bool: Regex,
    py_float: Regex,
    py_int: Regex,
    py_null: Regex,
    py_timestamp: Regex,
    go_int: Regex,
    go_float: Regex,
    go_dot_float: Regex,
}

fn resolvers() -> &'static Resolvers {
    static R: OnceLock<Resolvers> = OnceLock::new();
    R.get_or_init(|| Resolvers {
        py_bool: Regex::new(r"^(?:yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$").unwrap(),
        py_float: Regex::new(
            r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        )
        .unwrap(),
        py_int: Regex::new(
            r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+)$",
        )
        .unwrap(),
        py_null: Regex::new(r"^(?:~|null|Null|NULL|)$").unwrap(),
        py_timestamp: Regex::new(
            r"^(?:[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]|[0-9][0-9][0-9][0-9]-[0-9][0-9]?-[0-9][0-9]?(?:[Tt]|[ \t]+)[0-9][0-9]?:[0-9][0-9]:[0-9][0-9](?:\.[0-9]*)?(?:[ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?)$",
        )
        .unwrap(),
        // strconv.ParseInt/ParseUint(s, 0, 64) syntax (range ignored: out of range falls to the float check,
        // which accepts every decimal digit string anyway).
        go_int: Regex::new(r"^[-+]?(?:0[bB][01]+|0[oO][0-7]+|0[xX][0-9a-fA-F]+|[0-9]+)$").unwrap(),
        go_float: Regex::new(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$").unwrap(),
        go_dot_float: Regex::new(r"^\.[0-9]+(?:[eE][-+]?[0-9]+)?$").unwrap(),
    })
}

/// PyYAML's reading of a plain scalar.
pub fn pyyaml(s: &str) -> Plain {
    let r = resolvers();
    if r.py_bool.is_match(s) {
        return Plain::Bool(s.starts_with(['y', 'Y', 't', 'T']) || s.eq_ignore_ascii_case("on"));
    }
    if r.py_null.is_match(s) {
        return Plain::Null;
    }
    if s == "<<" || s == "=" {
        return Plain::Special;
    }
    if r.py_int.is_match(s) {
        return Plain::Int;
    }
    if r.py_float.is_match(s) {
        return Plain::Float;
    }
    if r.py_timestamp.is_match(s) {
        return Plain::Timestamp;
    }
    Plain::Str
}

/// go-yaml v2's reading of a plain scalar (timestamps aside: v2 keeps them as strings for untyped targets).
pub fn go_yaml_v2(s: &str) -> Plain {
    match s {
        "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True" | "TRUE" => {
            return Plain::Bool(true);
        }
        "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False" | "FALSE" => {
            return Plain::Bool(false);
        }
        "" | "~" | "null" | "Null" | "NULL" => return Plain::Null,
        ".nan" | ".NaN" | ".NAN" | ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF"
        | "-.inf" | "-.Inf" | "-.INF" => return Plain::Float,
        "<<" => return Plain::Special,
        _ => {}
    }
    let r = resolvers();
    match s.as_bytes()[0] {
        b'+' | b'-' | b'0'..=b'9' => {
            let plain = s.replace('_', "");
            if r.go_int.is_match(&plain) {
                // `09` fails ParseInt (octal) but is then a float: a number either way.
                return Plain::Int;
            }
            if r.go_float.is_match(&plain) {
                return Plain::Float;
            }
            Plain::Str
        }
        b'.' if r.go_dot_float.is_match(s) => Plain::Float,
        _ => Plain::Str,
    }
}

/// Whether every YAML 1.1 reader modelled here reads the plain scalar `s` as the string `s`.
pub fn plain_is_string(s: &str) -> bool {
    pyyaml(s) == Plain::Str && go_yaml_v2(s) == Plain::Str && !matches!(s, "y" | "Y" | "n" | "N")
}

/// Whether every modelled reader reads the plain scalar `s` as a number.
pub fn plain_is_number(s: &str) -> bool {
    matches!(pyyaml(s), Plain::Int | Plain::Float)
        && matches!(go_yaml_v2(s), Plain::Int | Plain::Float)
}

/// Walks the YAML `text` (one document) against the JSON `value` it should carry and says where a YAML 1.1
/// reader would read something else: a plain scalar that such a reader types differently from the JSON value, a
/// plain key that is not a string to it, a missing or extra key or item, a tag, an anchor or an alias.
pub fn check_reads_as(text: &str, value: &Value) -> Result<(), String> {
    let mut parser = Parser::new_from_str(text);
    let mut events = Vec::new();
    while let Some(next) = parser.next_event() {
        let (event, _) = next.map_err(|e| format!("parse error: {e}"))?;
        match event {
            Event::StreamStart | Event::DocumentStart(..) | Event::Anchor(..) => {}
            Event::StreamEnd => break,
            other => events.push(other),
        }
    }
    let mut events = events.into_iter();
    let first = events.next().ok_or("no node")?;
    node(first, value, &mut events, "")?;
    match events.next() {
        Some(Event::DocumentEnd) => {}
        other => return Err(format!("not one node: {other:?}")),
    }
    match events.next() {
        None => Ok(()),
        Some(other) => Err(format!("more than one document: {other:?}")),
    }
}

fn node<'t>(
    event: Event<'t>,
    value: &Value,
    events: &mut impl Iterator<Item = Event<'t>>,
    at: &str,
) -> Result<(), String> {
    match (event, value) {
        (Event::MappingStart(_, anchor, tag), Value::Object(map)) => {
            if anchor != 0 || tag.is_some() {
                return Err(format!("{at}: anchor or tag on a mapping"));
            }
            let mut seen = std::collections::HashSet::new();
            loop {
                let key = match pull(events, at)? {
                    Event::MappingEnd => break,
                    Event::Scalar(key, style, anchor, tag) => {
                        if anchor != 0 || tag.is_some() {
                            return Err(format!("{at}: anchor or tag on key {key:?}"));
                        }
                        if style == ScalarStyle::Plain && !plain_is_string(&key) {
                            return Err(format!(
                                "{at}: plain key {key:?} is not a string to a YAML 1.1 reader (PyYAML {:?}, go-yaml v2 {:?})",
                                pyyaml(&key),
                                go_yaml_v2(&key)
                            ));
                        }
                        key.into_owned()
                    }
                    other => return Err(format!("{at}: key is not a scalar: {other:?}")),
                };
                let Some(item) = map.get(&key) else {
                    return Err(format!("{at}: key {key:?} is not in the value"));
                };
                if !seen.insert(key.clone()) {
                    return Err(format!("{at}: key {key:?} twice"));
                }
                let event = pull(events, at)?;
                node(event, item, events, &format!("{at}/{key}"))?;
            }
            if seen.len() != map.len() {
                return Err(format!(
                    "{at}: {} keys rendered, the value has {}",
                    seen.len(),
                    map.len()
                ));
            }
            Ok(())
        }
        (Event::SequenceStart(_, anchor, tag), Value::Array(items)) => {
            if anchor != 0 || tag.is_some() {
                return Err(format!("{at}: anchor or tag on a sequence"));
            }
            let mut index = 0;
            loop {
                let event = pull(events, at)?;
                if matches!(event, Event::SequenceEnd) {
                    break;
                }
                let item = items
                    .get(index)
                    .ok_or_else(|| format!("{at}: more items than the value"))?;
                node(event, item, events, &format!("{at}/{index}"))?;
                index += 1;
            }
            if index != items.len() {
                return Err(format!(
                    "{at}: {index} items rendered, the value has {}",
                    items.len()
                ));
            }
            Ok(())
        }
        (Event::Scalar(text, style, anchor, tag), scalar) => {
            if anchor != 0 || tag.is_some() {
                return Err(format!("{at}: anchor or tag on scalar {text:?}"));
            }
            let plain = style == ScalarStyle::Plain;
            let ok = match scalar {
                Value::String(s) => *s == text && (!plain || plain_is_string(&text)),
                Value::Null => {
                    plain && pyyaml(&text) == Plain::Null && go_yaml_v2(&text) == Plain::Null
                }
                Value::Bool(b) => {
                    plain
                        && pyyaml(&text) == Plain::Bool(*b)
                        && go_yaml_v2(&text) == Plain::Bool(*b)
                }
                Value::Number(n) => plain && plain_is_number(&text) && same_number(&text, n),
                _ => false,
            };
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "{at}: {} scalar {text:?} does not read as {scalar} (PyYAML {:?}, go-yaml v2 {:?})",
                    if plain { "plain" } else { "quoted" },
                    pyyaml(&text),
                    go_yaml_v2(&text)
                ))
            }
        }
        (event, value) => Err(format!("{at}: event {event:?} for value {value}")),
    }
}

fn pull<'t>(events: &mut impl Iterator<Item = Event<'t>>, at: &str) -> Result<Event<'t>, String> {
    events
        .next()
        .ok_or_else(|| format!("{at}: events end early"))
}

/// Whether the plain number `text` (already known to be a YAML 1.1 number) is `n`.
fn same_number(text: &str, n: &serde_json::Number) -> bool {
    let plain = text.replace('_', "");
    if let Some(i) = n.as_i64() {
        return plain.parse::<i64>() == Ok(i);
    }
    if let Some(u) = n.as_u64() {
        return plain.parse::<u64>() == Ok(u);
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    plain.parse::<f64>().is_ok_and(|g| g == f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_spellings() {
        for s in [
            "yes",
            "y",
            "N",
            "off",
            "~",
            "",
            "1",
            "0x1F",
            "0X1F",
            "0o17",
            "-_1",
            "1:20",
            "0:30.5",
            "1.5",
            "1e3",
            ".5",
            "2001-12-14",
            "<<",
            "=",
            "0b_",
            "0x_",
        ] {
            assert!(!plain_is_string(s), "{s}");
        }
        for s in [
            "a", "1.2.3", "v1", "0x", "e5", ".", "1e", "-", "+", "x1", "_1", "1-2",
        ] {
            assert!(plain_is_string(s), "{s}");
        }
        for s in ["1", "-2", "1.5", "1.0e+30", "0.5"] {
            assert!(plain_is_number(s), "{s}");
        }
        assert!(
            !plain_is_number("1e30"),
            "PyYAML needs a dot and an exponent sign"
        );
    }
}
