//! The checked-in `crds/` must be exactly what `crdgen` generates.

use std::collections::BTreeSet;

use reverser_agent::crd::generated_crds;

const HINT: &str = "run `cargo run -p reverser-agent --bin crdgen` and commit crds/";

#[test]
fn checked_in_crds_match_generated_output() {
    let dir = testkit::manifest_dir().join("../crds");
    let generated = generated_crds().expect("CRDs render");
    for crd in &generated {
        let path = dir.join(&crd.file_name);
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; {HINT}", path.display()));
        assert!(
            on_disk == crd.yaml,
            "{} is out of date; {HINT}",
            path.display()
        );
    }
    let expected: BTreeSet<String> = generated.into_iter().map(|c| c.file_name).collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("crds/ exists")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("configbutler.ai_") && n.ends_with(".yaml"))
        .collect();
    assert_eq!(present, expected, "stale CRD files in crds/; {HINT}");
}
