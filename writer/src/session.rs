//! One agent stream (`Writer.Sync`): validates every message, keeps the stream's protocol state (hello first,
//! declared destinations, per-destination sequence order, open snapshots) and forwards valid changes to the
//! workers. Bad input is answered with a `Reject` naming the reason and changes nothing.
//!
//! With a writer configuration file the stream belongs to a client identity ([`Access`]): the cluster its
//! `Hello` claims, every destination it declares and every later message are checked against the client's
//! current grant; anything outside it is rejected with reason `Forbidden`, and a revoked client's stream ends.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use reverser_common::reasons::{ConditionReason, ConditionType, RejectReason};
use reverser_common::{paths, sops, yaml};
use reverser_proto::{
    PROTOCOL_VERSION,
    v1::{self as pb, agent_message::Kind},
};

use crate::{
    authz::Access,
    fencing::{Fence, Term},
    git::{self, GitCredentials},
    metrics::Metrics,
    model::{
        Change, ClusterIdentity, DestinationId, DestinationRef, DestinationSpec, FlushOrder,
        KustomizationMode, ObjectId, Operation, Origin, Placement, Prune, Scope,
    },
    registry::{DeclaredCredentials, Registry},
    worker::WorkerHandle,
};

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Limits applied to every message.
#[derive(Clone, Debug)]
pub struct SessionLimits {
    pub max_object_bytes: usize,
    /// The gRPC decoding limit, announced in `Welcome` so that agents never send more.
    pub max_message_bytes: usize,
}

/// A refused message: machine-readable reason plus explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: String,
}

fn reject(reason: RejectReason, message: impl Into<String>) -> Rejection {
    Rejection {
        reason,
        message: message.into(),
    }
}

/// Validates a `Hello` into the stream's identity.
pub fn validate_hello(hello: &pb::Hello) -> Result<ClusterIdentity, Rejection> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(reject(
            RejectReason::UnsupportedProtocolVersion,
            format!(
                "protocol_version {} is not supported; this writer speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            ),
        ));
    }
    for (field, value) in [
        ("cluster_uid", &hello.cluster_uid),
        ("instance_id", &hello.instance_id),
        ("controller_namespace", &hello.controller_namespace),
        ("controller_name", &hello.controller_name),
    ] {
        if value.trim().is_empty() {
            return Err(reject(
                RejectReason::InvalidHello,
                format!("hello.{field} is required"),
            ));
        }
        if value.len() > 253 || value.chars().any(char::is_control) {
            return Err(reject(
                RejectReason::InvalidHello,
                format!("hello.{field} is longer than 253 characters or has control characters"),
            ));
        }
    }
    // Optional, but it lands in logs and the ownership marker.
    if hello.cluster_name.len() > 253 || hello.cluster_name.chars().any(char::is_control) {
        return Err(reject(
            RejectReason::InvalidHello,
            "hello.cluster_name is longer than 253 characters or has control characters",
        ));
    }
    let leader_term = validate_leader_term(hello)?;
    Ok(ClusterIdentity {
        cluster_uid: hello.cluster_uid.clone(),
        cluster_name: hello.cluster_name.clone(),
        instance_id: hello.instance_id.clone(),
        controller_namespace: hello.controller_namespace.clone(),
        controller_name: hello.controller_name.clone(),
        leader_term: leader_term.map(|term| term.to_string()),
    })
}

/// The leader term a `Hello` speaks for, if any.
pub fn validate_leader_term(hello: &pb::Hello) -> Result<Option<Term>, Rejection> {
    let Some(term) = &hello.leader_term else {
        return Ok(None);
    };
    // The holder is the agent's instance id plus a suffix, so it may be a little longer than the id.
    for (field, value) in [("lease_uid", &term.lease_uid), ("holder", &term.holder)] {
        if value.trim().is_empty() || value.len() > 512 || value.chars().any(char::is_control) {
            return Err(reject(
                RejectReason::InvalidHello,
                format!(
                    "hello.leader_term.{field} is required, at most 512 bytes, without control characters"
                ),
            ));
        }
    }
    Ok(Some(Term {
        lease_uid: term.lease_uid.clone(),
        transitions: term.transitions,
        holder: term.holder.clone(),
    }))
}

fn valid_repo_url(url: &str) -> bool {
    if url.is_empty()
        || url.len() > 2048
        || url.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return false;
    }
    // Dot segments (plain or percent-encoded) and backslashes would let a URL that matches a grant's prefix
    // resolve somewhere else (`file:///srv/acme/../victim.git`): refused, never normalised.
    let lowered = url.to_ascii_lowercase();
    if url.contains('\\')
        || lowered.contains("%2e")
        || lowered.contains("%2f")
        || lowered.contains("%5c")
        || url
            .split(['/', ':'])
            .any(|segment| segment == "." || segment == "..")
    {
        return false;
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        return matches!(scheme, "file" | "git" | "http" | "https" | "ssh") && !rest.is_empty();
    }
    // scp-like `user@host:path`
    url.split_once(':')
        .is_some_and(|(host, path)| !host.is_empty() && !host.contains('/') && !path.is_empty())
}

/// Validates a `Destination` declaration.
pub fn validate_destination(
    cluster_uid: &str,
    message: &pb::Destination,
) -> Result<(DestinationSpec, DeclaredCredentials), Rejection> {
    let key = &message.key;
    let key_ok = key.len() <= 253
        && key
            .split_once('/')
            .is_some_and(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
        && !key.chars().any(|c| c.is_control() || c.is_whitespace());
    if !key_ok {
        return Err(reject(
            RejectReason::InvalidDestination,
            format!("destination key {key:?} must be \"namespace/name\""),
        ));
    }
    if !valid_repo_url(&message.repo_url) {
        return Err(reject(
            RejectReason::InvalidDestination,
            format!(
                "repo_url {:?} is not a file://, git://, http(s)://, ssh:// or user@host:path URL",
                git::redact_url(&message.repo_url)
            ),
        ));
    }
    git::validate_branch_name(&message.branch)
        .map_err(|e| reject(RejectReason::InvalidDestination, e.to_string()))?;
    paths::validate_base_folder(&message.base_folder).map_err(|e| {
        reject(
            RejectReason::InvalidDestination,
            format!("base_folder: {e}"),
        )
    })?;
    let credentials = match message.credentials.as_ref().and_then(|c| c.kind.as_ref()) {
        None => DeclaredCredentials::None,
        Some(pb::credentials::Kind::Reference(name)) => {
            DeclaredCredentials::Reference(name.clone())
        }
        Some(pb::credentials::Kind::Basic(basic)) => {
            DeclaredCredentials::Inline(GitCredentials::Basic {
                username: basic.username.clone(),
                password: basic.password.clone(),
            })
        }
        Some(pb::credentials::Kind::Token(token)) => {
            DeclaredCredentials::Inline(GitCredentials::Token(token.clone()))
        }
        Some(pb::credentials::Kind::Ssh(ssh)) => {
            if ssh.known_hosts.trim().is_empty() {
                return Err(reject(
                    RejectReason::InvalidDestination,
                    "ssh credentials need known_hosts: the writer never accepts an unknown host key",
                ));
            }
            if ssh.private_key.trim().is_empty() {
                return Err(reject(
                    RejectReason::InvalidDestination,
                    "ssh credentials need a private_key",
                ));
            }
            DeclaredCredentials::Inline(GitCredentials::Ssh {
                // Empty: the user the repository URL names, else `git` (git/auth.rs).
                username: ssh.username.clone(),
                private_key: ssh.private_key.clone(),
                passphrase: (!ssh.passphrase.is_empty()).then(|| ssh.passphrase.clone()),
                known_hosts: ssh.known_hosts.clone(),
            })
        }
    };
    if message.age_recipients.len() > MAX_AGE_RECIPIENTS {
        return Err(reject(
            RejectReason::InvalidDestination,
            format!(
                "{} age recipients; at most {MAX_AGE_RECIPIENTS} are accepted",
                message.age_recipients.len()
            ),
        ));
    }
    if let Some(position) = message
        .age_recipients
        .iter()
        .position(|r| !sops::is_age_recipient(r))
    {
        // The value is not echoed: it is not a key, so it may be anything.
        return Err(reject(
            RejectReason::InvalidDestination,
            format!("age_recipients[{position}] is not an age X25519 public key (age1…)"),
        ));
    }
    let Some(prune) = Prune::from_proto(message.prune) else {
        return Err(reject(
            RejectReason::InvalidDestination,
            format!(
                "prune mode {} is unknown to this writer (ON_SNAPSHOT, ON_DELETE or NEVER)",
                message.prune
            ),
        ));
    };
    let commit_template = message
        .commit_message
        .as_ref()
        .map(|t| crate::batch::template::CommitTemplate::parse(&t.subject, &t.body))
        .transpose()
        .map_err(|e| reject(RejectReason::InvalidDestination, e.to_string()))?
        .map(Arc::new);
    let Some(kustomization) = KustomizationMode::from_proto(message.kustomization) else {
        return Err(reject(
            RejectReason::InvalidDestination,
            format!(
                "kustomization mode {} is unknown to this writer (OFF, MAINTAIN or CREATE)",
                message.kustomization
            ),
        ));
    };
    let spec = DestinationSpec {
        id: DestinationId {
            cluster_uid: cluster_uid.to_owned(),
            key: key.clone(),
        },
        repo_url: message.repo_url.clone(),
        branch: message.branch.clone(),
        base_folder: message.base_folder.clone(),
        exclusive_mode: message.exclusive_mode,
        credentials: None,
        age_recipients: message.age_recipients.clone(),
        prune,
        commit_template,
        suspend: message.suspend,
        placement: Placement {
            kustomization,
            omit_namespace: message.omit_namespace,
        },
    };
    Ok((spec, credentials))
}

/// Recipients one destination may list (they go into `.sops.yaml` and every encrypted file).
const MAX_AGE_RECIPIENTS: usize = 64;

fn valid_segment(value: &str) -> bool {
    !value.is_empty()
        && value != "."
        && value != ".."
        && value.len() <= 253
        && !value.contains(['/', '\\'])
        && !value.chars().any(char::is_control)
}

/// Validates a snapshot scope into its folder.
pub fn validate_scope(scope: Option<&pb::SnapshotScope>) -> Result<Scope, Rejection> {
    let scope =
        scope.ok_or_else(|| reject(RejectReason::InvalidScope, "snapshot scope is required"))?;
    if !(scope.group.is_empty() || valid_segment(&scope.group))
        || !valid_segment(&scope.version)
        || !valid_segment(&scope.resource)
        || !(scope.namespace.is_empty() || valid_segment(&scope.namespace))
    {
        return Err(reject(
            RejectReason::InvalidScope,
            "snapshot scope needs a version and resource (and optional group/namespace) that are single path segments",
        ));
    }
    Ok(Scope {
        folder: paths::scope_folder(
            &scope.group,
            &scope.version,
            &scope.resource,
            &scope.namespace,
        ),
        namespace_given: !scope.namespace.is_empty(),
    })
}

/// Validates a `FlushDestination`'s message and the request's names (they go into the commit).
pub fn validate_flush(flush: &pb::FlushDestination) -> Result<FlushOrder, Rejection> {
    let message = reverser_common::commit_message::validate(&flush.message)
        .map_err(|e| reject(RejectReason::InvalidFlush, e.to_string()))?;
    let clean = |text: &str, what: &str| -> Result<String, Rejection> {
        if text.len() > 512 || text.chars().any(char::is_control) {
            return Err(reject(
                RejectReason::InvalidFlush,
                format!("{what} is longer than 512 bytes or holds control characters"),
            ));
        }
        Ok(text.to_owned())
    };
    let author = clean(&flush.author, "author")?;
    Ok(FlushOrder {
        message,
        author: (!author.is_empty()).then_some(author),
        request_name: clean(&flush.request_name, "request_name")?,
        request_uid: clean(&flush.request_uid, "request_uid")?,
    })
}

/// Validates an object path and YAML content.
pub fn validate_upsert(
    path: &str,
    content: &[u8],
    limits: &SessionLimits,
) -> Result<(), Rejection> {
    validate_upsert_with(path, content, limits, None)
}

/// Checks an upsert's content ahead of the session, off the stream's task (see [`crate::grpc`]): the YAML check is
/// the costliest step of a stream, and doing it on the blocking pool lets one stream use every core.
pub fn check_content(message: &pb::AgentMessage, limits: &SessionLimits) -> ContentCheck {
    match &message.kind {
        Some(Kind::Upsert(upsert)) if upsert.content.len() <= limits.max_object_bytes => {
            Some(check_object(&upsert.content))
        }
        _ => None,
    }
}

/// The outcome of [`check_content`] for one message; `None` when it was not checked ahead (the session checks).
pub type ContentCheck = Option<Result<(), Rejection>>;

/// One YAML object, and never a plaintext Secret: whatever an agent sends, a core Secret reaches Git only as a SOPS
/// document (the agent encrypts; this is the writer's own guard).
fn check_object(content: &[u8]) -> Result<(), Rejection> {
    let shape = yaml::validate_object(content)
        .map_err(|e| reject(RejectReason::InvalidYaml, e.to_string()))?;
    if shape.is_plaintext_secret() {
        return Err(reject(
            RejectReason::PlaintextSecret,
            "a Secret without SOPS encryption is never written (configure spec.encryption on the GitDestination)",
        ));
    }
    Ok(())
}

fn validate_upsert_with(
    path: &str,
    content: &[u8],
    limits: &SessionLimits,
    checked: ContentCheck,
) -> Result<(), Rejection> {
    paths::validate_object_path(path)
        .map_err(|e| reject(RejectReason::InvalidPath, e.to_string()))?;
    if content.len() > limits.max_object_bytes {
        return Err(reject(
            RejectReason::ObjectTooLarge,
            format!(
                "{} bytes is more than --max-object-bytes ({})",
                content.len(),
                limits.max_object_bytes
            ),
        ));
    }
    checked.unwrap_or_else(|| check_object(content))
}

struct DeclaredDestination {
    worker: WorkerHandle,
    /// Repository URL, branch and base folder, re-checked against the client's grant at every message.
    place: (String, String, String),
    reference: DestinationRef,
    last_sequence: u64,
    /// Open snapshots: scope folder → epoch.
    open_snapshots: HashMap<String, u64>,
}

/// The state of one stream.
pub struct Session {
    registry: Arc<Registry>,
    metrics: Metrics,
    limits: SessionLimits,
    replies: mpsc::UnboundedSender<pb::WriterMessage>,
    origin: Option<Arc<Origin>>,
    destinations: HashMap<String, DeclaredDestination>,
    id: u64,
    access: Access,
    /// The leader term the stream speaks for (None without leader election).
    fence: Option<Fence>,
}

/// What the stream driver should do after a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// A fatal protocol violation: end the stream with this message.
    Close(String),
    /// The client may not (or no longer) use this stream: end it with PermissionDenied.
    Deny(String),
}

impl Session {
    pub fn new(
        registry: Arc<Registry>,
        metrics: Metrics,
        limits: SessionLimits,
        replies: mpsc::UnboundedSender<pb::WriterMessage>,
    ) -> Self {
        Self {
            registry,
            metrics,
            limits,
            replies,
            origin: None,
            destinations: HashMap::new(),
            id: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
            access: Access::Unrestricted,
            fence: None,
        }
    }

    /// The stream's leader-term fence, once its `Hello` named a term.
    pub fn fence(&self) -> Option<Fence> {
        self.fence.clone()
    }

    /// Answers a message the gRPC layer could not read because it exceeds the decoding limit.
    pub fn reject_oversize(&self, message: &str) {
        self.send_reject("", 0, reject(RejectReason::ObjectTooLarge, message));
    }

    /// Refuses the stream for good because a newer leader term said Hello: a `Reject` (reason `StaleLeaderTerm`)
    /// now, and the caller ends the stream.
    pub fn supersede(&self, why: &str) {
        self.send_reject("", 0, reject(RejectReason::StaleLeaderTerm, why));
    }

    /// Restricts the stream to a configured client's grant (default: unrestricted).
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    fn client(&self) -> &str {
        self.access.identity().unwrap_or("-")
    }

    fn send(&self, kind: pb::writer_message::Kind) {
        let _ = self.replies.send(pb::WriterMessage { kind: Some(kind) });
    }

    fn send_reject(&self, destination: &str, sequence: u64, rejection: Rejection) {
        self.metrics
            .messages_rejected
            .with_label_values(&[rejection.reason.as_str()])
            .inc();
        warn!(session = self.id, client = self.client(), destination, sequence, reason = %rejection.reason, message = %rejection.message, "rejected message");
        self.send(pb::writer_message::Kind::Reject(pb::Reject {
            destination: destination.to_owned(),
            sequence,
            reason: rejection.reason.as_str().to_owned(),
            message: rejection.message,
        }));
    }

    /// Flushes every worker this stream wrote to (the agent half-closed and waits for its acks).
    pub async fn flush_all(&self) {
        let mut seen = std::collections::HashSet::new();
        for destination in self.destinations.values() {
            if seen.insert(destination.worker.id.clone())
                && let Err(error) = destination.worker.flush().await
            {
                warn!(session = self.id, worker = %destination.worker.id, %error, "flush after half-close failed");
            }
        }
    }

    /// Handles one message.
    pub async fn handle(&mut self, message: pb::AgentMessage) -> Next {
        self.handle_checked(message, None).await
    }

    /// [`Session::handle`] for a message whose content was already checked by [`check_content`].
    pub async fn handle_checked(
        &mut self,
        message: pb::AgentMessage,
        checked: ContentCheck,
    ) -> Next {
        let Some(kind) = message.kind else {
            self.send_reject(
                "",
                0,
                reject(
                    RejectReason::ProtocolViolation,
                    "empty message: set one of the AgentMessage fields",
                ),
            );
            return Next::Continue;
        };
        let label = match &kind {
            Kind::Hello(_) => "hello",
            Kind::Destination(_) => "destination",
            Kind::Upsert(_) => "upsert",
            Kind::Delete(_) => "delete",
            Kind::SnapshotBegin(_) => "snapshot_begin",
            Kind::SnapshotEnd(_) => "snapshot_end",
            Kind::Flush(_) => "flush",
        };
        self.metrics
            .messages_received
            .with_label_values(&[label])
            .inc();
        // A client removed from the configuration is cut off at its next message (and by the stream driver).
        let grant = match self.access.grant() {
            Ok(grant) => grant,
            Err(denied) => {
                let message = denied.to_string();
                self.send_reject("", 0, reject(RejectReason::Forbidden, message.clone()));
                return Next::Deny(message);
            }
        };
        let Some(origin) = self.origin.clone() else {
            return match kind {
                Kind::Hello(hello) => match validate_hello(&hello).and_then(|identity| match &grant
                {
                    Some(grant) => grant
                        .check_hello(&identity.cluster_uid, &identity.cluster_name)
                        .map(|()| identity)
                        .map_err(|denied| reject(RejectReason::Forbidden, denied.to_string())),
                    None => Ok(identity),
                }) {
                    Ok(identity) => {
                        if let Err(rejection) = self.enter_term(&identity.cluster_uid, &hello) {
                            let message = rejection.message.clone();
                            self.send_reject("", 0, rejection);
                            return Next::Close(message);
                        }
                        info!(session = self.id, client = self.client(), cluster = %identity.cluster_uid, name = %identity.cluster_name,
                            instance = %identity.instance_id, term = identity.leader_term.as_deref().unwrap_or("-"), "agent connected");
                        self.origin = Some(Arc::new(Origin {
                            session_id: self.id,
                            identity,
                            replies: self.replies.clone(),
                        }));
                        self.send(pb::writer_message::Kind::Welcome(pb::Welcome {
                            protocol_version: PROTOCOL_VERSION,
                            writer_version: env!("CARGO_PKG_VERSION").to_owned(),
                            max_message_bytes: self.limits.max_message_bytes as u64,
                            max_object_bytes: self.limits.max_object_bytes as u64,
                        }));
                        Next::Continue
                    }
                    Err(rejection) => {
                        let message = rejection.message.clone();
                        let forbidden = rejection.reason == RejectReason::Forbidden;
                        self.send_reject("", 0, rejection);
                        if forbidden {
                            Next::Deny(message)
                        } else {
                            Next::Close(message)
                        }
                    }
                },
                _ => {
                    let message = format!("the first message must be hello, got {label}");
                    self.send_reject(
                        "",
                        0,
                        reject(RejectReason::ProtocolViolation, message.clone()),
                    );
                    Next::Close(message)
                }
            };
        };
        // A newer leader term said Hello: nothing more of this stream is applied (whatever a former leader had
        // queued before it noticed).
        if let Some(why) = self.fence.as_ref().and_then(Fence::superseded) {
            self.send_reject("", 0, reject(RejectReason::StaleLeaderTerm, why.clone()));
            return Next::Close(why);
        }
        match kind {
            Kind::Hello(_) => {
                self.send_reject(
                    "",
                    0,
                    reject(
                        RejectReason::ProtocolViolation,
                        "hello was already sent on this stream",
                    ),
                );
            }
            Kind::Destination(message) => self.declare(&origin, message).await,
            Kind::Upsert(upsert) => {
                let result =
                    validate_upsert_with(&upsert.path, &upsert.content, &self.limits, checked).map(
                        |()| Operation::Upsert {
                            path: upsert.path.clone(),
                            content: upsert.content.into(),
                            object: ObjectId::from(upsert.object),
                            author: (!upsert.author.is_empty()).then_some(upsert.author),
                            fingerprint: (!upsert.fingerprint.is_empty())
                                .then_some(upsert.fingerprint),
                        },
                    );
                self.forward(&upsert.destination, upsert.sequence, result)
                    .await;
            }
            Kind::Delete(delete) => {
                let result = paths::validate_object_path(&delete.path)
                    .map_err(|e| reject(RejectReason::InvalidPath, e.to_string()))
                    .map(|()| Operation::Delete {
                        path: delete.path.clone(),
                        object: ObjectId::from(delete.object),
                        author: (!delete.author.is_empty()).then_some(delete.author),
                    });
                self.forward(&delete.destination, delete.sequence, result)
                    .await;
            }
            Kind::SnapshotBegin(begin) => {
                let result =
                    validate_scope(begin.scope.as_ref()).map(|scope| Operation::SnapshotBegin {
                        scope,
                        epoch: begin.epoch,
                    });
                self.forward(&begin.destination, begin.sequence, result)
                    .await;
            }
            Kind::SnapshotEnd(end) => {
                let result =
                    validate_scope(end.scope.as_ref()).map(|scope| Operation::SnapshotEnd {
                        scope,
                        epoch: end.epoch,
                    });
                self.forward(&end.destination, end.sequence, result).await;
            }
            Kind::Flush(flush) => {
                let result = validate_flush(&flush).map(|order| Operation::Flush(Arc::new(order)));
                self.forward(&flush.destination, flush.sequence, result)
                    .await;
            }
        }
        Next::Continue
    }

    /// Admits the stream under its Hello's leader term (refused when older than the cluster's newest).
    fn enter_term(&mut self, cluster_uid: &str, hello: &pb::Hello) -> Result<(), Rejection> {
        let Some(term) = validate_leader_term(hello)? else {
            return Ok(());
        };
        match self.registry.terms().enter(cluster_uid, term) {
            Ok(fence) => {
                self.fence = Some(fence);
                Ok(())
            }
            Err(why) => Err(reject(RejectReason::StaleLeaderTerm, why)),
        }
    }

    /// Checks a validated declaration against the client's grant.
    fn authorize_destination(
        &self,
        spec: &DestinationSpec,
        credentials: DeclaredCredentials,
    ) -> Result<DeclaredCredentials, Rejection> {
        let Some(grant) = self
            .access
            .grant()
            .map_err(|denied| reject(RejectReason::Forbidden, denied.to_string()))?
        else {
            return Ok(credentials);
        };
        grant
            .check_destination(&spec.repo_url, &spec.branch, &spec.base_folder)
            .map_err(|denied| reject(RejectReason::Forbidden, denied.to_string()))?;
        match credentials {
            DeclaredCredentials::Inline(_) if !grant.allow_agent_credentials => {
                if self.registry.has_own_credentials(&spec.repo_url) {
                    // The writer's own credentials win anyway; the agent's are dropped unused.
                    Ok(DeclaredCredentials::None)
                } else {
                    Err(reject(
                        RejectReason::Forbidden,
                        format!(
                            "client {:?} may not send its own Git credentials (allowAgentCredentials)",
                            grant.identity
                        ),
                    ))
                }
            }
            other => Ok(other),
        }
    }

    async fn declare(&mut self, origin: &Arc<Origin>, message: pb::Destination) {
        let key = message.key.clone();
        let validated = validate_destination(&origin.identity.cluster_uid, &message).and_then(
            |(spec, credentials)| {
                self.authorize_destination(&spec, credentials)
                    .map(|credentials| (spec, credentials))
            },
        );
        let (spec, credentials) = match validated {
            Ok(valid) => valid,
            Err(rejection) => {
                // Declaration refusals use reasons that are condition reasons too (InvalidDestination, Forbidden …).
                let reason = ConditionReason::parse(rejection.reason.as_str())
                    .unwrap_or(ConditionReason::InvalidDestination);
                origin.status(
                    &key,
                    ConditionType::Ready,
                    false,
                    reason,
                    rejection.message.clone(),
                );
                self.send_reject(&key, 0, rejection);
                return;
            }
        };
        let id = spec.id.clone();
        let (base_folder, repo, branch) = (
            spec.base_folder.clone(),
            git::redact_url(&spec.repo_url),
            spec.branch.clone(),
        );
        let place = (
            spec.repo_url.clone(),
            spec.branch.clone(),
            spec.base_folder.clone(),
        );
        let owner = self.access.identity().map(str::to_owned);
        let suspend = spec.suspend;
        match self
            .registry
            .declare(spec, credentials, origin.clone(), owner.as_deref())
        {
            Ok((worker, reference, previous)) => {
                if let Some(previous) = previous {
                    previous.forget(id.clone()).await;
                }
                // Before any change under this declaration (the worker's queue keeps the order).
                worker.set_suspended(reference.clone(), suspend).await;
                if let Some(old) = self
                    .destinations
                    .get(&key)
                    .filter(|d| d.worker.id == worker.id)
                {
                    // Same worker: snapshots opened before the re-declaration stay valid.
                    let open = old.open_snapshots.clone();
                    let last = old.last_sequence;
                    self.destinations.insert(
                        key.clone(),
                        DeclaredDestination {
                            worker,
                            place,
                            reference,
                            last_sequence: last,
                            open_snapshots: open,
                        },
                    );
                } else {
                    self.destinations.insert(
                        key.clone(),
                        DeclaredDestination {
                            worker,
                            place,
                            reference,
                            last_sequence: 0,
                            open_snapshots: HashMap::new(),
                        },
                    );
                }
                info!(session = self.id, client = self.client(), destination = %id, %repo, %branch, %base_folder, "destination declared");
                if let Some(declared) = self.destinations.get(&key) {
                    declared.reference.report(
                        ConditionType::Accepted,
                        true,
                        ConditionReason::Declared,
                        format!("{repo} {branch} {base_folder}"),
                    );
                }
            }
            Err(error) => {
                let message = error.to_string();
                let (kind, reason) = error.condition();
                origin.status(
                    &key,
                    kind,
                    kind != ConditionType::Ready,
                    reason,
                    message.clone(),
                );
                self.send_reject(
                    &key,
                    0,
                    Rejection {
                        reason: error.reason(),
                        message,
                    },
                );
            }
        }
    }

    async fn forward(&mut self, key: &str, sequence: u64, operation: Result<Operation, Rejection>) {
        let Some(destination) = self.destinations.get_mut(key) else {
            let rejection = reject(
                RejectReason::UnknownDestination,
                format!("destination {key:?} was not declared on this stream"),
            );
            self.send_reject(key, sequence, rejection);
            return;
        };
        // The grant may have narrowed since the declaration (a reloaded configuration).
        if let Ok(Some(grant)) = self.access.grant()
            && let Err(denied) = grant.check_destination(
                &destination.place.0,
                &destination.place.1,
                &destination.place.2,
            )
        {
            destination.last_sequence = destination.last_sequence.max(sequence);
            self.send_reject(
                key,
                sequence,
                reject(RejectReason::Forbidden, denied.to_string()),
            );
            return;
        }
        if sequence == 0 || sequence <= destination.last_sequence {
            let last = destination.last_sequence;
            self.send_reject(
                key,
                sequence,
                reject(RejectReason::OutOfOrder, format!("sequence {sequence} is not greater than the previous {last} of this destination")),
            );
            return;
        }
        let operation = match operation {
            Ok(operation) => operation,
            Err(rejection) => {
                // The sequence is consumed: a later message must not reuse it.
                destination.last_sequence = sequence;
                self.send_reject(key, sequence, rejection);
                return;
            }
        };
        match &operation {
            Operation::SnapshotBegin { scope, epoch } => {
                destination
                    .open_snapshots
                    .insert(scope.folder.clone(), *epoch);
            }
            Operation::SnapshotEnd { scope, epoch } => {
                if destination.open_snapshots.get(&scope.folder) != Some(epoch) {
                    destination.last_sequence = sequence;
                    let rejection = reject(
                        RejectReason::SnapshotMismatch,
                        format!(
                            "SnapshotEnd for {} epoch {epoch} without a matching SnapshotBegin on this stream",
                            scope.folder
                        ),
                    );
                    self.send_reject(key, sequence, rejection);
                    return;
                }
                destination.open_snapshots.remove(&scope.folder);
            }
            _ => {}
        }
        destination.last_sequence = sequence;
        let change = Change {
            destination: destination.reference.clone(),
            sequence,
            operation,
        };
        debug!(
            session = self.id,
            destination = key,
            sequence,
            "forwarding change"
        );
        if destination.worker.send(change).await.is_err() {
            self.send_reject(
                key,
                sequence,
                reject(
                    RejectReason::Unavailable,
                    "the destination's worker stopped; reconnect and re-send",
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_term_needs_a_lease_uid_and_a_clean_holder() {
        let hello = |lease_uid: &str, holder: &str| pb::Hello {
            leader_term: Some(pb::LeaderTerm {
                lease_uid: lease_uid.into(),
                transitions: 7,
                holder: holder.into(),
            }),
            ..pb::Hello::default()
        };
        assert_eq!(validate_leader_term(&pb::Hello::default()), Ok(None));
        let term = validate_leader_term(&hello("uid", "agent-0-abc123"))
            .unwrap()
            .unwrap();
        assert_eq!(term.to_string(), "7/agent-0-abc123");
        for (uid, holder) in [
            ("", "a"),
            ("uid", " "),
            ("uid", "a\nX-Forged: 1"),
            ("uid", &"a".repeat(513)),
        ] {
            assert_eq!(
                validate_leader_term(&hello(uid, holder))
                    .unwrap_err()
                    .reason,
                RejectReason::InvalidHello
            );
        }
    }

    #[test]
    fn repository_urls_with_dot_segments_or_escapes_are_refused() {
        for good in [
            "file:///srv/repos/acme/state.git",
            "https://git.example.com/acme/state.git",
            "ssh://git@git.example.com:2222/acme/state.git",
            "git@github.com:acme/state.git",
            "https://git.example.com/acme/state.v1.git",
        ] {
            assert!(valid_repo_url(good), "{good}");
        }
        for bad in [
            "file:///srv/repos/acme/../victim.git",
            "file:///srv/repos/acme/./x/../../victim.git",
            "https://git.example.com/acme/%2e%2e/victim.git",
            "https://git.example.com/acme/%2E%2E/victim.git",
            "https://git.example.com/acme%2fvictim.git",
            "https://git.example.com/acme\\..\\victim.git",
            "git@github.com:../victim.git",
            "ftp://example.com/x.git",
            "https://git.example.com/a b.git",
        ] {
            assert!(!valid_repo_url(bad), "{bad}");
        }
    }
}
