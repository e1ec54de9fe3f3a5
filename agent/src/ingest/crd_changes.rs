//! Discovery on CRD changes: a new CRD's objects are mirrored without waiting for `--discovery-refresh`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tracing::{info, warn};

/// Asks for a discovery run (of whichever ingestion runs now).
pub type RefreshDiscovery = Arc<dyn Fn() + Send + Sync>;

/// Watches CustomResourceDefinitions and calls `refresh` when one is added, changed or deleted, and after a
/// relist (which may have missed changes). Runs until its task is aborted.
pub async fn refresh_discovery_on_crd_changes(client: kube::Client, refresh: RefreshDiscovery) {
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let (mut synced, mut first_list) = (false, true);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::InitDone) => {
                synced = true;
                if !std::mem::replace(&mut first_list, false) {
                    refresh();
                }
            }
            // A relist after a watch error may have missed changes: refresh once it completes.
            Ok(watcher::Event::Init) => synced = false,
            Ok(watcher::Event::Apply(crd) | watcher::Event::Delete(crd)) if synced => {
                info!(crd = %crd.metadata.name.as_deref().unwrap_or_default(), "a CRD changed; refreshing discovery");
                refresh();
                // The API server publishes a new group in discovery a moment after the CRD is Established (seen on
                // kube-apiserver v1.37): look again shortly, or the type waits for --discovery-refresh.
                let later = Arc::clone(&refresh);
                tokio::spawn(async move {
                    for delay in [Duration::from_secs(2), Duration::from_secs(8)] {
                        tokio::time::sleep(delay).await;
                        later();
                    }
                });
            }
            Ok(_) => {}
            Err(error) => {
                warn!(%error, "watching CustomResourceDefinitions failed; discovery still refreshes on its timer")
            }
        }
    }
}
