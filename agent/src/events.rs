//! The boundary between ingestion (discovery, rules, List+Watch, canonical YAML) and the stream to the writer.
//!
//! Ingestion sends [`AgentEvent`]s on a bounded channel; the stream client ([`crate::stream`]) numbers them per
//! destination, keeps every unacked one, sends them to the writer and re-sends them after a reconnect. A full
//! channel slows the watches down (backpressure) instead of dropping anything.

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
