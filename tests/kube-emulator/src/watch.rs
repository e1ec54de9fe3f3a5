//! WATCH (<https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes>):
//! one task per watch replays the store history after the requested resourceVersion, then
//! follows it as it grows, writing newline-delimited JSON events into a channel that is the
//! response body.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::Shared;
use crate::api::ListParams;
use crate::render::{self, View};
use crate::resources::ResourceDef;
use crate::status::ApiError;
use crate::store::{Event, EventType};

/// WATCH query parameters beyond the selectors.
#[derive(Debug, Clone, Default)]
pub struct WatchParams {
    pub list: ListParams,
    pub namespace: Option<String>,
    pub allow_bookmarks: bool,
    pub send_initial_events: bool,
    pub timeout: Option<Duration>,
    pub view: Option<View>,
}

enum Start {
    /// Synthetic ADDED events for the current state, then changes.
    Snapshot { initial_events_end: bool },
    /// Replay history after this resourceVersion.
    From(u64),
}

/// Validates the request and starts the watch task; the receiver yields body chunks.
pub fn start(
    shared: Shared,
    def: Arc<ResourceDef>,
    p: WatchParams,
) -> Result<mpsc::Receiver<Bytes>, ApiError> {
    let rv = p.list.resource_version.clone().unwrap_or_default();
    let rv_match = p.list.resource_version_match.clone().unwrap_or_default();
    if p.send_initial_events {
        if rv_match != "NotOlderThan" {
            return Err(ApiError::invalid(
                "ListOptions",
                "meta.k8s.io",
                "",
                "resourceVersionMatch",
                "Forbidden",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        if !p.allow_bookmarks {
            return Err(ApiError::invalid(
                "ListOptions",
                "meta.k8s.io",
                "",
                "allowWatchBookmarks",
                "Required value",
                "allowWatchBookmarks must be set to true when sendInitialEvents is true",
            ));
        }
    } else if !rv_match.is_empty() {
        return Err(ApiError::invalid(
            "ListOptions",
            "meta.k8s.io",
            "",
            "resourceVersionMatch",
            "Forbidden",
            "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        ));
    }
    let start = if p.send_initial_events {
        Start::Snapshot {
            initial_events_end: true,
        }
    } else if rv.is_empty() || rv == "0" {
        Start::Snapshot {
            initial_events_end: false,
        }
    } else {
        Start::From(
            rv.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))?,
        )
    };
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(run(shared, def, p, start, tx));
    Ok(rx)
}

struct Filter {
    def: Arc<ResourceDef>,
    p: WatchParams,
}

impl Filter {
    fn in_scope(&self, obj: &Value) -> bool {
        self.p.list.labels.matches(obj) && self.p.list.fields.matches(obj)
    }

    fn view(&self) -> View {
        self.p.view.unwrap_or(View::Full)
    }

    fn object_json(&self, obj: &Value) -> Bytes {
        render::object(&self.def, obj, self.view())
    }

    /// The event this watcher sees, with selector transitions: an object that stops matching
    /// is DELETED for it, one that starts matching is ADDED.
    fn translate(&self, ev: &Event) -> Option<Bytes> {
        if ev.key.group != self.def.group || ev.key.plural != self.def.plural {
            return None;
        }
        if let Some(ns) = &self.p.namespace
            && self.def.namespaced
            && ev.key.namespace != *ns
        {
            return None;
        }
        let now = self.in_scope(&ev.object);
        let before = ev.prev.as_deref().is_some_and(|p| self.in_scope(p));
        let kind = match ev.kind {
            EventType::Added if now => EventType::Added,
            EventType::Modified if now && before => EventType::Modified,
            EventType::Modified if now => EventType::Added,
            EventType::Modified if before => EventType::Deleted,
            EventType::Deleted if before || now => EventType::Deleted,
            _ => return None,
        };
        let plain =
            self.view() == View::Full && ev.object["apiVersion"] == self.def.api_version().as_str();
        let json = if plain {
            ev.object_json()
        } else {
            self.object_json(&ev.object)
        };
        Some(render::watch_frame(kind.as_str(), &json))
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Bytes {
        let (kind, api_version) = match self.view() {
            View::Metadata => (
                "PartialObjectMetadata".to_string(),
                "meta.k8s.io/v1".to_string(),
            ),
            View::Full => (self.def.kind.clone(), self.def.api_version()),
        };
        let mut obj = json!({
            "kind": kind,
            "apiVersion": api_version,
            "metadata": { "resourceVersion": rv.to_string() },
        });
        if initial_events_end {
            obj["metadata"]["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        render::watch_frame("BOOKMARK", obj.to_string().as_bytes())
    }
}

fn error_frame(e: &ApiError) -> Bytes {
    render::watch_frame("ERROR", e.to_status().to_string().as_bytes())
}

struct OpenWatch(Shared);
impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn run(
    shared: Shared,
    def: Arc<ResourceDef>,
    p: WatchParams,
    start: Start,
    tx: mpsc::Sender<Bytes>,
) {
    shared.open_watches.fetch_add(1, Ordering::Relaxed);
    let _guard = OpenWatch(shared.clone());
    let mut closer = shared.faults.watch_closer();
    closer.borrow_and_update();
    let mut latest = shared.store.subscribe();
    latest.borrow_and_update();
    let deadline = p.timeout.map(|t| tokio::time::Instant::now() + t);
    let bookmarks = p.allow_bookmarks;
    let filter = Filter { def, p };

    let (mut last, mut established) = match start {
        Start::Snapshot { initial_events_end } => {
            let (items, rv) = {
                let s = shared.store.read();
                let mut items = Vec::new();
                let ns = if filter.def.namespaced {
                    filter.p.namespace.as_deref()
                } else {
                    None
                };
                s.scan(
                    &filter.def.group,
                    &filter.def.plural,
                    ns,
                    None,
                    s.rv(),
                    |_, v| {
                        if filter.in_scope(v) {
                            items.push(v.clone());
                        }
                        true
                    },
                )
                .ok();
                (items, s.rv())
            };
            for obj in items {
                let frame = render::watch_frame("ADDED", &filter.object_json(&obj));
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
            if initial_events_end && tx.send(filter.bookmark(rv, true)).await.is_err() {
                return;
            }
            (rv, true)
        }
        Start::From(rv) => (rv, false),
    };

    let mut tick = tokio::time::interval(shared.config.bookmark_interval);
    tick.reset();
    loop {
        latest.borrow_and_update();
        let read = shared.store.read().events_after(last, 512, established);
        let (events, progressed) = match read {
            Ok(r) => r,
            Err(e) => {
                let _ = tx
                    .send(error_frame(&ApiError::too_old(e.requested, e.oldest)))
                    .await;
                return;
            }
        };
        established = true;
        let truncated = events.len() == 512;
        for ev in &events {
            if let Some(frame) = filter.translate(ev)
                && tx.send(frame).await.is_err()
            {
                return;
            }
        }
        last = progressed;
        if truncated {
            continue;
        }
        tokio::select! {
            changed = latest.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tick.tick(), if bookmarks => {
                if tx.send(filter.bookmark(last, false)).await.is_err() {
                    return;
                }
            }
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => return,
            _ = closer.changed() => return,
            _ = shared.shutdown.cancelled() => return,
            _ = tx.closed() => return,
        }
    }
}
