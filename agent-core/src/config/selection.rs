//! What ingestion mirrors and where: the resolved, access-checked view of the `GitDestination`, `WatchRule` and
//! `ClusterWatchRule` objects ([`super::resolve`] builds it). Discovery planning
//! ([`crate::ingest::discovery::desired_watches`]) asks it which types to watch, and each watch asks its rules
//! ([`crate::rules::compiled`]) which destination an object belongs to.

use std::collections::BTreeMap;

use crate::events::DestinationDecl;
use crate::rules::compiled::{CompiledRule, NamespaceLabels};

/// Everything ingestion needs to know about the custom resources.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selection {
    /// Destinations that at least one rule may write to (access already checked).
    pub destinations: Vec<DestinationDecl>,
    /// Rules that passed the access checks, each naming its destination.
    pub rules: Vec<CompiledRule>,
    /// Labels of every namespace, for `ClusterWatchRule` namespace selectors.
    pub namespace_labels: NamespaceLabels,
    /// Destination key → its `configbutler.ai/reconcile-requested-at` annotation: a new value restarts the
    /// watches feeding that destination (a fresh snapshot now).
    pub reconcile_requests: BTreeMap<String, String>,
}

impl Selection {
    /// The destination declaration for `key`, if declared.
    pub fn destination(&self, key: &str) -> Option<&DestinationDecl> {
        self.destinations.iter().find(|d| d.key == key)
    }
}
