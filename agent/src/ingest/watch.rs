//! One List+Watch per [`WatchPlan`]: the task that runs a kube watcher and hands its events to the pure
//! [`WatchIndex`], then sends what the index returns on ingestion's bounded channel.
//!
//! ```text
//! kube watcher (streaming list or paged list, then watch; bookmarks; relist on 410)
//!   │ Init · InitApply* · InitDone · Apply · Delete · Err
//!   ▼
//! WatchIndex (super::index, pure) ─▶ AgentEvents
//!   Err         → nothing: the open epoch is never ended, so the writer deletes nothing;
//!                 the watch restarts with backoff, a 403 is reported in its status
//!   ▼
//! bounded mpsc of AgentEvent → stream client → writer
//! ```
//!
//! A streaming list the server refuses (400/422: the WatchList feature is off or unknown) falls back to a paged
//! list. Lists wait for a permit ([`super::ListPermits`]), and each watched type has its own request budget.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use reverser_agent_core::ingest::WatchEvent;
use serde_json::Value;
use tracing::{debug, info, warn};

use super::discovery::WatchPlan;
use super::index::WatchIndex;
use super::raw::RawObject;
use super::shared::{InitialList, Shared};
use reverser_common::backoff::Backoff;

/// A dynamic object as JSON, with `apiVersion` and `kind` filled in: list items of built-ins
/// come without them, and canonical YAML needs them.
/// The object as received, its `apiVersion` and `kind` those of the watched version (the server may omit them).
fn to_json(obj: RawObject, plan: &WatchPlan) -> Option<Value> {
    let mut value = obj.into_value();
    let map = value.as_object_mut()?;
    map.insert("apiVersion".into(), plan.resource.api_version().into());
    map.insert("kind".into(), plan.resource.kind.clone().into());
    Some(value)
}

/// The kube watcher's event as the index's own [`WatchEvent`] (the core crate knows no kube-runtime).
fn map_event(event: Event<RawObject>, plan: &WatchPlan) -> Option<WatchEvent<Value>> {
    Some(match event {
        Event::Init => WatchEvent::Init,
        Event::InitDone => WatchEvent::InitDone,
        Event::InitApply(o) => WatchEvent::InitApply(to_json(o, plan)?),
        Event::Apply(o) => WatchEvent::Apply(to_json(o, plan)?),
        Event::Delete(o) => WatchEvent::Delete(to_json(o, plan)?),
    })
}

/// Whether a streaming-list start failed because the server does not support it.
fn streaming_unsupported(err: &watcher::Error) -> bool {
    matches!(err, watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 400 || s.code == 422)
}

fn is_forbidden(err: &watcher::Error) -> bool {
    match err {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 403,
        watcher::Error::WatchError(s) => s.code == 403,
        _ => false,
    }
}

/// Runs one watch until the task is aborted or the event channel closes.
pub(crate) async fn run(client: kube::Client, plan: Arc<WatchPlan>, shared: Arc<Shared>) {
    let ar = plan.resource.api_resource();
    // Every request of this type (list pages, watch restarts, relists) spends the type's budget.
    let client = shared.client_for(&client, &plan.resource.metric_label());
    let api: Api<RawObject> = if plan.key.namespace.is_empty() {
        Api::all_with(client, &ar)
    } else {
        Api::namespaced_with(client, &plan.key.namespace, &ar)
    };
    let mut streaming = shared.config.initial_list == InitialList::StreamingWithFallback;
    let mut index = WatchIndex::new(Arc::clone(&plan), shared.config.selection_options);
    if let Some(attribution) = &shared.config.attribution {
        index = index.with_attribution(Arc::clone(attribution));
    }
    let mut backoff = Backoff::new(shared.config.watch_backoff.0, shared.config.watch_backoff.1);
    let counters = shared.metrics.resource(&plan.resource.metric_label());
    let mut listed_before = false;
    // The index's (encryption failures, withheld snapshot ends) already added to the metrics.
    let mut reported = (0, 0);
    // At most --max-concurrent-lists lists in flight over all watches: a watch holds a permit for every poll
    // from its (re)start or `Init` until `InitDone`, and gives it back while it backs off after an error (a
    // type whose list keeps failing blocks nobody).
    let mut list_permit = None;
    let mut listing;
    // When the current (re)list started and how many objects it has brought so far (for the log).
    let mut list_started = std::time::Instant::now();
    let mut listed: u64 = 0;
    info!(watch = %plan.key, destinations = plan.routes.len(), "starting watch");
    loop {
        // Bookmarks are on by default; they keep the resume point fresh.
        let mut config = watcher::Config::default();
        if streaming {
            config = config.streaming_lists();
        }
        shared.update_status(&plan.key, |s| s.streaming = streaming);
        let mut stream = watcher::watcher(api.clone(), config).boxed();
        let mut restart = false;
        listing = true;
        loop {
            if listing && list_permit.is_none() {
                list_permit = Some(shared.config.list_permits.acquire().await);
            }
            let Some(item) = stream.next().await else {
                break;
            };
            match item {
                Ok(event) => {
                    let progress = !matches!(event, Event::Init);
                    let done = matches!(event, Event::InitDone);
                    match &event {
                        Event::Init => {
                            if listed_before {
                                counters.relists.fetch_add(1, Ordering::Relaxed);
                            }
                            listed_before = true;
                            // A (re)list follows: the next poll waits for a permit.
                            listing = true;
                            list_started = std::time::Instant::now();
                            listed = 0;
                        }
                        Event::InitApply(_) | Event::Apply(_) | Event::Delete(_) => {
                            counters.objects_scanned.fetch_add(1, Ordering::Relaxed);
                            listed += u64::from(matches!(event, Event::InitApply(_)));
                        }
                        Event::InitDone => {
                            listing = false;
                            list_permit = None;
                            info!(watch = %plan.key, objects = listed, streaming, elapsed_ms = list_started.elapsed().as_millis() as u64, "list complete");
                        }
                    }
                    let Some(event) = map_event(event, &plan) else {
                        continue;
                    };
                    if progress {
                        backoff.reset();
                        shared.update_status(&plan.key, |s| {
                            s.last_error = None;
                            s.forbidden = false;
                            if done {
                                s.snapshots_completed += 1;
                            }
                        });
                    }
                    let events = index.apply(event, &shared.epochs);
                    let counts = (index.encryption_failures(), index.snapshots_withheld());
                    if counts != reported {
                        shared
                            .metrics
                            .encryption_failures
                            .fetch_add(counts.0.saturating_sub(reported.0), Ordering::Relaxed);
                        shared
                            .metrics
                            .snapshots_withheld
                            .fetch_add(counts.1.saturating_sub(reported.1), Ordering::Relaxed);
                        reported = counts;
                        let last_unsent = index.last_unsent().map(str::to_owned);
                        shared.update_status(&plan.key, |s| {
                            s.encryption_failures = counts.0;
                            s.snapshots_withheld = counts.1;
                            s.last_unsent = last_unsent;
                        });
                    }
                    for out in events {
                        if shared.tx.send(out).await.is_err() {
                            debug!(watch = %plan.key, "event channel closed; stopping watch");
                            return;
                        }
                    }
                }
                Err(err) => {
                    list_permit = None;
                    shared.metrics.watch_errors.fetch_add(1, Ordering::Relaxed);
                    counters.watch_restarts.fetch_add(1, Ordering::Relaxed);
                    let forbidden = is_forbidden(&err);
                    shared.update_status(&plan.key, |s| {
                        s.errors += 1;
                        s.last_error = Some(err.to_string());
                        s.forbidden = forbidden;
                    });
                    if streaming && streaming_unsupported(&err) {
                        warn!(watch = %plan.key, error = %err, "server refused a streaming list; falling back to list+watch");
                        streaming = false;
                        restart = true;
                        break;
                    }
                    if forbidden && plan.merges_namespaces() {
                        // Namespaced RBAC only: one watch per rule namespace replaces this one (the supervisor
                        // stops it and starts those); until then it keeps retrying like any other.
                        if shared.cluster_list_forbidden(plan.resource.group_resource()) {
                            warn!(watch = %plan.key, error = %err, "listing the type in all namespaces is forbidden; watching it in each rule's namespace instead");
                        }
                    } else if forbidden {
                        warn!(watch = %plan.key, error = %err, "access denied; keeping the files, retrying");
                    } else {
                        debug!(watch = %plan.key, error = %err, "watch error; retrying");
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        if !restart {
            // The watcher stream is endless by design; if it ever ends, start over after a pause.
            counters.watch_restarts.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(
            kube::core::Status::failure("x", "y").with_code(code),
        ))
    }

    #[test]
    fn only_a_refused_streaming_list_falls_back_to_paging() {
        // 422: the WatchList feature gate is off; 400: an old server rejects the parameters.
        assert!(streaming_unsupported(&watcher::Error::WatchStartFailed(
            api_error(422)
        )));
        assert!(streaming_unsupported(&watcher::Error::WatchStartFailed(
            api_error(400)
        )));
        // RBAC, throttling and server errors are retried as they are.
        for code in [403, 429, 500] {
            assert!(!streaming_unsupported(&watcher::Error::WatchStartFailed(
                api_error(code)
            )));
        }
        assert!(!streaming_unsupported(&watcher::Error::InitialListFailed(
            api_error(422)
        )));
        assert!(is_forbidden(&watcher::Error::InitialListFailed(api_error(
            403
        ))));
        assert!(is_forbidden(&watcher::Error::WatchStartFailed(api_error(
            403
        ))));
        assert!(!is_forbidden(&watcher::Error::WatchStartFailed(api_error(
            500
        ))));
    }
}
