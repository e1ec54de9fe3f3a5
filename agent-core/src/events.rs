//! The boundary between ingestion (discovery, rules, List+Watch, canonical YAML) and the stream to the writer, both
//! ways, in the agent's own types (the protobuf forms exist only in `reverser_agent::stream`).
//!
//! Ingestion sends [`AgentEvent`]s on a bounded channel; the stream client (`reverser_agent::stream`) numbers them per
//! destination, keeps every unacked one, sends them to the writer and re-sends them after a reconnect. A full
//! channel slows the watches down (backpressure) instead of dropping anything. What the writer answers comes back
//! as [`Feedback`] (rejects, destination conditions, flush answers, previews), read by the conditions, the
//! CommitRequests and the suspend previews.

/// Where a destination's files go, as resolved from a `GitDestination` and its `GitRepoConfig`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationDecl {
    /// `namespace/name` of the GitDestination.
    pub key: String,
    pub repo_url: String,
    pub branch: String,
    pub base_folder: String,
    pub exclusive_mode: bool,
    /// Name of an entry of the writer's credentials file, when the repo config names one.
    pub credentials_reference: Option<String>,
    /// Credentials read from the GitRepoConfig's `secretRef` Secret, sent inline (only over TLS). Debug redacts them.
    pub credentials: Option<Box<crate::credentials::GitCredentials>>,
    /// SOPS + age encryption of sensitive objects (Secrets): without it they are never sent.
    pub encryption: Option<crate::sops::Encryption>,
    /// Which deletions the writer performs.
    pub prune: crate::crd::PruneMode,
    /// The GitDestination's commit message template, checked by the writer.
    pub commit_message: Option<crate::crd::CommitMessageSpec>,
    /// GitDestination `spec.suspend`: the writer holds and previews the changes instead of pushing them.
    pub suspend: bool,
    /// Kustomizations kept by the writer, objects rendered without their namespace.
    pub placement: Placement,
}

/// How a destination's files fit kustomize (GitDestination `spec.kustomization`, `spec.omitNamespace`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    pub kustomization: crate::crd::KustomizationMode,
    /// Objects are rendered without `metadata.namespace` (before encryption: the SOPS MAC covers it).
    pub omit_namespace: bool,
}

/// Which Kubernetes object an event is about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectRef {
    pub group: String,
    pub version: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: String,
}

/// One List's scope: a group/version/resource in one namespace or (empty) in all of them / cluster-wide.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ScopeRef {
    pub group: String,
    pub version: String,
    pub resource: String,
    pub namespace: String,
}

/// What ingestion tells the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentEvent {
    /// Declare or update a destination (before any change for it).
    Destination(DestinationDecl),
    /// Write the object's canonical YAML to `path` (relative to the destination's base folder).
    Upsert {
        destination: String,
        path: String,
        yaml: String,
        object: ObjectRef,
        created: bool,
        author: Option<String>,
        /// For SOPS-encrypted objects: the keyed fingerprint of the plaintext (the writer's no-op test).
        fingerprint: Option<String>,
    },
    /// Remove the object's file.
    Delete {
        destination: String,
        path: String,
        object: ObjectRef,
        author: Option<String>,
    },
    /// A complete (re)list of `scope` starts.
    SnapshotBegin {
        destination: String,
        scope: ScopeRef,
        epoch: u64,
    },
    /// Every object of `scope` that exists now was sent since the matching begin.
    SnapshotEnd {
        destination: String,
        scope: ScopeRef,
        epoch: u64,
    },
    /// A CommitRequest: commit everything sent for `destination` so far, now, as `author` with `message`.
    Flush {
        destination: String,
        /// Validated commit message; `None`: the destination's usual message.
        message: Option<String>,
        /// The requester, from admission; `None`: the writer's bot identity.
        author: Option<String>,
        /// `namespace/name` of the CommitRequest.
        request_name: String,
        request_uid: String,
    },
}

/// A writer `Reject`: the named message was not applied and will not be re-sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub destination: String,
    /// 0 for unsequenced messages (`Hello`, `Destination`).
    pub sequence: u64,
    /// Machine-readable, e.g. `InvalidPath`, `InvalidDestination`, `SnapshotMismatch`.
    pub reason: String,
    pub message: String,
}

/// A writer `DestinationStatus`: a condition for the rules using the destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationCondition {
    pub destination: String,
    /// `Accepted`, `Ready`, `PushFailing`, `AuthFailed`, `LeaseConflict`, `MarkerConflict`, `OwnershipConflict`.
    pub condition_type: String,
    /// `True` or `False`, as Kubernetes conditions spell it.
    pub status: String,
    pub reason: String,
    pub message: String,
}

/// What the stream tells the rest of the agent (status conditions, ingestion).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Feedback {
    /// The first connection is up (the writer sent `Welcome`).
    Connected,
    /// A later connection is up and everything unacked was queued for re-sending. Ingestion must start a fresh
    /// snapshot epoch for every scope: the writer may have lost the open ones.
    Reconnected,
    /// The connection was lost or could not be made; reported once per outage.
    Disconnected {
        error: String,
    },
    Rejected(Rejection),
    Status(DestinationCondition),
    /// The objects of `destination` currently not mirrored because they exceed the writer's limits
    /// (`path → description`); empty when the last of them was sent again (or deleted) within limits.
    ObjectsSkipped {
        destination: String,
        objects: Vec<String>,
        total: usize,
    },
    /// The writer refused this client's leader term (a newer leader said Hello): nothing more is sent.
    Fenced {
        message: String,
    },
    /// A `SnapshotEnd` was dropped without being sent because its epoch did not go out whole on the current
    /// connection; nothing of that epoch is deleted. Re-list the scope to get orphan deletion.
    SnapshotAbandoned {
        destination: String,
        scope: ScopeRef,
        epoch: u64,
    },
    /// The writer answered a CommitRequest (`FlushResult`): `commit` on `branch` holds it.
    Flushed(FlushAnswer),
    /// The writer refused a CommitRequest's flush (its `Reject`): nothing was committed for it.
    FlushRefused {
        request_uid: String,
        reason: String,
        message: String,
    },
    /// Snapshot sweeps deleted `deleted` orphan files of `destination` in the pushed `commit`; `left` more wait
    /// for the next snapshot (the delete cap).
    Swept {
        destination: String,
        deleted: u64,
        left: u64,
        commit: String,
    },
    /// What a flush of the suspended destination would write now (for its `status.suspendPreview`).
    SuspendPreview(SuspendPreview),
}

/// A writer `FlushResult`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushAnswer {
    pub destination: String,
    pub request_uid: String,
    pub commit: String,
    pub branch: String,
    /// A new commit holds the changes (`false`: nothing was pending; `commit` is the tip that held them).
    pub committed: bool,
    pub message: String,
}

/// The writer's preview of a suspended destination: what a flush would write now (for its `status.suspendPreview`).
pub use reverser_common::preview::SuspendPreview;
