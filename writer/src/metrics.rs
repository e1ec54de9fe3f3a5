//! Prometheus metrics of the writer, registered in one explicit registry (names from the seed, prefixed
//! `gitops_reverser_`). Labels stay low-cardinality: repository (credentials removed), branch, destination.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub objects_written: IntCounterVec,
    /// Updates of files with comments or a layout of their own that were rewritten whole (by reason).
    pub yaml_edit_fallbacks: IntCounterVec,
    pub files_deleted: IntCounterVec,
    pub commits: IntCounterVec,
    pub commit_bytes: IntCounterVec,
    pub commit_batches: IntCounterVec,
    /// Successful pushes; one carries every batch committed since the previous one.
    pub pushes: IntCounterVec,
    /// Seconds each push attempt took (connect, pack, send, the remote's answer), whatever its outcome.
    pub push_duration: HistogramVec,
    /// Batches committed in a worker's clone and not pushed yet (their changes are not acked).
    pub unpushed_batches: IntGaugeVec,
    pub rebase_retries: IntCounterVec,
    pub push_retries: IntCounterVec,
    pub push_failures: IntCounterVec,
    /// Fetches and pushes the watchdog stopped waiting for (past `--git-operation-timeout-sec`).
    pub git_operations_abandoned: IntCounterVec,
    pub ownership_conflicts: IntCounterVec,
    pub lease_acquire_failures: IntCounterVec,
    pub marker_conflicts: IntCounterVec,
    /// Kustomizations left as they were because they cannot be read or edited in place.
    pub kustomization_problems: IntCounterVec,
    /// Orphans the last sweep of a destination left for later because of `--deletes-cap-per-cycle`.
    pub orphans_pending: IntGaugeVec,
    pub sweeps_truncated: IntCounterVec,
    pub active_workers: IntGaugeVec,
    pub queue_depth: IntGaugeVec,
    pub messages_received: IntCounterVec,
    pub messages_rejected: IntCounterVec,
    pub connected_agents: IntGauge,
    /// Agent streams ended because the agent stopped reading its replies (see `crate::reply`).
    pub slow_streams_ended: IntCounter,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(format!("gitops_reverser_{name}"), help), labels)
        .expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
    labels: &[&str],
) -> HistogramVec {
    let metric = HistogramVec::new(
        HistogramOpts::new(format!("gitops_reverser_{name}"), help).buckets(buckets),
        labels,
    )
    .expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(format!("gitops_reverser_{name}"), help), labels)
        .expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(Registry::new())
    }
}

impl Metrics {
    pub fn new(registry: Registry) -> Self {
        const RB: &[&str] = &["repo", "branch"];
        const DEST: &[&str] = &["destination"];
        let connected_agents = IntGauge::new(
            "gitops_reverser_connected_agents",
            "Agent streams currently connected.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(connected_agents.clone()))
            .expect("metric registered once");
        let slow_streams_ended = IntCounter::new(
            "gitops_reverser_slow_streams_ended_total",
            "Agent streams ended because the agent did not read its replies and its reply queue filled.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(slow_streams_ended.clone()))
            .expect("metric registered once");
        Self {
            objects_written: counter(
                &registry,
                "objects_written_total",
                "Object files created or updated in commits.",
                RB,
            ),
            yaml_edit_fallbacks: counter(
                &registry,
                "yaml_edit_fallbacks_total",
                "Updates of files with comments or a layout of their own that could not be edited in place and were \
                 rewritten whole, by reason (unparseable, multi_document, anchor_or_tag, not_block_mapping, \
                 unusual_key, sops, line_endings, unsupported, unverified).",
                &["repo", "branch", "reason"],
            ),
            files_deleted: counter(
                &registry,
                "files_deleted_total",
                "Object files deleted (deletes and orphans).",
                DEST,
            ),
            commits: counter(&registry, "commits_total", "Commits pushed.", RB),
            commit_bytes: counter(
                &registry,
                "commit_bytes_total",
                "Bytes of file content written by pushed commits.",
                RB,
            ),
            commit_batches: counter(
                &registry,
                "commit_batches_total",
                "Batches (flushes) with at least one commit that were pushed.",
                RB,
            ),
            pushes: counter(
                &registry,
                "pushes_total",
                "Successful pushes; one carries every batch committed since the previous push.",
                RB,
            ),
            push_duration: histogram(
                &registry,
                "push_duration_seconds",
                "Seconds each push attempt took (connect, pack, send, the remote's answer), whatever its outcome.",
                vec![
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ],
                RB,
            ),
            unpushed_batches: gauge(
                &registry,
                "unpushed_batches",
                "Batches committed in the worker's clone and not pushed yet (their changes are not acked).",
                RB,
            ),
            rebase_retries: counter(
                &registry,
                "rebase_retries_total",
                "Non-fast-forward rejections answered by fetch, reset to the remote tip and replay.",
                RB,
            ),
            push_retries: counter(
                &registry,
                "push_retries_total",
                "Flushes retried later after a failed push or fetch.",
                RB,
            ),
            push_failures: counter(
                &registry,
                "push_failures_total",
                "Failed pushes or fetches, by kind.",
                &["repo", "branch", "kind"],
            ),
            git_operations_abandoned: counter(
                &registry,
                "git_operations_abandoned_total",
                "Fetches and pushes abandoned at the operation deadline while the remote kept them open.",
                RB,
            ),
            ownership_conflicts: counter(
                &registry,
                "ownership_conflicts_total",
                "Writes refused or warned about because another owner holds the destination.",
                DEST,
            ),
            lease_acquire_failures: counter(
                &registry,
                "lease_acquire_failures_total",
                "Attempts to take a worker's Lease that failed or found another holder.",
                &["worker"],
            ),
            marker_conflicts: counter(
                &registry,
                "marker_conflicts_total",
                "Ownership marker mismatches seen.",
                DEST,
            ),
            kustomization_problems: counter(
                &registry,
                "kustomization_problems_total",
                "Kustomizations left as they are because the writer cannot read or edit them in place.",
                DEST,
            ),
            orphans_pending: gauge(
                &registry,
                "orphans_pending",
                "Orphan files the last snapshot sweep left undeleted because of --deletes-cap-per-cycle.",
                DEST,
            ),
            sweeps_truncated: counter(
                &registry,
                "sweeps_truncated_total",
                "Snapshot sweeps stopped early by --deletes-cap-per-cycle.",
                DEST,
            ),
            active_workers: gauge(
                &registry,
                "repo_branch_active_workers",
                "Running (repository, branch) workers.",
                RB,
            ),
            queue_depth: gauge(
                &registry,
                "repo_branch_queue_depth",
                "Changes received by a worker and not yet pushed.",
                RB,
            ),
            messages_received: counter(
                &registry,
                "messages_received_total",
                "Agent messages received, by kind.",
                &["kind"],
            ),
            messages_rejected: counter(
                &registry,
                "messages_rejected_total",
                "Agent messages rejected, by reason.",
                &["reason"],
            ),
            connected_agents,
            slow_streams_ended,
            registry,
        }
    }
}
