//! One agent stream (`Writer.Sync`): keeps the stream's protocol state (hello first, declared destinations,
//! per-destination sequence order, open snapshots) and forwards valid changes to the workers. Its input is the
//! gRPC edge's decoded and checked [`Inbound`] message (see [`crate::grpc::convert`]); its output is [`Reply`]
//! values on the stream's bounded reply channel. Bad input is answered with a `Reject` naming the reason and
//! changes nothing.
//!
//! With a writer configuration file the stream belongs to a client identity ([`Access`]): each message is
//! authorized once ([`authorize`]) against the client's grant as it is when the message arrives: the cluster a
//! `Hello` claims, the place a declaration names, and the declared place of every later change (a reloaded,
//! narrower grant applies at once). Anything outside the grant is rejected with reason `Forbidden`, and a revoked
//! client's stream ends.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tracing::{debug, info, warn};

use reverser_common::reasons::{ConditionReason, ConditionType, RejectReason};

use crate::{
    authz::{Access, ClientGrant},
    fencing::{Fence, Term},
    metrics::Metrics,
    model::Change,
    model::{ClusterIdentity, DestinationRef, DestinationSpec, Operation, Origin},
    names::redact_url,
    registry::{DeclaredCredentials, Registry},
    reply::{Replies, Reply},
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

pub fn reject(reason: RejectReason, message: impl Into<String>) -> Rejection {
    Rejection {
        reason,
        message: message.into(),
    }
}

/// One agent message, decoded and checked by the gRPC edge ([`crate::grpc::convert::inbound`]). A part that
/// failed its checks carries the [`Rejection`] it earned; the session decides when (and whether) to send it, since
/// the stream's state comes first (hello first, a known destination, the sequence order).
#[derive(Debug)]
pub enum Inbound {
    /// A message with none of its fields set.
    Empty,
    Hello(Result<Hello, Rejection>),
    Destination {
        key: String,
        declaration: Result<Declaration, Rejection>,
    },
    /// An upsert, delete, snapshot begin or end, or flush for a declared destination.
    Change {
        /// The message kind (`upsert`, `delete`, `snapshot_begin`, `snapshot_end`, `flush`), for metrics and errors.
        kind: &'static str,
        destination: String,
        sequence: u64,
        operation: Result<Operation, Rejection>,
    },
}

impl Inbound {
    /// The message kind, for the `messages_received` metric and errors.
    pub fn kind(&self) -> Option<&'static str> {
        match self {
            Inbound::Empty => None,
            Inbound::Hello(_) => Some("hello"),
            Inbound::Destination { .. } => Some("destination"),
            Inbound::Change { kind, .. } => Some(kind),
        }
    }
}

/// A valid `Hello`: who the stream is, and the leader term it speaks for (if any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub identity: ClusterIdentity,
    pub term: Option<Term>,
}

/// A valid destination declaration. `spec.id.cluster_uid` is left empty by the edge: the session fills in its
/// stream's cluster.
#[derive(Clone, Debug)]
pub struct Declaration {
    pub spec: DestinationSpec,
    pub credentials: DeclaredCredentials,
}

/// A declared destination's place, checked against the client's grant at every message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub repo_url: String,
    pub branch: String,
    pub base_folder: String,
}

/// What a message asks of the client's grant.
#[derive(Debug)]
pub enum Asks<'a> {
    /// A `Hello` claims a cluster.
    Connect(&'a ClusterIdentity),
    /// A declaration names a place and may bring the agent's own Git credentials.
    Declare {
        place: Place,
        credentials: DeclaredCredentials,
        /// Whether the writer has its own credentials for the repository (they win over the agent's).
        writer_has_credentials: bool,
    },
    /// A change for a destination declared earlier (the grant may have narrowed since).
    Write(&'a Place),
}

/// What the grant allows of a message.
#[derive(Debug)]
pub enum Authorized {
    Connect,
    /// The declaration, with the credentials it may use (the agent's own are dropped when the grant does not
    /// allow them but the writer has its own).
    Declare(DeclaredCredentials),
    Write,
}

/// The one authorization step of a message: `grant` is the client's grant as it is now (`None`: no configuration
/// file, anything goes). A refusal has reason `Forbidden`.
pub fn authorize(grant: Option<&ClientGrant>, asks: Asks<'_>) -> Result<Authorized, Rejection> {
    let forbidden =
        |denied: crate::authz::Denied| reject(RejectReason::Forbidden, denied.to_string());
    match asks {
        Asks::Connect(identity) => {
            if let Some(grant) = grant {
                grant
                    .check_hello(&identity.cluster_uid, &identity.cluster_name)
                    .map_err(forbidden)?;
            }
            Ok(Authorized::Connect)
        }
        Asks::Declare {
            place,
            credentials,
            writer_has_credentials,
        } => {
            let Some(grant) = grant else {
                return Ok(Authorized::Declare(credentials));
            };
            grant
                .check_destination(&place.repo_url, &place.branch, &place.base_folder)
                .map_err(forbidden)?;
            match credentials {
                DeclaredCredentials::Inline(_) if !grant.allow_agent_credentials => {
                    if writer_has_credentials {
                        // The writer's own credentials win anyway; the agent's are dropped unused.
                        Ok(Authorized::Declare(DeclaredCredentials::None))
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
                other => Ok(Authorized::Declare(other)),
            }
        }
        Asks::Write(place) => {
            if let Some(grant) = grant {
                grant
                    .check_destination(&place.repo_url, &place.branch, &place.base_folder)
                    .map_err(forbidden)?;
            }
            Ok(Authorized::Write)
        }
    }
}

struct DeclaredDestination {
    worker: WorkerHandle,
    /// Repository URL, branch and base folder, re-checked against the client's grant at every message.
    place: Place,
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
    replies: Replies,
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
        replies: Replies,
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

    fn send_reject(&self, destination: &str, sequence: u64, rejection: Rejection) {
        self.metrics
            .messages_rejected
            .with_label_values(&[rejection.reason.as_str()])
            .inc();
        warn!(session = self.id, client = self.client(), destination, sequence, reason = %rejection.reason, message = %rejection.message, "rejected message");
        self.replies.send(Reply::Reject {
            destination: destination.to_owned(),
            sequence,
            reason: rejection.reason,
            message: rejection.message,
        });
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
    pub async fn handle(&mut self, message: Inbound) -> Next {
        let Some(label) = message.kind() else {
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
        self.metrics
            .messages_received
            .with_label_values(&[label])
            .inc();
        // The client's grant as it is now, looked up once per message. A client removed from the configuration is
        // cut off at its next message (and by the stream driver).
        let grant = match self.access.grant() {
            Ok(grant) => grant,
            Err(denied) => {
                let message = denied.to_string();
                self.send_reject("", 0, reject(RejectReason::Forbidden, message.clone()));
                return Next::Deny(message);
            }
        };
        let grant = grant.as_deref();
        let Some(origin) = self.origin.clone() else {
            return match message {
                Inbound::Hello(hello) => self.connect(hello, grant),
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
        match message {
            Inbound::Empty => unreachable!("answered above"),
            Inbound::Hello(_) => {
                self.send_reject(
                    "",
                    0,
                    reject(
                        RejectReason::ProtocolViolation,
                        "hello was already sent on this stream",
                    ),
                );
            }
            Inbound::Destination { key, declaration } => {
                self.declare(&origin, key, declaration, grant).await
            }
            Inbound::Change {
                destination,
                sequence,
                operation,
                ..
            } => self.forward(&destination, sequence, operation, grant).await,
        }
        Next::Continue
    }

    /// The stream's first message: a valid `Hello` within the grant, under a current leader term, makes the stream
    /// an agent's.
    fn connect(&mut self, hello: Result<Hello, Rejection>, grant: Option<&ClientGrant>) -> Next {
        let admitted =
            hello.and_then(|hello| authorize(grant, Asks::Connect(&hello.identity)).map(|_| hello));
        let hello = match admitted {
            Ok(hello) => hello,
            Err(rejection) => {
                let message = rejection.message.clone();
                let forbidden = rejection.reason == RejectReason::Forbidden;
                self.send_reject("", 0, rejection);
                return if forbidden {
                    Next::Deny(message)
                } else {
                    Next::Close(message)
                };
            }
        };
        let Hello { identity, term } = hello;
        if let Err(rejection) = self.enter_term(&identity.cluster_uid, term) {
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
        self.replies.send(Reply::Welcome {
            max_message_bytes: self.limits.max_message_bytes as u64,
            max_object_bytes: self.limits.max_object_bytes as u64,
        });
        Next::Continue
    }

    /// Admits the stream under its Hello's leader term (refused when older than the cluster's newest).
    fn enter_term(&mut self, cluster_uid: &str, term: Option<Term>) -> Result<(), Rejection> {
        let Some(term) = term else {
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

    async fn declare(
        &mut self,
        origin: &Arc<Origin>,
        key: String,
        declaration: Result<Declaration, Rejection>,
        grant: Option<&ClientGrant>,
    ) {
        let validated = declaration.and_then(
            |Declaration {
                 mut spec,
                 credentials,
             }| {
                spec.id.cluster_uid = origin.identity.cluster_uid.clone();
                let asks = Asks::Declare {
                    place: Place {
                        repo_url: spec.repo_url.clone(),
                        branch: spec.branch.clone(),
                        base_folder: spec.base_folder.clone(),
                    },
                    writer_has_credentials: matches!(credentials, DeclaredCredentials::Inline(_))
                        && self.registry.has_own_credentials(&spec.repo_url),
                    credentials,
                };
                match authorize(grant, asks)? {
                    Authorized::Declare(credentials) => Ok((spec, credentials)),
                    other => unreachable!("a declaration is authorized as one, not as {other:?}"),
                }
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
            redact_url(&spec.repo_url),
            spec.branch.clone(),
        );
        let place = Place {
            repo_url: spec.repo_url.clone(),
            branch: spec.branch.clone(),
            base_folder: spec.base_folder.clone(),
        };
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

    async fn forward(
        &mut self,
        key: &str,
        sequence: u64,
        operation: Result<Operation, Rejection>,
        grant: Option<&ClientGrant>,
    ) {
        let Some(destination) = self.destinations.get_mut(key) else {
            let rejection = reject(
                RejectReason::UnknownDestination,
                format!("destination {key:?} was not declared on this stream"),
            );
            self.send_reject(key, sequence, rejection);
            return;
        };
        // The grant may have narrowed since the declaration (a reloaded configuration).
        if let Err(rejection) = authorize(grant, Asks::Write(&destination.place)) {
            destination.last_sequence = destination.last_sequence.max(sequence);
            self.send_reject(key, sequence, rejection);
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
    use crate::authz::{Grant, Pattern};
    use crate::git::GitCredentials;

    fn grant(allow_agent_credentials: bool) -> ClientGrant {
        ClientGrant {
            identity: "team-a".into(),
            cluster_uids: vec!["uid-a".into()],
            cluster_names: Vec::new(),
            grants: vec![Grant {
                repos: vec![Pattern::parse("https://git.example.com/acme/*")],
                branches: vec![Pattern::parse("main")],
                base_folders: vec!["clusters/a".into()],
            }],
            allow_agent_credentials,
            admin: false,
        }
    }

    fn identity(uid: &str) -> ClusterIdentity {
        ClusterIdentity {
            cluster_uid: uid.into(),
            cluster_name: "a".into(),
            instance_id: "agent-0".into(),
            controller_namespace: "ns".into(),
            controller_name: "agent".into(),
            leader_term: None,
        }
    }

    fn place(base_folder: &str) -> Place {
        Place {
            repo_url: "https://git.example.com/acme/state.git".into(),
            branch: "main".into(),
            base_folder: base_folder.into(),
        }
    }

    fn inline() -> DeclaredCredentials {
        DeclaredCredentials::Inline(GitCredentials::Token("t0ken".into()))
    }

    fn declare(
        grant: Option<&ClientGrant>,
        base_folder: &str,
        credentials: DeclaredCredentials,
        writer_has_credentials: bool,
    ) -> Result<Authorized, Rejection> {
        authorize(
            grant,
            Asks::Declare {
                place: place(base_folder),
                credentials,
                writer_has_credentials,
            },
        )
    }

    #[test]
    fn without_a_configuration_everything_is_authorized_as_asked() {
        assert!(matches!(
            authorize(None, Asks::Connect(&identity("any"))),
            Ok(Authorized::Connect)
        ));
        assert!(matches!(
            declare(None, "anywhere", inline(), false),
            Ok(Authorized::Declare(DeclaredCredentials::Inline(_)))
        ));
        assert!(matches!(
            authorize(None, Asks::Write(&place("anywhere"))),
            Ok(Authorized::Write)
        ));
    }

    #[test]
    fn a_grant_limits_the_cluster_the_place_and_the_agents_own_credentials() {
        let strict = grant(false);
        assert!(authorize(Some(&strict), Asks::Connect(&identity("uid-a"))).is_ok());
        let refused = authorize(Some(&strict), Asks::Connect(&identity("uid-b"))).unwrap_err();
        assert_eq!(refused.reason, RejectReason::Forbidden);

        assert!(matches!(
            declare(
                Some(&strict),
                "clusters/a/x",
                DeclaredCredentials::None,
                false
            ),
            Ok(Authorized::Declare(DeclaredCredentials::None))
        ));
        let outside = declare(
            Some(&strict),
            "clusters/b",
            DeclaredCredentials::None,
            false,
        );
        assert_eq!(outside.unwrap_err().reason, RejectReason::Forbidden);

        // The agent's own credentials: refused, unless the writer has its own (then they are dropped unused).
        let own = declare(Some(&strict), "clusters/a", inline(), false).unwrap_err();
        assert_eq!(own.reason, RejectReason::Forbidden);
        assert!(
            own.message.contains("allowAgentCredentials"),
            "{}",
            own.message
        );
        assert!(!own.message.contains("t0ken"), "{}", own.message);
        assert!(matches!(
            declare(Some(&strict), "clusters/a", inline(), true),
            Ok(Authorized::Declare(DeclaredCredentials::None))
        ));
        assert!(matches!(
            declare(Some(&grant(true)), "clusters/a", inline(), false),
            Ok(Authorized::Declare(DeclaredCredentials::Inline(_)))
        ));
    }

    #[test]
    fn a_narrowed_grant_refuses_changes_for_a_place_declared_under_the_old_one() {
        let declared = place("clusters/a");
        assert!(authorize(Some(&grant(false)), Asks::Write(&declared)).is_ok());
        let mut narrowed = grant(false);
        narrowed.grants[0].base_folders = vec!["clusters/other".into()];
        let refused = authorize(Some(&narrowed), Asks::Write(&declared)).unwrap_err();
        assert_eq!(refused.reason, RejectReason::Forbidden);
    }
}
