//! The agent's canonical YAML renderer: every object it renders reads back as the same value with the project's
//! reader, reads as the same value in YAML 1.1 (PyYAML, go-yaml v2: no plain scalar that such a reader types
//! differently, no tags, anchors or aliases), passes the writer's YAML check, and renders to the same bytes again
//! (no churn). Sanitizing is idempotent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reverser_agent::canonical;
use reverser_common::yaml;
use reverser_fuzz::{value, yaml11};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some(map) = value::object_from(data) else {
        return;
    };
    let object = Value::Object(map);
    let sanitized = canonical::sanitize(&object);
    assert_eq!(
        canonical::sanitize(&sanitized),
        sanitized,
        "sanitize is not idempotent"
    );
    for value in [&object, &sanitized] {
        let rendered = match canonical::render(value) {
            Ok(rendered) => rendered,
            Err(error) => panic!("render refused an object: {error}"),
        };
        assert!(rendered.ends_with('\n'));
        let back = canonical::parse_yaml(&rendered)
            .unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}\n{rendered}"));
        assert_eq!(&back, value, "round trip changed the value:\n{rendered}");
        yaml11::check_reads_as(&rendered, value).unwrap_or_else(|e| panic!("{e}\n{rendered}"));
        assert_eq!(
            canonical::render(&back).ok().as_deref(),
            Some(rendered.as_str()),
            "re-render differs"
        );
        // The writer accepts whatever the agent renders for a Kubernetes object.
        let is_object = ["apiVersion", "kind"]
            .iter()
            .all(|k| value[k].as_str().is_some_and(|s| !s.is_empty()))
            && value["metadata"]["name"]
                .as_str()
                .is_some_and(|s| !s.is_empty());
        if is_object {
            if let Err(error) = yaml::validate_object(rendered.as_bytes()) {
                panic!("the writer refuses what the agent renders: {error}\n{rendered}");
            }
            assert!(yaml::semantically_equal(
                rendered.as_bytes(),
                rendered.as_bytes()
            ));
        }
    }
});
