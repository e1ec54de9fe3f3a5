//! The comment-preserving editor (`common::yaml_edit`): for any existing text and any desired document it never
//! panics, and what it returns reads back as the desired value (else it must fall back). The input is the
//! existing text, a NUL byte, and the desired text; the desired text is tried as it is and, when it reads as an
//! object, as the agent's canonical rendering of that object (what the writer really passes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use reverser_agent::canonical;
use reverser_common::{yaml, yaml_edit};
use serde_json::Value;

fn check(existing: &str, desired: &str) {
    let _ = yaml_edit::same_layout(existing.as_bytes(), desired.as_bytes());
    if let Ok(edited) = yaml_edit::edit_in_place(existing, desired) {
        let want = yaml::parse_document(desired.as_bytes())
            .expect("an edit is only returned for a readable desired document");
        let got = yaml::parse_document(edited.as_bytes())
            .unwrap_or_else(|e| panic!("the edit does not parse: {e}\n{edited}"));
        assert_eq!(got, want, "the edit reads as another value:\n{edited}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(split) = data.iter().position(|&b| b == 0) else {
        return;
    };
    let (Ok(existing), Ok(desired)) = (
        std::str::from_utf8(&data[..split]),
        std::str::from_utf8(&data[split + 1..]),
    ) else {
        return;
    };
    check(existing, desired);
    if let Ok(value @ Value::Object(_)) = yaml::parse_document(desired.as_bytes())
        && let Ok(rendered) = canonical::render(&value)
    {
        check(existing, &rendered);
    }
});
