//! Golden tests: real API-server objects rendered as canonical YAML.
//!
//! Review changed `.snap` files by eye: they are exactly what lands in Git.

use std::path::{Path, PathBuf};

use reverser_agent::canonical::{parse_yaml, to_canonical_yaml};
use serde_json::Value;

fn fixtures() -> PathBuf {
    testkit::manifest_dir().join("../tests/fixtures")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn assert_golden(name: &str, obj: &Value) {
    let yaml = to_canonical_yaml(obj).expect("renders");
    // The golden file must also read back as the sanitized object.
    let back = parse_yaml(&yaml).expect("parses back");
    assert_eq!(back, reverser_agent::canonical::sanitize(obj), "{name}");
    insta::assert_snapshot!(name, yaml);
}

#[test]
fn renders_real_objects() {
    for name in ["service1", "secret1", "role", "pv1", "pod1"] {
        let obj = read_json(&fixtures().join(format!("real-objects/{name}-raw.json")));
        assert_golden(&format!("real__{name}"), &obj);
    }
}

#[test]
fn renders_real_list_items() {
    let list = read_json(&fixtures().join("real-objects/list1-raw.json"));
    let items = list["items"].as_array().expect("list1 has items");
    assert!(!items.is_empty());
    for item in items {
        let name = item["metadata"]["name"].as_str().expect("item name");
        assert_golden(&format!("real__list1__{name}"), item);
    }
}

/// Every object carried by a watch event (ADDED/MODIFIED/DELETED) in the
/// configmap and deployment captures; bookmarks and errors carry no object state.
#[test]
fn renders_watch_event_objects_from_apiserver_corpus() {
    let mut seen = 0;
    for kind in ["configmap", "deployment"] {
        let kind_dir = fixtures().join("apiserver-corpus").join(kind);
        let mut scenarios: Vec<_> = std::fs::read_dir(&kind_dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", kind_dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        scenarios.sort();
        for scenario in scenarios {
            let mut files: Vec<_> = std::fs::read_dir(&scenario)
                .expect("scenario dir")
                .map(|e| e.expect("dir entry").path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("watch.") && n.ends_with(".yaml"))
                })
                .collect();
            files.sort();
            for file in files {
                let text = std::fs::read_to_string(&file).expect("watch event");
                let event = parse_yaml(&text).expect("watch event is YAML");
                let kind_of_event = event["type"].as_str().expect("event type");
                if !matches!(kind_of_event, "ADDED" | "MODIFIED" | "DELETED") {
                    continue;
                }
                let stem = file.file_stem().and_then(|s| s.to_str()).expect("stem");
                let scenario_name = scenario.file_name().and_then(|s| s.to_str()).expect("name");
                let name = format!("corpus__{kind}__{scenario_name}__{stem}").replace('.', "_");
                assert_golden(&name, &event["object"]);
                seen += 1;
            }
        }
    }
    assert!(
        seen >= 10,
        "expected the corpus to hold watch events, saw {seen}"
    );
}
