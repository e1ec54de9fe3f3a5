//! Domain types the writer's pure logic and actors share: who sent a change, which destination it is for,
//! and the change itself. The gRPC edge builds them from protocol messages once they have been validated
//! ([`crate::grpc::convert`]); nothing here knows the protocol.

use std::{fmt, sync::Arc};

use reverser_common::reasons::{ConditionReason, ConditionType, RejectReason};

use crate::{
    git::GitCredentials,
    reply::{Condition, Replies, Reply, SuspendPreview},
};

/// A cheap, immutable byte buffer (YAML content travels from the gRPC stream to the git thread untouched).
pub type Bytes = Arc<[u8]>;

/// The agent installation a stream belongs to, from its `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterIdentity {
    pub cluster_uid: String,
    pub cluster_name: String,
    pub instance_id: String,
    pub controller_namespace: String,
    pub controller_name: String,
    /// `{transitions}/{holder}` of the agent's leader term (`Hello.leader_term`), when it runs leader election.
    pub leader_term: Option<String>,
}

impl ClusterIdentity {
    /// Commit trailers recording which installation made a commit (seed: "Commit trailers for audit").
    pub fn trailers(&self) -> String {
        let trailers = format!(
            "X-ConfigButler-ClusterUID: {}\nX-ConfigButler-ControllerNS: {}\nX-ConfigButler-ControllerName: {}\nX-ConfigButler-InstanceID: {}",
            one_line(&self.cluster_uid),
            one_line(&self.controller_namespace),
            one_line(&self.controller_name),
            one_line(&self.instance_id)
        );
        match &self.leader_term {
            Some(term) => format!("{trailers}\nX-ConfigButler-LeaderTerm: {}", one_line(term)),
            None => trailers,
        }
    }
}

/// Removes line breaks and other control characters from text that goes into commit messages and markers.
pub fn one_line(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).collect()
}

/// One connected agent stream: its identity and where replies go.
#[derive(Debug)]
pub struct Origin {
    /// Process-unique id of the stream (for logs and for keying acks).
    pub session_id: u64,
    pub identity: ClusterIdentity,
    /// Replies (acks, rejects, statuses) for this stream: bounded, and a sender never waits (see [`crate::reply`]).
    pub replies: Replies,
}

impl Origin {
    pub fn send(&self, reply: Reply) {
        self.replies.send(reply);
    }

    pub fn reject(
        &self,
        destination: &str,
        sequence: u64,
        reason: RejectReason,
        message: impl Into<String>,
    ) {
        self.send(Reply::Reject {
            destination: destination.to_owned(),
            sequence,
            reason,
            message: message.into(),
        });
    }

    pub fn status(
        &self,
        destination: &str,
        kind: ConditionType,
        status: bool,
        reason: ConditionReason,
        message: impl Into<String>,
    ) {
        self.send(Reply::Status(Condition {
            destination: destination.to_owned(),
            kind,
            status,
            reason,
            message: message.into(),
        }));
    }
}

/// A destination is unique per cluster: two clusters may both have a `gitops/prod` GitDestination.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestinationId {
    pub cluster_uid: String,
    pub key: String,
}

impl fmt::Display for DestinationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.cluster_uid, self.key)
    }
}

/// A validated destination declaration.
#[derive(Clone, Debug)]
pub struct DestinationSpec {
    pub id: DestinationId,
    pub repo_url: String,
    pub branch: String,
    pub base_folder: String,
    pub exclusive_mode: bool,
    pub credentials: Option<GitCredentials>,
    /// age public keys of the destination's SOPS-encrypted files (empty: it has none); the writer keeps a
    /// matching `.sops.yaml` in the base folder.
    pub age_recipients: Vec<String>,
    pub prune: Prune,
    /// How the destination's commit messages read (none: the built-in messages).
    pub commit_template: Option<Arc<crate::batch::template::CommitTemplate>>,
    /// Hold and preview the destination's changes instead of pushing them (`Destination.suspend`).
    pub suspend: bool,
    /// Kustomizations kept in line, objects without their namespace.
    pub placement: Placement,
}

/// How a destination's files fit kustomize (GitDestination `spec.kustomization`, `spec.omitNamespace`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    pub kustomization: KustomizationMode,
    /// Objects come without `metadata.namespace`; the same kind and name from two namespaces is refused.
    pub omit_namespace: bool,
}

/// Whether the writer lists its files in kustomizations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KustomizationMode {
    #[default]
    Off,
    /// Edit the nearest existing kustomization.
    Maintain,
    /// Maintain, and create `{base}/kustomization.yaml` where a file has none above it.
    Create,
}

impl KustomizationMode {
    pub fn is_on(self) -> bool {
        self != Self::Off
    }
}

/// Which files the writer deletes for a destination (GitDestination `spec.prune`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prune {
    /// Deletes and complete snapshots (orphans) delete files.
    #[default]
    OnSnapshot,
    /// Only deletes delete files; snapshots never do.
    OnDelete,
    /// No file is ever deleted.
    Never,
}

impl Prune {
    /// Whether a complete snapshot deletes the scope's orphans.
    pub fn sweeps(self) -> bool {
        self == Prune::OnSnapshot
    }

    /// Whether an observed delete removes the file.
    pub fn deletes(self) -> bool {
        self != Prune::Never
    }
}

/// What a destination's messages need to carry into the worker.
#[derive(Clone, Debug)]
pub struct DestinationRef {
    pub id: DestinationId,
    pub base_folder: String,
    pub exclusive_mode: bool,
    /// age public keys for the base folder's `.sops.yaml` (empty: none is written).
    pub age_recipients: Arc<[String]>,
    pub prune: Prune,
    /// How the destination's commit messages read (none: the built-in messages).
    pub commit_template: Option<Arc<crate::batch::template::CommitTemplate>>,
    /// Kustomizations kept in line, objects without their namespace.
    pub placement: Placement,
    pub origin: Arc<Origin>,
    /// Highest sequence acked so far (for `WriterAdmin.ListDestinations`).
    pub acked: Arc<std::sync::atomic::AtomicU64>,
    /// Latest condition per type (for `WriterAdmin.ListDestinations`).
    pub conditions: Conditions,
}

/// Latest reported condition per type, shared by the registry record and the destination's changes.
pub type Conditions = Arc<std::sync::Mutex<std::collections::BTreeMap<String, Condition>>>;

impl DestinationRef {
    /// Records a condition and reports it to the destination's agent.
    pub fn report(
        &self,
        kind: ConditionType,
        status: bool,
        reason: ConditionReason,
        message: impl Into<String>,
    ) {
        let condition = Condition {
            destination: self.id.key.clone(),
            kind,
            status,
            reason,
            message: message.into(),
        };
        self.conditions
            .lock()
            .expect("conditions lock")
            .insert(kind.as_str().to_owned(), condition.clone());
        self.origin.send(Reply::Status(condition));
    }

    /// Tells the suspended destination's agent what a flush would write now.
    pub fn suspend_preview(&self, preview: SuspendPreview) {
        self.origin.send(Reply::SuspendPreview(preview));
    }

    /// Tells the destination's agent that the pushed `commit` deleted `deleted` orphan files (`left` more wait
    /// for the next snapshot).
    pub fn sweep_report(&self, deleted: usize, left: usize, commit: &str) {
        self.origin.send(Reply::SweepReport {
            destination: self.id.key.clone(),
            deleted: deleted as u64,
            left: left as u64,
            commit_sha: commit.to_owned(),
        });
    }
}

/// Object identity, for commit messages and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectId {
    pub group: String,
    pub version: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
}

/// One snapshot scope (one resource in one namespace or in all).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Scope {
    /// Folder relative to the base folder.
    pub folder: String,
    pub namespace_given: bool,
}

/// The operation a change carries.
#[derive(Clone, Debug)]
pub enum Operation {
    /// Write `content` to `path` (relative to the base folder).
    Upsert {
        path: String,
        content: Bytes,
        object: ObjectId,
        author: Option<String>,
        /// Keyed fingerprint of a SOPS-encrypted object's plaintext: equal to the existing file's means no-op.
        fingerprint: Option<String>,
    },
    /// Remove `path`.
    Delete {
        path: String,
        object: ObjectId,
        author: Option<String>,
    },
    SnapshotBegin {
        scope: Scope,
        epoch: u64,
    },
    SnapshotEnd {
        scope: Scope,
        epoch: u64,
    },
    /// Commit the destination's pending changes now (a CommitRequest).
    Flush(Arc<FlushOrder>),
}

/// A validated `FlushDestination`: who asked for the commit and what it says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushOrder {
    /// Commit message without trailers; `None`: the destination's usual message.
    pub message: Option<String>,
    /// Kubernetes username of the requester; `None`: the bot authors the commit.
    pub author: Option<String>,
    /// `namespace/name` of the CommitRequest.
    pub request_name: String,
    pub request_uid: String,
}

/// A validated, sequenced change on its way to a worker.
#[derive(Clone, Debug)]
pub struct Change {
    pub destination: DestinationRef,
    pub sequence: u64,
    pub operation: Operation,
}
