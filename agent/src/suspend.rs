//! Publishes the writer's suspend previews (`SuspendPreview`) in GitDestination `status.suspendPreview`.
//!
//! The writer sends a preview at most once per batch interval per suspended destination; this publisher keeps
//! only the latest per destination and writes each destination's status at most once per [`MIN_INTERVAL`], so a
//! burst of previews costs one patch. A preview is written only while the GitDestination still has
//! `spec.suspend: true` (one that arrives after a resume is dropped; the controller clears the field on resume).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::{sync::Notify, time::Instant};
use tracing::{debug, info, warn};

use crate::crd::{GitDestination, SuspendPreview as PreviewStatus};
use crate::events::SuspendPreview;

/// Shortest time between two status patches of one destination's preview.
pub const MIN_INTERVAL: Duration = Duration::from_secs(2);

/// The status form of a writer preview.
pub fn status_of(preview: &SuspendPreview, now: Timestamp) -> PreviewStatus {
    PreviewStatus {
        added: preview.added,
        changed: preview.changed,
        deleted: preview.deleted,
        added_paths: preview.added_paths.clone(),
        changed_paths: preview.changed_paths.clone(),
        deleted_paths: preview.deleted_paths.clone(),
        paths_cap: preview.paths_cap,
        base_commit: preview.base_commit.clone(),
        computed_at: now.to_string(),
    }
}

#[derive(Default)]
struct Pending {
    latest: HashMap<String, SuspendPreview>,
}

/// Hands previews to the publishing task; the task ends once every clone of this is dropped.
#[derive(Clone)]
pub struct Previews {
    pending: Arc<Mutex<Pending>>,
    wake: Arc<Notify>,
}

impl Previews {
    /// Starts the publishing task.
    pub fn spawn(client: Client) -> Previews {
        let previews = Previews {
            pending: Arc::default(),
            wake: Arc::new(Notify::new()),
        };
        let (pending, wake) = (Arc::downgrade(&previews.pending), previews.wake.clone());
        tokio::spawn(publish(client, pending, wake));
        previews
    }

    /// Queues `preview` (replacing an unwritten older one of the same destination). Never waits.
    pub fn offer(&self, preview: SuspendPreview) {
        self.pending
            .lock()
            .expect("previews lock")
            .latest
            .insert(preview.destination.clone(), preview);
        self.wake.notify_one();
    }
}

async fn publish(client: Client, pending: Weak<Mutex<Pending>>, wake: Arc<Notify>) {
    let mut written: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            // Also notices that every sender is gone, and retries previews held back by the interval.
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let Some(pending) = pending.upgrade() else {
            return;
        };
        let now = Instant::now();
        let due: Vec<SuspendPreview> = {
            let mut pending = pending.lock().expect("previews lock");
            let keys: Vec<String> = pending
                .latest
                .keys()
                .filter(|k| {
                    written
                        .get(*k)
                        .is_none_or(|t| now.duration_since(*t) >= MIN_INTERVAL)
                })
                .cloned()
                .collect();
            keys.iter()
                .filter_map(|k| pending.latest.remove(k))
                .collect()
        };
        drop(pending);
        for preview in due {
            written.insert(preview.destination.clone(), now);
            write(&client, &preview).await;
        }
    }
}

async fn write(client: &Client, preview: &SuspendPreview) {
    let Some((namespace, name)) = preview.destination.split_once('/') else {
        return;
    };
    let api = Api::<GitDestination>::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(destination)) if destination.spec.suspend => {}
        Ok(_) => {
            debug!(destination = %preview.destination, "suspend preview for a destination no longer suspended; dropped");
            return;
        }
        Err(error) => {
            warn!(destination = %preview.destination, %error, "reading the GitDestination for its suspend preview failed");
            return;
        }
    }
    let status = status_of(preview, Timestamp::now());
    let patch = serde_json::json!({ "status": { "suspendPreview": status } });
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            info!(destination = %preview.destination, added = preview.added, changed = preview.changed,
            deleted = preview.deleted, "suspend preview written to status")
        }
        Err(error) => {
            warn!(destination = %preview.destination, %error, "writing the suspend preview failed")
        }
    }
}
