//! The stream client's pure core: sequence numbers, the unacked backlog, and what goes out on a connection.
//!
//! Every change event gets the next sequence number of its destination (never reused for the life of the
//! process) and stays in its destination's queue, in order, until an `Ack` covers it or a `Reject` names it.
//! While a connection is up, [`Backlog`] also keeps that connection's send queue: on a new connection it holds
//! every destination declaration (in declaration order) followed by every unacked message (in arrival order);
//! later events are appended as they arrive.
//!
//! Snapshot safety. A `SnapshotEnd` makes the writer delete the scope's files that were not upserted since the
//! matching `SnapshotBegin`, so an end must never reach the writer unless its whole epoch went out on the same
//! connection. Two rules enforce that:
//!
//! - An end is only sent when its begin was queued on the *current* connection. When the begin was acked on an
//!   earlier connection (so it is not re-sent), the upserts acked before it are not re-sent either and the seen
//!   set would be incomplete: the end is dropped instead ([`Abandoned`], reported to ingestion, which re-lists
//!   after every reconnect anyway). The writer would refuse it too (`SnapshotMismatch`), but not reliably: see
//!   the next rule.
//! - Epochs on the wire are unique per connection: each begin gets a fresh wire epoch, and its end carries the
//!   same one. An old stream the writer is still draining (its session blocked on a full worker queue) may
//!   deliver a stale begin or end after the new stream re-opened the same scope; with distinct wire epochs a
//!   stale end can never close the new stream's snapshot (the worker matches snapshots by destination and
//!   scope, not by stream), so nothing is deleted on a partial seen set.

use std::{
    collections::{HashMap, VecDeque},
    time::SystemTime,
};

use reverser_proto::v1::{self as pb, agent_message::Kind};

use crate::crd::{KustomizationMode, PruneMode};
use crate::credentials::GitCredentials;
use crate::events::{AgentEvent, DestinationDecl, ObjectRef, ScopeRef};

/// A `SnapshotEnd` dropped because its epoch did not go out whole on the current connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Abandoned {
    pub destination: String,
    pub sequence: u64,
    pub scope: ScopeRef,
    pub epoch: u64,
}

#[derive(Debug)]
struct Pending {
    sequence: u64,
    /// Arrival order across destinations, so a re-send keeps the original interleaving.
    order: u64,
    seen_at: SystemTime,
    event: AgentEvent,
}

#[derive(Debug, Default)]
struct Destination {
    decl: Option<DestinationDecl>,
    last_sequence: u64,
    pending: VecDeque<Pending>,
}

#[derive(Debug)]
enum Outgoing {
    Declare(DestinationDecl),
    Message {
        destination: String,
        sequence: u64,
        wire_epoch: Option<u64>,
    },
}

#[derive(Debug, Default)]
struct Connection {
    outgoing: VecDeque<Outgoing>,
    /// Snapshots begun on this connection: (destination, scope) → (ingestion epoch, wire epoch).
    open: HashMap<(String, ScopeRef), (u64, u64)>,
}

/// Unacked messages per destination plus the current connection's send queue.
#[derive(Debug)]
pub struct Backlog {
    destinations: HashMap<String, Destination>,
    /// Declared keys in the order of their latest declaration: re-declaring in that order on a new connection
    /// cannot trip the writer's overlapping-base-folder check with a stale declaration.
    declared: Vec<String>,
    unacked: usize,
    next_order: u64,
    next_wire_epoch: u64,
    connection: Option<Connection>,
}

impl Default for Backlog {
    fn default() -> Self {
        Self::new()
    }
}

impl Backlog {
    pub fn new() -> Self {
        // Wire epochs start at the clock so that a restarted agent does not reuse the epochs of its previous
        // run (the writer may still drain that run's last stream).
        let start = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2))
            .unwrap_or(1);
        Self::with_first_wire_epoch(start.max(1))
    }

    fn with_first_wire_epoch(first: u64) -> Self {
        Self {
            destinations: HashMap::new(),
            declared: Vec::new(),
            unacked: 0,
            next_order: 0,
            next_wire_epoch: first,
            connection: None,
        }
    }

    /// Messages (upserts, deletes, snapshot boundaries) not yet acked or rejected.
    pub fn unacked(&self) -> usize {
        self.unacked
    }

    /// Whether the current connection has something queued.
    pub fn has_outgoing(&self) -> bool {
        self.connection
            .as_ref()
            .is_some_and(|c| !c.outgoing.is_empty())
    }

    /// Takes an event from ingestion: numbers it and, when connected, queues it for sending.
    pub fn accept(&mut self, event: AgentEvent, now: SystemTime) -> Option<Abandoned> {
        let key = match &event {
            AgentEvent::Destination(decl) => {
                self.declared.retain(|k| *k != decl.key);
                self.declared.push(decl.key.clone());
                self.destinations.entry(decl.key.clone()).or_default().decl = Some(decl.clone());
                if let Some(connection) = &mut self.connection {
                    connection
                        .outgoing
                        .push_back(Outgoing::Declare(decl.clone()));
                }
                return None;
            }
            AgentEvent::Upsert { destination, .. }
            | AgentEvent::Delete { destination, .. }
            | AgentEvent::SnapshotBegin { destination, .. }
            | AgentEvent::SnapshotEnd { destination, .. }
            | AgentEvent::Flush { destination, .. } => destination.clone(),
        };
        let destination = self.destinations.entry(key.clone()).or_default();
        destination.last_sequence += 1;
        let sequence = destination.last_sequence;
        destination.pending.push_back(Pending {
            sequence,
            order: self.next_order,
            seen_at: now,
            event,
        });
        self.next_order += 1;
        self.unacked += 1;
        if self.connection.is_some() {
            return self.enqueue(&key, sequence);
        }
        None
    }

    /// A connection is up (the writer welcomed it): queue every declaration, then every unacked message.
    pub fn begin_connection(&mut self) -> Vec<Abandoned> {
        let mut connection = Connection::default();
        for key in &self.declared {
            if let Some(decl) = self.destinations.get(key).and_then(|d| d.decl.clone()) {
                connection.outgoing.push_back(Outgoing::Declare(decl));
            }
        }
        self.connection = Some(connection);
        self.drop_superseded();
        let mut resend: Vec<(u64, String, u64)> = self
            .destinations
            .iter()
            .flat_map(|(key, d)| d.pending.iter().map(|p| (p.order, key.clone(), p.sequence)))
            .collect();
        resend.sort_unstable();
        resend
            .into_iter()
            .filter_map(|(_, key, sequence)| self.enqueue(&key, sequence))
            .collect()
    }

    /// Before a re-send, keeps only the newest unacked upsert/delete per path between two snapshot markers.
    /// Why: the older ones may already be pushed (only their acks were lost); re-sending them would make the
    /// writer commit the old content again before the new one (a visible rollback in the history). Within one
    /// segment the newest message carries everything the writer needs, including snapshot membership; the
    /// dropped sequence numbers simply become gaps, which the protocol allows.
    fn drop_superseded(&mut self) {
        for destination in self.destinations.values_mut() {
            let mut newer_paths: std::collections::HashSet<String> =
                std::collections::HashSet::new();
            let before = destination.pending.len();
            let mut keep = vec![true; before];
            for (index, pending) in destination.pending.iter().enumerate().rev() {
                match &pending.event {
                    AgentEvent::Upsert { path, .. } | AgentEvent::Delete { path, .. } => {
                        if !newer_paths.insert(path.clone()) {
                            keep[index] = false;
                        }
                    }
                    AgentEvent::SnapshotBegin { .. } | AgentEvent::SnapshotEnd { .. } => {
                        newer_paths.clear()
                    }
                    AgentEvent::Destination(_) | AgentEvent::Flush { .. } => {}
                }
            }
            let mut flags = keep.into_iter();
            destination.pending.retain(|_| flags.next().unwrap_or(true));
            self.unacked -= before - destination.pending.len();
        }
    }

    /// The connection is gone: what was queued but not sent stays unacked for the next one.
    pub fn end_connection(&mut self) {
        self.connection = None;
    }

    /// Queues one pending message on the current connection, applying the snapshot rules.
    fn enqueue(&mut self, key: &str, sequence: u64) -> Option<Abandoned> {
        let connection = self.connection.as_mut()?;
        let destination = self.destinations.get_mut(key)?;
        let index = position(&destination.pending, sequence)?;
        let wire_epoch = match &destination.pending[index].event {
            AgentEvent::SnapshotBegin { scope, epoch, .. } => {
                let wire = self.next_wire_epoch;
                self.next_wire_epoch += 1;
                connection
                    .open
                    .insert((key.to_owned(), scope.clone()), (*epoch, wire));
                Some(wire)
            }
            AgentEvent::SnapshotEnd { scope, epoch, .. } => {
                let slot = (key.to_owned(), scope.clone());
                match connection.open.get(&slot) {
                    Some(&(open_epoch, wire)) if open_epoch == *epoch => {
                        connection.open.remove(&slot);
                        Some(wire)
                    }
                    _ => {
                        // Its begin did not go out on this connection: the seen set would be incomplete.
                        let abandoned = Abandoned {
                            destination: key.to_owned(),
                            sequence,
                            scope: scope.clone(),
                            epoch: *epoch,
                        };
                        destination.pending.remove(index);
                        self.unacked -= 1;
                        return Some(abandoned);
                    }
                }
            }
            _ => None,
        };
        connection.outgoing.push_back(Outgoing::Message {
            destination: key.to_owned(),
            sequence,
            wire_epoch,
        });
        None
    }

    /// The next message to send on the current connection; `true` when it carries a sequence number. Messages
    /// acked or rejected since they were queued are skipped.
    pub fn next_message(&mut self) -> Option<(pb::AgentMessage, bool)> {
        let connection = self.connection.as_mut()?;
        while let Some(outgoing) = connection.outgoing.pop_front() {
            match outgoing {
                Outgoing::Declare(decl) => return Some((declare_message(&decl), false)),
                Outgoing::Message {
                    destination,
                    sequence,
                    wire_epoch,
                } => {
                    let Some(d) = self.destinations.get(&destination) else {
                        continue;
                    };
                    let Some(index) = position(&d.pending, sequence) else {
                        continue;
                    };
                    let pending = &d.pending[index];
                    return Some((
                        change_message(&pending.event, sequence, pending.seen_at, wire_epoch),
                        true,
                    ));
                }
            }
        }
        None
    }

    /// The CommitRequest uid of the unacked flush `sequence` of `destination`, if it is one.
    pub fn flush_request(&self, destination: &str, sequence: u64) -> Option<String> {
        let d = self.destinations.get(destination)?;
        match &d.pending[position(&d.pending, sequence)?].event {
            AgentEvent::Flush { request_uid, .. } => Some(request_uid.clone()),
            _ => None,
        }
    }

    /// An `Ack`: every message of `destination` up to `sequence` is done. Returns how many were dropped.
    pub fn ack(&mut self, destination: &str, sequence: u64) -> usize {
        let Some(d) = self.destinations.get_mut(destination) else {
            return 0;
        };
        let before = d.pending.len();
        while d.pending.front().is_some_and(|p| p.sequence <= sequence) {
            d.pending.pop_front();
        }
        let dropped = before - d.pending.len();
        self.unacked -= dropped;
        dropped
    }

    /// Drops a message that cannot go to the writer (too large) without sending it: it is never re-sent. The
    /// object still exists, so the snapshots of its scope that are open on this connection, or whose end is still
    /// pending, must not delete it as an orphan: their ends are dropped ([`Abandoned`]).
    pub fn skip(&mut self, destination: &str, sequence: u64) -> Vec<Abandoned> {
        let object = self.destinations.get(destination).and_then(|d| {
            let pending = &d.pending[position(&d.pending, sequence)?];
            match &pending.event {
                AgentEvent::Upsert { object, .. } | AgentEvent::Delete { object, .. } => {
                    Some(object.clone())
                }
                _ => None,
            }
        });
        self.reject(destination, sequence);
        let Some(object) = object else {
            return Vec::new();
        };
        let covers = |scope: &ScopeRef| {
            scope.group == object.group
                && scope.version == object.version
                && scope.resource == object.resource
                && (scope.namespace.is_empty() || scope.namespace == object.namespace)
        };
        if let Some(connection) = &mut self.connection {
            connection
                .open
                .retain(|(key, scope), _| !(key == destination && covers(scope)));
        }
        let Some(d) = self.destinations.get_mut(destination) else {
            return Vec::new();
        };
        let mut abandoned = Vec::new();
        d.pending.retain(|p| match &p.event {
            AgentEvent::SnapshotEnd { scope, epoch, .. }
                if p.sequence > sequence && covers(scope) =>
            {
                abandoned.push(Abandoned {
                    destination: destination.to_owned(),
                    sequence: p.sequence,
                    scope: scope.clone(),
                    epoch: *epoch,
                });
                false
            }
            _ => true,
        });
        self.unacked -= abandoned.len();
        abandoned
    }

    /// A `Reject` naming one message: it must not be re-sent. Returns whether it was still unacked.
    pub fn reject(&mut self, destination: &str, sequence: u64) -> bool {
        let Some(d) = self.destinations.get_mut(destination) else {
            return false;
        };
        match position(&d.pending, sequence) {
            Some(index) => {
                d.pending.remove(index);
                self.unacked -= 1;
                true
            }
            None => false,
        }
    }
}

fn position(pending: &VecDeque<Pending>, sequence: u64) -> Option<usize> {
    pending.binary_search_by_key(&sequence, |p| p.sequence).ok()
}

/// The protobuf form of a repository's credentials, for the `Destination` message only (never log it: prost's
/// Debug prints values).
fn credentials_to_proto(credentials: &GitCredentials) -> pb::Credentials {
    use pb::credentials::Kind;
    let kind = match credentials {
        GitCredentials::Basic { username, password } => Kind::Basic(pb::BasicAuth {
            username: username.clone(),
            password: password.clone(),
        }),
        GitCredentials::Token(token) => Kind::Token(token.clone()),
        GitCredentials::Ssh {
            username,
            private_key,
            passphrase,
            known_hosts,
        } => Kind::Ssh(pb::SshKey {
            username: username.clone(),
            private_key: private_key.clone(),
            passphrase: passphrase.clone().unwrap_or_default(),
            known_hosts: known_hosts.clone(),
        }),
    };
    pb::Credentials { kind: Some(kind) }
}

fn declare_message(decl: &DestinationDecl) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(Kind::Destination(pb::Destination {
            key: decl.key.clone(),
            repo_url: decl.repo_url.clone(),
            branch: decl.branch.clone(),
            base_folder: decl.base_folder.clone(),
            exclusive_mode: decl.exclusive_mode,
            // Inline credentials (from a secretRef Secret) go before a reference to the writer's own.
            credentials: decl
                .credentials
                .as_deref()
                .map(credentials_to_proto)
                .or_else(|| {
                    decl.credentials_reference
                        .clone()
                        .map(|name| pb::Credentials {
                            kind: Some(pb::credentials::Kind::Reference(name)),
                        })
                }),
            age_recipients: decl
                .encryption
                .as_ref()
                .map(|e| e.recipients.clone())
                .unwrap_or_default(),
            prune: match decl.prune {
                PruneMode::OnSnapshot => pb::PruneMode::OnSnapshot,
                PruneMode::OnDelete => pb::PruneMode::OnDelete,
                PruneMode::Never => pb::PruneMode::Never,
            }
            .into(),
            commit_message: decl
                .commit_message
                .as_ref()
                .map(|t| pb::CommitMessageTemplate {
                    subject: t.subject.clone(),
                    body: t.body.clone(),
                }),
            suspend: decl.suspend,
            kustomization: match decl.placement.kustomization {
                KustomizationMode::Off => pb::KustomizationMode::Off,
                KustomizationMode::Maintain => pb::KustomizationMode::Maintain,
                KustomizationMode::Create => pb::KustomizationMode::Create,
            }
            .into(),
            omit_namespace: decl.placement.omit_namespace,
        })),
    }
}

fn identity(object: &ObjectRef) -> pb::ObjectIdentity {
    pb::ObjectIdentity {
        group: object.group.clone(),
        version: object.version.clone(),
        resource: object.resource.clone(),
        namespace: object.namespace.clone(),
        name: object.name.clone(),
        uid: object.uid.clone(),
        resource_version: object.resource_version.clone(),
    }
}

fn scope(scope: &ScopeRef) -> pb::SnapshotScope {
    pb::SnapshotScope {
        group: scope.group.clone(),
        version: scope.version.clone(),
        resource: scope.resource.clone(),
        namespace: scope.namespace.clone(),
    }
}

/// The wire form of a change event. Snapshot boundaries carry `wire_epoch` (see the module docs).
fn change_message(
    event: &AgentEvent,
    sequence: u64,
    seen_at: SystemTime,
    wire_epoch: Option<u64>,
) -> pb::AgentMessage {
    let kind = match event {
        AgentEvent::Destination(decl) => return declare_message(decl),
        AgentEvent::Upsert {
            destination,
            path,
            yaml,
            object,
            created,
            author,
            fingerprint,
        } => Kind::Upsert(pb::Upsert {
            sequence,
            destination: destination.clone(),
            path: path.clone(),
            content: yaml.as_bytes().to_vec(),
            object: Some(identity(object)),
            operation: if *created {
                pb::Operation::Create
            } else {
                pb::Operation::Update
            } as i32,
            author: author.clone().unwrap_or_default(),
            event_time: Some(seen_at.into()),
            fingerprint: fingerprint.clone().unwrap_or_default(),
        }),
        AgentEvent::Delete {
            destination,
            path,
            object,
            author,
        } => Kind::Delete(pb::Delete {
            sequence,
            destination: destination.clone(),
            path: path.clone(),
            object: Some(identity(object)),
            author: author.clone().unwrap_or_default(),
            event_time: Some(seen_at.into()),
        }),
        AgentEvent::SnapshotBegin {
            destination,
            scope: s,
            epoch,
        } => Kind::SnapshotBegin(pb::SnapshotBegin {
            sequence,
            destination: destination.clone(),
            scope: Some(scope(s)),
            epoch: wire_epoch.unwrap_or(*epoch),
        }),
        AgentEvent::SnapshotEnd {
            destination,
            scope: s,
            epoch,
        } => Kind::SnapshotEnd(pb::SnapshotEnd {
            sequence,
            destination: destination.clone(),
            scope: Some(scope(s)),
            epoch: wire_epoch.unwrap_or(*epoch),
        }),
        AgentEvent::Flush {
            destination,
            message,
            author,
            request_name,
            request_uid,
        } => Kind::Flush(pb::FlushDestination {
            sequence,
            destination: destination.clone(),
            message: message.clone().unwrap_or_default(),
            author: author.clone().unwrap_or_default(),
            request_name: request_name.clone(),
            request_uid: request_uid.clone(),
        }),
    };
    pb::AgentMessage { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decl(key: &str, folder: &str) -> AgentEvent {
        AgentEvent::Destination(DestinationDecl {
            key: key.into(),
            repo_url: "file:///tmp/repo.git".into(),
            branch: "main".into(),
            base_folder: folder.into(),
            exclusive_mode: false,
            credentials_reference: None,
            credentials: None,
            encryption: None,
            prune: Default::default(),
            commit_message: None,
            suspend: false,
            placement: Default::default(),
        })
    }

    fn upsert(dest: &str, name: &str) -> AgentEvent {
        AgentEvent::Upsert {
            destination: dest.into(),
            path: format!("core/v1/configmaps/ns/{name}.yaml"),
            yaml: format!("kind: ConfigMap\nmetadata:\n  name: {name}\n"),
            object: ObjectRef::default(),
            created: true,
            author: None,
            fingerprint: None,
        }
    }

    fn configmaps() -> ScopeRef {
        ScopeRef {
            group: String::new(),
            version: "v1".into(),
            resource: "configmaps".into(),
            namespace: "ns".into(),
        }
    }

    fn begin(dest: &str, epoch: u64) -> AgentEvent {
        AgentEvent::SnapshotBegin {
            destination: dest.into(),
            scope: configmaps(),
            epoch,
        }
    }

    fn end(dest: &str, epoch: u64) -> AgentEvent {
        AgentEvent::SnapshotEnd {
            destination: dest.into(),
            scope: configmaps(),
            epoch,
        }
    }

    /// Everything queued on the current connection, as (kind, destination, sequence, epoch).
    fn drain(backlog: &mut Backlog) -> Vec<(&'static str, String, u64, u64)> {
        let mut out = Vec::new();
        while let Some((message, _)) = backlog.next_message() {
            out.push(match message.kind.unwrap() {
                Kind::Destination(d) => ("destination", d.key, 0, 0),
                Kind::Upsert(u) => ("upsert", u.destination, u.sequence, 0),
                Kind::Delete(d) => ("delete", d.destination, d.sequence, 0),
                Kind::SnapshotBegin(b) => ("begin", b.destination, b.sequence, b.epoch),
                Kind::SnapshotEnd(e) => ("end", e.destination, e.sequence, e.epoch),
                Kind::Hello(_) => ("hello", String::new(), 0, 0),
                Kind::Flush(f) => ("flush", f.destination, f.sequence, 0),
            });
        }
        out
    }

    fn now() -> SystemTime {
        SystemTime::now()
    }

    #[test]
    fn proto_form_carries_the_values() {
        use reverser_proto::v1::{BasicAuth, credentials::Kind};
        let basic = GitCredentials::Basic {
            username: "u".into(),
            password: "p".into(),
        };
        assert_eq!(
            credentials_to_proto(&basic).kind,
            Some(Kind::Basic(BasicAuth {
                username: "u".into(),
                password: "p".into()
            }))
        );
        assert_eq!(
            credentials_to_proto(&GitCredentials::Token("t".into())).kind,
            Some(Kind::Token("t".into()))
        );
    }

    #[test]
    fn a_re_send_keeps_only_the_newest_change_per_path_within_a_snapshot_segment() {
        let mut backlog = Backlog::with_first_wire_epoch(1);
        backlog.accept(decl("a/x", "x"), now());
        backlog.begin_connection();
        backlog.accept(upsert("a/x", "1"), now()); // 1: superseded by 3 (same segment)
        backlog.accept(upsert("a/x", "2"), now()); // 2
        backlog.accept(upsert("a/x", "1"), now()); // 3
        backlog.accept(begin("a/x", 7), now()); // 4
        backlog.accept(upsert("a/x", "1"), now()); // 5: other segment, kept
        backlog.accept(end("a/x", 7), now()); // 6
        drain(&mut backlog);
        backlog.end_connection();
        // All acks were lost: the reconnect re-sends, without the superseded sequence 1.
        backlog.begin_connection();
        let resent: Vec<u64> = drain(&mut backlog)
            .into_iter()
            .filter(|(k, ..)| *k != "destination")
            .map(|(_, _, s, _)| s)
            .collect();
        assert_eq!(resent, vec![2, 3, 4, 5, 6]);
        assert_eq!(
            backlog.ack("a/x", 6),
            5,
            "the dropped message no longer counts as unacked"
        );
    }

    #[test]
    fn sequences_count_per_destination_and_are_never_reused_across_connections() {
        let mut backlog = Backlog::with_first_wire_epoch(100);
        backlog.accept(decl("a/x", "x"), now());
        backlog.accept(decl("a/y", "y"), now());
        backlog.begin_connection();
        backlog.accept(upsert("a/x", "1"), now());
        backlog.accept(upsert("a/y", "1"), now());
        backlog.accept(upsert("a/x", "2"), now());
        let sent = drain(&mut backlog);
        assert_eq!(
            sent.iter()
                .map(|(_, d, s, _)| (d.as_str(), *s))
                .collect::<Vec<_>>(),
            [("a/x", 0), ("a/y", 0), ("a/x", 1), ("a/y", 1), ("a/x", 2)]
        );
        assert_eq!(backlog.ack("a/x", 2), 2);
        backlog.end_connection();
        backlog.begin_connection();
        backlog.accept(upsert("a/x", "3"), now());
        let sent = drain(&mut backlog);
        assert_eq!(
            sent.iter()
                .map(|(_, d, s, _)| (d.as_str(), *s))
                .collect::<Vec<_>>(),
            [("a/x", 0), ("a/y", 0), ("a/y", 1), ("a/x", 3)],
            "re-declared, unacked a/y#1 re-sent with its number, then a/x continues at 3"
        );
    }

    #[test]
    fn an_ack_covers_every_earlier_sequence_of_its_destination_only() {
        let mut backlog = Backlog::with_first_wire_epoch(100);
        for name in ["1", "2", "3"] {
            backlog.accept(upsert("a/x", name), now());
            backlog.accept(upsert("a/y", name), now());
        }
        assert_eq!(backlog.unacked(), 6);
        assert_eq!(backlog.ack("a/x", 2), 2);
        assert_eq!(backlog.ack("a/x", 2), 0, "acks are idempotent");
        assert_eq!(backlog.ack("a/unknown", 9), 0);
        assert_eq!(backlog.unacked(), 4);
        assert_eq!(backlog.ack("a/y", 3), 3);
        assert_eq!(backlog.unacked(), 1);
    }

    #[test]
    fn a_skipped_object_drops_the_snapshot_ends_of_its_scope_only() {
        let in_scope = |name: &str| match upsert("a/x", name) {
            AgentEvent::Upsert {
                destination,
                path,
                yaml,
                ..
            } => AgentEvent::Upsert {
                destination,
                path,
                yaml,
                object: ObjectRef {
                    version: "v1".into(),
                    resource: "configmaps".into(),
                    namespace: "ns".into(),
                    name: name.into(),
                    ..ObjectRef::default()
                },
                created: true,
                author: None,
                fingerprint: None,
            },
            _ => unreachable!(),
        };
        let mut backlog = Backlog::with_first_wire_epoch(1);
        backlog.accept(decl("a/x", "x"), now());
        backlog.accept(decl("a/y", "y"), now());
        backlog.begin_connection();
        backlog.accept(begin("a/x", 1), now()); // 1
        backlog.accept(begin("a/y", 1), now()); // a/y 1
        backlog.accept(in_scope("small"), now()); // 2
        backlog.accept(in_scope("huge"), now()); // 3
        backlog.accept(end("a/x", 1), now()); // 4: already queued when 3 is skipped
        backlog.accept(end("a/y", 1), now()); // a/y 2
        let abandoned = backlog.skip("a/x", 3);
        assert_eq!(
            abandoned
                .iter()
                .map(|a| (a.destination.as_str(), a.sequence))
                .collect::<Vec<_>>(),
            [("a/x", 4)]
        );
        let sent: Vec<_> = drain(&mut backlog)
            .into_iter()
            .filter(|(k, ..)| *k != "destination")
            .map(|(k, d, s, _)| (k, d, s))
            .collect();
        assert_eq!(
            sent,
            [
                ("begin", "a/x".into(), 1),
                ("begin", "a/y".into(), 1),
                ("upsert", "a/x".into(), 2),
                ("end", "a/y".into(), 2),
            ],
            "neither the skipped object nor its scope's end goes out; the other destination's end does"
        );
        assert_eq!(backlog.unacked(), 4);
        // A later epoch begun after the skip may end again.
        backlog.accept(begin("a/x", 2), now()); // 5
        backlog.accept(end("a/x", 2), now()); // 6
        assert_eq!(
            drain(&mut backlog)
                .iter()
                .map(|(k, _, s, _)| (*k, *s))
                .collect::<Vec<_>>(),
            [("begin", 5), ("end", 6)]
        );
    }

    #[test]
    fn a_reject_drops_only_the_message_it_names() {
        let mut backlog = Backlog::with_first_wire_epoch(100);
        backlog.accept(decl("a/x", "x"), now());
        for name in ["1", "2", "3"] {
            backlog.accept(upsert("a/x", name), now());
        }
        assert!(backlog.reject("a/x", 2));
        assert!(!backlog.reject("a/x", 2));
        assert!(
            !backlog.reject("a/x", 0),
            "unsequenced rejects drop nothing"
        );
        assert_eq!(backlog.unacked(), 2);
        backlog.begin_connection();
        let sent: Vec<u64> = drain(&mut backlog).iter().map(|m| m.2).collect();
        assert_eq!(sent, [0, 1, 3]);
    }

    #[test]
    fn messages_acked_while_queued_are_not_sent() {
        let mut backlog = Backlog::with_first_wire_epoch(100);
        backlog.begin_connection();
        for name in ["1", "2", "3"] {
            backlog.accept(upsert("a/x", name), now());
        }
        backlog.ack("a/x", 2);
        let sent: Vec<u64> = drain(&mut backlog).iter().map(|m| m.2).collect();
        assert_eq!(sent, [3]);
        assert!(!backlog.has_outgoing());
    }

    #[test]
    fn redeclaration_moves_a_destination_to_the_end_of_the_declaration_order() {
        let mut backlog = Backlog::with_first_wire_epoch(100);
        backlog.accept(decl("a/x", "one"), now());
        backlog.accept(decl("a/y", "two"), now());
        backlog.accept(decl("a/x", "three"), now());
        backlog.begin_connection();
        let mut folders = Vec::new();
        while let Some((message, sequenced)) = backlog.next_message() {
            assert!(!sequenced);
            if let Some(Kind::Destination(d)) = message.kind {
                folders.push((d.key, d.base_folder));
            }
        }
        assert_eq!(
            folders,
            [("a/y".into(), "two".into()), ("a/x".into(), "three".into())]
        );
    }

    #[test]
    fn a_whole_unacked_epoch_is_resent_under_a_fresh_wire_epoch() {
        let mut backlog = Backlog::with_first_wire_epoch(100);
        backlog.begin_connection();
        backlog.accept(begin("a/x", 7), now());
        backlog.accept(upsert("a/x", "1"), now());
        backlog.accept(end("a/x", 7), now());
        let first = drain(&mut backlog);
        assert_eq!(first[0], ("begin", "a/x".into(), 1, 100));
        assert_eq!(first[2], ("end", "a/x".into(), 3, 100));
        backlog.end_connection();
        assert!(backlog.begin_connection().is_empty());
        let again = drain(&mut backlog);
        assert_eq!(again[0], ("begin", "a/x".into(), 1, 101));
        assert_eq!(again[1].2, 2);
        assert_eq!(again[2], ("end", "a/x".into(), 3, 101));
    }

    #[test]
    fn an_end_whose_begin_was_acked_on_an_earlier_connection_is_abandoned_not_sent() {
        let mut backlog = Backlog::with_first_wire_epoch(100);
        backlog.begin_connection();
        backlog.accept(begin("a/x", 7), now());
        backlog.accept(upsert("a/x", "1"), now());
        drain(&mut backlog);
        backlog.ack("a/x", 2);
        backlog.accept(upsert("a/x", "2"), now());
        backlog.end_connection();
        // Produced while disconnected: queued for the next connection.
        backlog.accept(end("a/x", 7), now());
        let abandoned = backlog.begin_connection();
        assert_eq!(
            abandoned,
            [Abandoned {
                destination: "a/x".into(),
                sequence: 4,
                scope: configmaps(),
                epoch: 7
            }]
        );
        let sent: Vec<_> = drain(&mut backlog).into_iter().map(|m| m.0).collect();
        assert_eq!(sent, ["upsert"]);
        assert_eq!(backlog.unacked(), 1);

        // The same holds for an end produced after the reconnect.
        backlog.accept(end("a/x", 7), now());
        assert!(!backlog.has_outgoing());
        assert_eq!(backlog.unacked(), 1);
    }

    #[test]
    fn an_end_for_another_epoch_than_the_open_one_is_abandoned() {
        let mut backlog = Backlog::with_first_wire_epoch(100);
        backlog.begin_connection();
        backlog.accept(begin("a/x", 7), now());
        backlog.accept(begin("a/x", 8), now());
        assert!(backlog.accept(end("a/x", 7), now()).is_some());
        assert!(backlog.accept(end("a/x", 8), now()).is_none());
        let sent: Vec<_> = drain(&mut backlog)
            .into_iter()
            .map(|m| (m.0, m.3))
            .collect();
        assert_eq!(sent, [("begin", 100), ("begin", 101), ("end", 101)]);
    }

    #[test]
    fn events_are_converted_to_their_wire_form() {
        let seen = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(5);
        let event = AgentEvent::Upsert {
            destination: "a/x".into(),
            path: "p.yaml".into(),
            yaml: "a: 1\n".into(),
            object: ObjectRef {
                name: "n".into(),
                ..ObjectRef::default()
            },
            created: false,
            author: Some("alice".into()),
            fingerprint: None,
        };
        let Some(Kind::Upsert(u)) = change_message(&event, 4, seen, None).kind else {
            panic!("an upsert")
        };
        assert_eq!(u.sequence, 4);
        assert_eq!(u.content, b"a: 1\n");
        assert_eq!(u.operation, pb::Operation::Update as i32);
        assert_eq!(u.author, "alice");
        assert_eq!(u.object.unwrap().name, "n");
        assert_eq!(u.event_time.unwrap().seconds, 5);

        let decl = DestinationDecl {
            key: "a/x".into(),
            repo_url: "u".into(),
            branch: "b".into(),
            base_folder: "f".into(),
            exclusive_mode: true,
            credentials_reference: Some("github".into()),
            credentials: None,
            encryption: None,
            prune: Default::default(),
            commit_message: None,
            suspend: false,
            placement: Default::default(),
        };
        let Some(Kind::Destination(d)) = declare_message(&decl).kind else {
            panic!("a destination")
        };
        assert!(d.exclusive_mode);
        assert_eq!(
            d.credentials.unwrap().kind,
            Some(pb::credentials::Kind::Reference("github".into()))
        );
        // Credentials from a secretRef Secret are sent inline.
        let inline = DestinationDecl {
            credentials: Some(Box::new(crate::credentials::GitCredentials::Token(
                "t".into(),
            ))),
            ..decl
        };
        let Some(Kind::Destination(d)) = declare_message(&inline).kind else {
            panic!("a destination")
        };
        assert_eq!(
            d.credentials.unwrap().kind,
            Some(pb::credentials::Kind::Token("t".into()))
        );
        assert_eq!(d.commit_message, None);
        // The GitDestination's commit message template goes to the writer as it is (the writer checks it).
        let templated = DestinationDecl {
            commit_message: Some(crate::crd::CommitMessageSpec {
                subject: "{operation} {name}".into(),
                body: "{objects}".into(),
            }),
            ..inline
        };
        let Some(Kind::Destination(d)) = declare_message(&templated).kind else {
            panic!("a destination")
        };
        assert_eq!(
            d.commit_message,
            Some(pb::CommitMessageTemplate {
                subject: "{operation} {name}".into(),
                body: "{objects}".into(),
            })
        );
        assert!(!d.suspend);
        let suspended = DestinationDecl {
            suspend: true,
            ..templated
        };
        let Some(Kind::Destination(d)) = declare_message(&suspended).kind else {
            panic!("a destination")
        };
        assert!(d.suspend, "spec.suspend reaches the writer");
    }

    #[test]
    fn a_flush_is_sequenced_after_earlier_changes_and_survives_a_re_send() {
        let flush = AgentEvent::Flush {
            destination: "a/d".into(),
            message: Some("Release".into()),
            author: Some("alice".into()),
            request_name: "a/req".into(),
            request_uid: "uid-1".into(),
        };
        let mut backlog = Backlog::with_first_wire_epoch(1);
        backlog.accept(decl("a/d", "x"), now());
        backlog.accept(upsert("a/d", "one"), now());
        backlog.accept(flush, now());
        backlog.accept(upsert("a/d", "one"), now());
        assert_eq!(backlog.flush_request("a/d", 2).as_deref(), Some("uid-1"));
        assert_eq!(backlog.flush_request("a/d", 1), None, "an upsert");
        // Re-sent after a reconnect: the flush keeps its place; only the older upsert of the same path goes.
        backlog.begin_connection();
        assert_eq!(
            drain(&mut backlog),
            [
                ("destination", "a/d".to_owned(), 0, 0),
                ("flush", "a/d".to_owned(), 2, 0),
                ("upsert", "a/d".to_owned(), 3, 0),
            ]
        );
        backlog.ack("a/d", 2);
        assert_eq!(backlog.flush_request("a/d", 2), None, "acked");
    }

    #[test]
    fn a_flush_goes_out_with_the_requests_message_author_and_names() {
        let message = change_message(
            &AgentEvent::Flush {
                destination: "a/d".into(),
                message: None,
                author: None,
                request_name: "a/req".into(),
                request_uid: "uid-1".into(),
            },
            7,
            now(),
            None,
        );
        assert_eq!(
            message.kind,
            Some(Kind::Flush(pb::FlushDestination {
                sequence: 7,
                destination: "a/d".into(),
                message: String::new(),
                author: String::new(),
                request_name: "a/req".into(),
                request_uid: "uid-1".into(),
            }))
        );
    }
}
