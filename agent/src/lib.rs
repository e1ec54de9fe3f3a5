//! The gitops-reverser agent: mirrors the desired state of a cluster into Git.
//!
//! Data flow, one arrow per stage:
//!
//! ```text
//! discovery ──▶ rules ──▶ List+Watch ──▶ canonical YAML + paths ──▶ gRPC stream ──▶ writer
//! (which types  (which      (initial      (sanitize, render,          (per destination;
//!  exist)        objects)    snapshot,     hash, file path)             the writer commits
//!                            then deltas)                               and pushes)
//! ```
//!
//! The pure core, crate `reverser-agent-core` (no network or cluster access), re-exported here under the same names:
//!
//! - [`canonical`]: sanitizes an object as the API server returns it and renders
//!   the one canonical YAML form used for both creates and updates.
//! - [`paths`]: maps an object to its file path below a destination's base folder,
//!   escaping names that are not portable across filesystems.
//! - [`rules`]: decides which resource types and objects a `WatchRule` or
//!   `ClusterWatchRule` selects (admission-webhook style matching, label
//!   selectors, the desired-state preset, the always-on exclusions and the sensitive types), and which
//!   cluster-generated objects are skipped.
//! - [`config`]: resolves the custom resources into the [`config::Selection`] ingestion mirrors (access policy,
//!   credentials, encryption), with a Ready condition or the reason it is not for every rule and destination.
//! - [`crd`]: the `configbutler.ai/v1alpha1` custom resources the agent reads (crate `reverser-agent-api`)
//!   (`GitRepoConfig`, `GitDestination`, `WatchRule`, `ClusterWatchRule`, `CommitRequest`); the
//!   `crdgen` binary writes their manifests to `crds/`.
//! - [`attribution`]: who made a change, as a trait the watch index asks and the webhook's fact store answers.
//! - [`events`]: what ingestion hands the stream ([`events::AgentEvent`]), and what the stream hands back
//!   ([`events::Feedback`]: the writer's rejects, destination conditions, flush answers, previews).
//! - [`conditions`]: the status conditions of rules and destinations.
//! - [`ignore`]: which changes a rule does not mirror, by who made them (field managers, users).
//! - [`sops`]: SOPS v3 + age encryption of sensitive objects (Secrets) and their keyed fingerprints.
//! - [`credentials`]: the repositories' `secretRef` credentials as values (the [`controller`] reads the Secrets).
//! - `ingest::discovery` (the planner: which watches to run) and [`ingest::index`] (the watch index).
//!
//! Around that core, this crate: the parts that talk to the API server and the writer (binary `reverser-agent`, flags in
//! [`args::Args`]; `ARCHITECTURE.md` at the repository root draws the arrows):
//!
//! - [`leader`]: leader election on a Lease (`reverser_common::lease`), the leader label on the Pod, the cluster
//!   UID; each term runs what follows, and only the leader does.
//! - [`controller`]: watches the custom resources and Namespaces, resolves them
//!   ([`config::resolve`]) into the selection ingestion mirrors, and writes each
//!   rule's and destination's status conditions ([`conditions`]: `Ready`, the writer's
//!   feedback, `WriterConnected`, `SecretsSkipped`); each change of a condition becomes a
//!   Kubernetes Event ([`kube_events`]).
//! - [`commit_request`]: CommitRequests: attributed through the webhook, checked, sent as a flush after the
//!   changes already queued, and their outcome (the commit) written to their status.
//! - [`ingest`]: discovery (refreshed on CRD changes), one List+Watch per selected type and scope feeding the
//!   core's watch index ([`ingest::index`]), snapshot epochs, [`events::AgentEvent`]s.
//! - [`stream`]: the gRPC client delivering those events to the writer at least once.
//! - [`suspend`]: the writer's previews of suspended destinations, written to their status.
//! - [`webhook`]: the attribution webhook (who made a change) and, while leading, its configuration.
//! - [`metrics`]: families read from the components' counters when `/metrics` is scraped.
//! - [`args`]: flags, and the wiring of all of the above with the admin endpoint.

// The pure core, under the names the rest of the agent (and its tests, benches and fuzz targets) use.
pub use reverser_agent_core::{
    attribution, canonical, conditions, config, crd, credentials, events, ignore, paths, rules,
    sops,
};

pub mod args;
pub mod commit_request;
pub mod controller;
pub mod ingest;
pub mod kube_events;
pub mod leader;
pub mod metrics;
pub mod stream;
pub mod suspend;
pub mod webhook;
