//! Prometheus collectors for attribution and the webhook server.
//!
//! They are created unregistered, so a test can build as many stores as it likes; the agent
//! registers one set into its registry (prefix `gitops_reverser_agent_`) with
//! [`AttributionMetrics::register`].

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Outcome label values of `webhook_requests_total`.
pub const OUTCOMES: &[&str] = &[
    "recorded",
    "dry_run",
    "ignored",
    "malformed",
    "too_large",
    "timeout",
    "not_found",
    "method_not_allowed",
    "internal_error",
];

/// Counters, gauge and histogram of attribution. Clones share the same collectors.
#[derive(Clone, Debug)]
pub struct AttributionMetrics {
    /// Facts recorded from admitted requests.
    pub facts: IntCounter,
    /// Watch events that got an author.
    pub matches: IntCounter,
    /// Facts that left the store without explaining a change (expired, or superseded by a
    /// newer fact that did).
    pub unmatched: IntCounter,
    /// Facts dropped because the store was full.
    pub evictions: IntCounter,
    /// Watch events matching facts of different users: left to the bot.
    pub ambiguous: IntCounter,
    /// Facts held now.
    pub held: IntGauge,
    /// Webhook requests by outcome.
    pub requests: IntCounterVec,
    /// Time from the request's arrival to its response, body read included.
    pub latency: Histogram,
    /// Connections that failed the TLS handshake (plain HTTP, timeouts, and with
    /// `--webhook-client-ca` callers without an accepted client certificate).
    pub tls_failures: IntCounter,
}

impl AttributionMetrics {
    /// New, unregistered collectors.
    pub fn new() -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str| IntCounter::new(name, help);
        let requests = IntCounterVec::new(
            Opts::new(
                "webhook_requests_total",
                "Admission webhook requests by outcome (recorded, dry_run, ignored, malformed, too_large, timeout, not_found, method_not_allowed, internal_error)",
            ),
            &["outcome"],
        )?;
        // Pre-create every outcome so dashboards see zeros rather than missing series.
        for outcome in OUTCOMES {
            requests.with_label_values(&[outcome]);
        }
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "webhook_request_duration_seconds",
                "Time the admission webhook takes per request, from arrival to response",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
        )?;
        Ok(Self {
            facts: counter(
                "attribution_facts_total",
                "Attribution facts recorded from admitted requests",
            )?,
            matches: counter(
                "attribution_matches_total",
                "Watch events attributed to a user",
            )?,
            unmatched: counter(
                "attribution_unmatched_total",
                "Attribution facts that expired or were superseded without explaining a change",
            )?,
            evictions: counter(
                "attribution_evictions_total",
                "Attribution facts evicted because the store was full",
            )?,
            ambiguous: counter(
                "attribution_ambiguous_total",
                "Watch events matching facts of different users (left to the bot)",
            )?,
            held: IntGauge::new("attribution_facts", "Attribution facts held now")?,
            requests,
            latency,
            tls_failures: counter(
                "webhook_tls_handshake_failures_total",
                "Webhook connections that failed the TLS handshake (including refused client certificates)",
            )?,
        })
    }

    /// Registers every collector into `registry`.
    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        for counter in [
            &self.facts,
            &self.matches,
            &self.unmatched,
            &self.evictions,
            &self.ambiguous,
            &self.tls_failures,
        ] {
            registry.register(Box::new(counter.clone()))?;
        }
        registry.register(Box::new(self.held.clone()))?;
        registry.register(Box::new(self.requests.clone()))?;
        registry.register(Box::new(self.latency.clone()))?;
        Ok(())
    }

    /// Requests seen with `outcome` (tests and logs).
    pub fn requests_with(&self, outcome: &str) -> u64 {
        self.requests.with_label_values(&[outcome]).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_every_collector_with_the_agent_prefix() {
        let registry = Registry::new_custom(Some("gitops_reverser_agent".into()), None).unwrap();
        let metrics = AttributionMetrics::new().unwrap();
        metrics.register(&registry).unwrap();
        metrics.latency.observe(0.001);
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        for expected in [
            "gitops_reverser_agent_attribution_facts_total",
            "gitops_reverser_agent_attribution_matches_total",
            "gitops_reverser_agent_attribution_unmatched_total",
            "gitops_reverser_agent_attribution_evictions_total",
            "gitops_reverser_agent_attribution_ambiguous_total",
            "gitops_reverser_agent_attribution_facts",
            "gitops_reverser_agent_webhook_requests_total",
            "gitops_reverser_agent_webhook_request_duration_seconds",
            "gitops_reverser_agent_webhook_tls_handshake_failures_total",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected} missing");
        }
    }

    #[test]
    fn registering_twice_into_one_registry_fails_instead_of_double_counting() {
        let registry = Registry::new();
        let metrics = AttributionMetrics::new().unwrap();
        metrics.register(&registry).unwrap();
        assert!(metrics.register(&registry).is_err());
    }
}
