//! Conversions between the protocol and the writer's domain, in both directions, and nowhere else: an agent's
//! message is decoded and checked here into the session's [`Inbound`] (a validated hello, destination declaration
//! or change, or the [`Rejection`] it earns), and the session's and workers' [`Reply`] values become
//! `WriterMessage`s here. The checks are pure; the gRPC layer runs [`inbound`] on the blocking pool, ahead of the
//! session (the YAML check is the costliest step of a stream).

use std::sync::Arc;

use reverser_common::reasons::RejectReason;
use reverser_common::{paths, sops, yaml};
use reverser_proto::{
    PROTOCOL_VERSION,
    v1::{self as pb, agent_message::Kind, writer_message},
};

use crate::{
    fencing::Term,
    git::GitCredentials,
    model::{
        ClusterIdentity, DestinationId, DestinationSpec, FlushOrder, KustomizationMode, ObjectId,
        Operation, Placement, Prune, Scope,
    },
    names::{redact_url, validate_branch_name},
    registry::DeclaredCredentials,
    reply::{Condition, FlushOutcome, FlushResult, Reply, SuspendPreview},
    session::{Declaration, Hello, Inbound, Rejection, SessionLimits, reject},
};

/// Decodes and checks one agent message (see the module notes).
pub fn inbound(message: pb::AgentMessage, limits: &SessionLimits) -> Inbound {
    let Some(kind) = message.kind else {
        return Inbound::Empty;
    };
    match kind {
        Kind::Hello(hello) => Inbound::Hello(validate_hello(&hello).and_then(|identity| {
            Ok(Hello {
                identity,
                term: validate_leader_term(&hello)?,
            })
        })),
        Kind::Destination(message) => Inbound::Destination {
            declaration: validate_destination("", &message)
                .map(|(spec, credentials)| Declaration { spec, credentials }),
            key: message.key,
        },
        Kind::Upsert(upsert) => Inbound::Change {
            kind: "upsert",
            operation: validate_upsert(&upsert.path, &upsert.content, limits).map(|()| {
                Operation::Upsert {
                    path: upsert.path,
                    content: upsert.content.into(),
                    object: object_id(upsert.object),
                    author: (!upsert.author.is_empty()).then_some(upsert.author),
                    fingerprint: (!upsert.fingerprint.is_empty()).then_some(upsert.fingerprint),
                }
            }),
            destination: upsert.destination,
            sequence: upsert.sequence,
        },
        Kind::Delete(delete) => Inbound::Change {
            kind: "delete",
            operation: paths::validate_object_path(&delete.path)
                .map_err(|e| reject(RejectReason::InvalidPath, e.to_string()))
                .map(|()| Operation::Delete {
                    path: delete.path,
                    object: object_id(delete.object),
                    author: (!delete.author.is_empty()).then_some(delete.author),
                }),
            destination: delete.destination,
            sequence: delete.sequence,
        },
        Kind::SnapshotBegin(begin) => Inbound::Change {
            kind: "snapshot_begin",
            operation: validate_scope(begin.scope.as_ref()).map(|scope| Operation::SnapshotBegin {
                scope,
                epoch: begin.epoch,
            }),
            destination: begin.destination,
            sequence: begin.sequence,
        },
        Kind::SnapshotEnd(end) => Inbound::Change {
            kind: "snapshot_end",
            operation: validate_scope(end.scope.as_ref()).map(|scope| Operation::SnapshotEnd {
                scope,
                epoch: end.epoch,
            }),
            destination: end.destination,
            sequence: end.sequence,
        },
        Kind::Flush(flush) => Inbound::Change {
            kind: "flush",
            operation: validate_flush(&flush).map(|order| Operation::Flush(Arc::new(order))),
            destination: flush.destination,
            sequence: flush.sequence,
        },
    }
}

fn object_id(value: Option<pb::ObjectIdentity>) -> ObjectId {
    let value = value.unwrap_or_default();
    ObjectId {
        group: value.group,
        version: value.version,
        resource: value.resource,
        namespace: value.namespace,
        name: value.name,
    }
}

/// The wire form of the destination modes.
pub trait WireEnum: Sized {
    type Proto;
    /// The wire value; `None` for a value this writer does not know.
    fn from_proto(value: i32) -> Option<Self>;
    fn to_proto(self) -> Self::Proto;
}

impl WireEnum for KustomizationMode {
    type Proto = pb::KustomizationMode;

    fn from_proto(value: i32) -> Option<Self> {
        match pb::KustomizationMode::try_from(value).ok()? {
            pb::KustomizationMode::Unspecified | pb::KustomizationMode::Off => Some(Self::Off),
            pb::KustomizationMode::Maintain => Some(Self::Maintain),
            pb::KustomizationMode::Create => Some(Self::Create),
        }
    }

    fn to_proto(self) -> pb::KustomizationMode {
        match self {
            Self::Off => pb::KustomizationMode::Off,
            Self::Maintain => pb::KustomizationMode::Maintain,
            Self::Create => pb::KustomizationMode::Create,
        }
    }
}

impl WireEnum for Prune {
    type Proto = pb::PruneMode;

    fn from_proto(value: i32) -> Option<Self> {
        match pb::PruneMode::try_from(value).ok()? {
            pb::PruneMode::Unspecified | pb::PruneMode::OnSnapshot => Some(Prune::OnSnapshot),
            pb::PruneMode::OnDelete => Some(Prune::OnDelete),
            pb::PruneMode::Never => Some(Prune::Never),
        }
    }

    fn to_proto(self) -> pb::PruneMode {
        match self {
            Prune::OnSnapshot => pb::PruneMode::OnSnapshot,
            Prune::OnDelete => pb::PruneMode::OnDelete,
            Prune::Never => pb::PruneMode::Never,
        }
    }
}

impl From<Reply> for pb::WriterMessage {
    fn from(reply: Reply) -> Self {
        let kind = match reply {
            Reply::Welcome {
                max_message_bytes,
                max_object_bytes,
            } => writer_message::Kind::Welcome(pb::Welcome {
                protocol_version: PROTOCOL_VERSION,
                writer_version: env!("CARGO_PKG_VERSION").to_owned(),
                max_message_bytes,
                max_object_bytes,
            }),
            Reply::Ack {
                destination,
                sequence,
                commit_sha,
            } => writer_message::Kind::Ack(pb::Ack {
                destination,
                sequence,
                commit_sha,
            }),
            Reply::Reject {
                destination,
                sequence,
                reason,
                message,
            } => writer_message::Kind::Reject(pb::Reject {
                destination,
                sequence,
                reason: reason.as_str().to_owned(),
                message,
            }),
            Reply::Status(condition) => {
                writer_message::Kind::DestinationStatus(destination_status(condition))
            }
            Reply::SweepReport {
                destination,
                deleted,
                left,
                commit_sha,
            } => writer_message::Kind::SweepReport(pb::SweepReport {
                destination,
                deleted,
                left,
                commit_sha,
            }),
            Reply::SuspendPreview(preview) => {
                writer_message::Kind::SuspendPreview(suspend_preview(preview))
            }
            Reply::FlushResult(result) => writer_message::Kind::FlushResult(flush_result(result)),
        };
        pb::WriterMessage { kind: Some(kind) }
    }
}

/// A condition as the protocol (and `WriterAdmin.ListDestinations`) shows it.
pub fn destination_status(condition: Condition) -> pb::DestinationStatus {
    pb::DestinationStatus {
        destination: condition.destination,
        r#type: condition.kind.as_str().to_owned(),
        status: if condition.status { "True" } else { "False" }.to_owned(),
        reason: condition.reason.as_str().to_owned(),
        message: condition.message,
    }
}

fn suspend_preview(preview: SuspendPreview) -> pb::SuspendPreview {
    let SuspendPreview {
        destination,
        added,
        changed,
        deleted,
        added_paths,
        changed_paths,
        deleted_paths,
        paths_cap,
        base_commit,
        held_messages,
    } = preview;
    pb::SuspendPreview {
        destination,
        added,
        changed,
        deleted,
        added_paths,
        changed_paths,
        deleted_paths,
        paths_cap,
        base_commit,
        held_messages,
    }
}

fn flush_result(result: FlushResult) -> pb::FlushResult {
    let outcome = match result.outcome {
        FlushOutcome::Committed => pb::FlushOutcome::Committed,
        FlushOutcome::NothingPending => pb::FlushOutcome::NothingPending,
    };
    pb::FlushResult {
        destination: result.destination,
        request_uid: result.request_uid,
        commit_sha: result.commit_sha,
        outcome: outcome as i32,
        branch: result.branch,
        message: result.message,
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
                redact_url(&message.repo_url)
            ),
        ));
    }
    validate_branch_name(&message.branch)
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
    check_object(content)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_modes_round_trip_the_wire_and_unknown_values_are_refused() {
        for mode in [Prune::OnSnapshot, Prune::OnDelete, Prune::Never] {
            assert_eq!(Prune::from_proto(mode.to_proto() as i32), Some(mode));
        }
        assert_eq!(Prune::from_proto(0), Some(Prune::OnSnapshot));
        assert_eq!(Prune::from_proto(42), None);
    }

    #[test]
    fn flush_outcomes_log_as_the_protocol_names_them() {
        for outcome in [FlushOutcome::Committed, FlushOutcome::NothingPending] {
            let wire = flush_result(FlushResult {
                destination: String::new(),
                request_uid: String::new(),
                commit_sha: String::new(),
                outcome,
                branch: String::new(),
                message: String::new(),
            })
            .outcome();
            assert_eq!(outcome.as_str(), wire.as_str_name());
        }
    }

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
