//! The custom resources (`reverser-agent-api`, re-exported whole) and their manifests, rendered with the
//! canonical YAML encoder (the `crdgen` binary writes them to `crds/`; a test fails on drift).

pub use reverser_agent_api::*;

use crate::canonical::{self, CanonicalError};

/// One generated CRD manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedCrd {
    /// File name below `crds/`, e.g. `configbutler.ai_gitrepoconfigs.yaml`.
    pub file_name: String,
    /// Canonical YAML of the CustomResourceDefinition.
    pub yaml: String,
}

/// Renders every CRD with the canonical YAML encoder, ordered by file name.
pub fn generated_crds() -> Result<Vec<GeneratedCrd>, CanonicalError> {
    let crds = crds();
    let mut out = crds
        .iter()
        .map(|crd| {
            let value = serde_json::to_value(crd).expect("CRDs serialize to JSON");
            Ok(GeneratedCrd {
                file_name: format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural),
                yaml: canonical::render(&value)?,
            })
        })
        .collect::<Result<Vec<_>, CanonicalError>>()?;
    out.sort_by(|a, b| a.file_name.cmp(&b.file_name));
    Ok(out)
}
