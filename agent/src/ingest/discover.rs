//! Which types the API server serves: the network half of discovery. The planner that turns the discovered
//! types and the selection into watches is pure and lives in `reverser_agent_core::ingest::discovery`
//! (re-exported as [`super::discovery`]).

use std::collections::{BTreeMap, BTreeSet};

use kube::Client;
use kube::discovery::{Discovery, Scope, verbs};
use tracing::debug;

use super::discovery::DiscoveredResource;

/// Discovery failures.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("API discovery failed: {0}")]
    Api(#[from] kube::Error),
}

/// Lists every type the server serves with `list` and `watch`, at its preferred version.
///
/// Tries aggregated discovery first (two requests), and falls back to the legacy per-group
/// walk when it fails or finds nothing: kube-rs's `run_aggregated()` silently returns zero
/// groups against servers without aggregated discovery.
pub async fn discover(client: &Client) -> Result<Vec<DiscoveredResource>, DiscoveryError> {
    let aggregated = match Discovery::new(client.clone()).run_aggregated().await {
        Ok(d) if d.groups().next().is_some() => Some(d),
        Ok(_) => {
            debug!("aggregated discovery returned no groups; using legacy discovery");
            None
        }
        Err(e) => {
            debug!(error = %e, "aggregated discovery failed; using legacy discovery");
            None
        }
    };
    let discovery = match aggregated {
        Some(d) => d,
        None => Discovery::new(client.clone()).run().await?,
    };
    Ok(from_discovery(&discovery))
}

/// Flattens a kube-rs discovery: one entry per (group, resource) that supports list and watch,
/// at the group's preferred version, or, for a resource the preferred version lacks, the first
/// version (in the server's priority order) that serves it. The other versions that serve the
/// resource are its [`DiscoveredResource::superseded`] ones.
pub fn from_discovery(discovery: &Discovery) -> Vec<DiscoveredResource> {
    let mut out = Vec::new();
    for group in discovery.groups() {
        let mut served: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for version in group.versions() {
            for (ar, _) in group.versioned_resources(version) {
                served
                    .entry(ar.plural.clone())
                    .or_default()
                    .insert(version.to_owned());
            }
        }
        let preferred = group.preferred_version_or_latest().to_owned();
        let mut versions = vec![preferred.clone()];
        versions.extend(
            group
                .versions()
                .filter(|v| *v != preferred)
                .map(str::to_owned),
        );
        let mut seen = BTreeSet::new();
        for version in versions {
            for (ar, caps) in group.versioned_resources(&version) {
                if ar.plural.contains('/')
                    || !caps.supports_operation(verbs::LIST)
                    || !caps.supports_operation(verbs::WATCH)
                    || !seen.insert(ar.plural.clone())
                {
                    continue;
                }
                let others = served.get(&ar.plural).cloned().unwrap_or_default();
                out.push(
                    DiscoveredResource::new(
                        &ar.group,
                        &ar.version,
                        &ar.plural,
                        &ar.kind,
                        caps.scope == Scope::Namespaced,
                    )
                    .with_superseded(others),
                );
            }
        }
    }
    out.sort();
    out
}
