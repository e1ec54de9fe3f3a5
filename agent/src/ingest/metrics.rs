//! Ingestion's `/metrics` families, read from [`IngestMetrics`] when scraped. The agent gives one
//! `IngestMetrics` to every ingestion it starts ([`super::IngestConfig::metrics`]), so the counters run on
//! across restarts and leader terms.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus::Registry;

use super::shared::{IngestMetrics, ResourceTotals};
use crate::metrics::ScrapedFamilies;

impl IngestMetrics {
    /// Registers ingestion's counters (`discovery_*`, `watch_*`, `objects_scanned_total`, ...) in `registry`.
    pub fn register(self: &Arc<Self>, registry: &Registry) -> Result<(), prometheus::Error> {
        let read = |field: fn(&IngestMetrics) -> &std::sync::atomic::AtomicU64| {
            let metrics = Arc::clone(self);
            move || field(&metrics).load(Ordering::Relaxed)
        };
        let by_resource = |field: fn(&ResourceTotals) -> u64| {
            let metrics = Arc::clone(self);
            move || {
                metrics
                    .per_resource()
                    .into_iter()
                    .map(|(label, totals)| (label, field(&totals)))
                    .collect()
            }
        };
        ScrapedFamilies::new()
            .counter("discovery_runs_total", "Completed API discovery runs", read(|m| &m.discovery_runs))?
            .counter("discovery_errors_total", "Failed API discovery runs", read(|m| &m.discovery_errors))?
            .counter(
                "watch_errors_total",
                "Watch errors (each is retried; a relist follows a 410)",
                read(|m| &m.watch_errors),
            )?
            .counter(
                "encryption_failures_total",
                "Sensitive objects not sent because encrypting them was refused (too large) or failed, per destination",
                read(|m| &m.encryption_failures),
            )?
            .counter(
                "snapshots_withheld_total",
                "Snapshot ends not sent because an object of their scope could not be sent (nothing there is deleted)",
                read(|m| &m.snapshots_withheld),
            )?
            .counter_by(
                "objects_scanned_total",
                "Objects seen by lists and watches (listed, added, modified, deleted), by resource",
                "resource",
                by_resource(|t| t.objects_scanned),
            )?
            .counter_by(
                "watch_restarts_total",
                "Watches re-established after an error or an ended stream, by resource",
                "resource",
                by_resource(|t| t.watch_restarts),
            )?
            .counter_by(
                "watch_relists_total",
                "Lists after a watch's first one (410 Gone, desync, streaming fallback), by resource",
                "resource",
                by_resource(|t| t.relists),
            )?
            .register(registry)
    }
}
