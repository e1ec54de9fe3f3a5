//! While leading: keeps the `ValidatingWebhookConfiguration` listing exactly the watched types.

use std::collections::BTreeSet;
use std::time::Duration;

use reverser_common::backoff::Backoff;
use tokio::sync::watch;
use tracing::{info, warn};

use super::registration::{self, Applied, Registration};
use crate::rules::ResourceKey;

/// How often the leader checks that the configuration it applied still exists.
const CHECK_EVERY: Duration = Duration::from_secs(15);

/// Field manager of what the agent applies.
pub const FIELD_MANAGER: &str = "gitops-reverser";

/// Server-side applies the configuration whenever the set of watched types changes (and once at the start of
/// each term), so the API server calls the webhook for exactly the types a watch can attribute. `synced` turns
/// true once the controller published its first selection; `watched_types` reads what ingestion watches now
/// (`None` before its first plan). Runs until its task is aborted.
pub async fn keep_configuration_in_sync(
    client: kube::Client,
    registration: Registration,
    synced: watch::Receiver<bool>,
    watched_types: impl Fn() -> Option<BTreeSet<ResourceKey>>,
) {
    let mut applied: Option<BTreeSet<ResourceKey>> = None;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut delay = Duration::from_secs(1);
    let mut checked = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(delay).await;
        delay = Duration::from_secs(1);
        // Before the controller published its first selection, ingestion plans nothing: do
        // not narrow a configuration a former leader left right to nothing.
        if !*synced.borrow() {
            continue;
        }
        let Some(types) = watched_types() else {
            continue;
        };
        // Deleted behind our back (for example by the `helm upgrade` that handed the
        // configuration over from the chart): apply it again.
        if applied.is_some() && checked.elapsed() >= CHECK_EVERY {
            checked = tokio::time::Instant::now();
            if let Ok(false) = registration::exists(&client, &registration.name).await {
                info!(name = %registration.name, "webhook configuration missing; applying it again");
                applied = None;
            }
        }
        if applied.as_ref() == Some(&types) {
            continue;
        }
        match registration::apply(&client, &registration, &types, FIELD_MANAGER).await {
            Ok(Applied::Applied) => {
                info!(name = %registration.name, types = types.len(), "webhook configuration applied");
                applied = Some(types);
                checked = tokio::time::Instant::now();
                backoff.reset();
            }
            Ok(Applied::OwnerMissing) => {
                delay = backoff.next_delay();
                info!(name = %registration.name, owner = ?registration.owner_cluster_role, retry_in = ?delay,
                      "the webhook configuration's owner ClusterRole does not exist (being uninstalled?); not applying");
            }
            Err(error) => {
                delay = backoff.next_delay();
                warn!(name = %registration.name, %error, retry_in = ?delay, "applying the webhook configuration failed");
            }
        }
    }
}
