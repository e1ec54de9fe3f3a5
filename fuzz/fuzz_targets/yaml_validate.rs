//! The writer's YAML check (`validate_object`: a line scanner for the agent's plain style, else an event walk)
//! against the value parser (`parse_object`), an independent YAML 1.1 resolver and the semantic comparison: whatever
//! the writer accepts parses to a Kubernetes object with the shape it reported, has only string keys for YAML 1.1
//! readers, and survives a canonical re-render unchanged. Whenever the line scanner answers, the event walk gives the
//! same answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reverser_agent::canonical;
use reverser_common::yaml;
use reverser_fuzz::yaml11;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    check_one(data);
    // The semantic comparison on two halves: never panics, is symmetric, and reflexive.
    let (a, b) = data.split_at(data.len() / 2);
    assert_eq!(
        yaml::semantically_equal(a, b),
        yaml::semantically_equal(b, a)
    );
    assert!(yaml::semantically_equal(a, a));
    if let (Ok(x), Ok(y)) = (yaml::parse_document(a), yaml::parse_document(b)) {
        assert_eq!(yaml::semantically_equal(a, b), x == y);
    }
});

fn check_one(data: &[u8]) {
    if let Some(shape) = yaml::validate_object_by_lines(data) {
        assert_eq!(
            yaml::validate_object_by_parser(data).map_err(|e| e.to_string()),
            Ok(shape),
            "the line scanner accepts what the event walk answers otherwise"
        );
    }
    let parsed = yaml::parse_object(data);
    let Ok(shape) = yaml::validate_object(data) else {
        return;
    };
    let value = match parsed {
        Ok(value) => value,
        Err(error) => panic!("validate_object accepts a document parse_object refuses: {error}"),
    };
    assert_eq!(value["apiVersion"].as_str(), shape.api_version.as_deref());
    assert_eq!(value["kind"].as_str(), shape.kind.as_deref());
    assert!(
        value["metadata"]["name"]
            .as_str()
            .is_some_and(|n| !n.is_empty()),
        "accepted without a metadata.name string: {value}"
    );
    assert_eq!(shape.sops, value.get("sops").is_some_and(Value::is_object));
    // Plain keys are strings to YAML 1.1 readers too (the walk compares keys only loosely for values: the
    // document is the client's, not canonical, so only keys are held to the YAML 1.1 rule).
    let text = std::str::from_utf8(data).expect("accepted text is UTF-8");
    check_keys(text);
    // Canonical re-render: same value, accepted again, semantically equal, and stable.
    let rendered = canonical::render(&value).expect("an accepted object renders");
    assert_eq!(
        canonical::parse_yaml(&rendered).expect("rendered YAML parses"),
        value
    );
    assert_eq!(
        yaml::validate_object(rendered.as_bytes())
            .map(|s| s == shape)
            .ok(),
        Some(true)
    );
    assert!(yaml::semantically_equal(data, rendered.as_bytes()));
    yaml11::check_reads_as(&rendered, &value)
        .unwrap_or_else(|e| panic!("re-rendered: {e}\n{rendered}"));
}

/// Every plain mapping key reads as a string in YAML 1.1.
fn check_keys(text: &str) {
    use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle};
    let mut parser = Parser::new_from_str(text);
    // Per open collection: Some(expecting_key) for mappings, None for sequences.
    let mut stack: Vec<Option<bool>> = Vec::new();
    while let Some(next) = parser.next_event() {
        let (event, _) = next.expect("accepted text parses");
        let is_node = matches!(
            event,
            Event::Scalar(..) | Event::SequenceStart(..) | Event::MappingStart(..)
        );
        if is_node && let Some(Some(expecting_key)) = stack.last_mut() {
            if *expecting_key && let Event::Scalar(key, ScalarStyle::Plain, _, _) = &event {
                assert!(
                    yaml11::plain_is_string(key),
                    "accepted plain key {key:?} is not a string to a YAML 1.1 reader (PyYAML {:?}, go-yaml v2 {:?})",
                    yaml11::pyyaml(key),
                    yaml11::go_yaml_v2(key)
                );
            }
            *expecting_key = !*expecting_key;
        }
        match event {
            Event::MappingStart(..) => stack.push(Some(true)),
            Event::SequenceStart(..) => stack.push(None),
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
            }
            _ => {}
        }
    }
}
