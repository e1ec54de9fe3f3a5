//! The writer's stream state machine (`session::Session`, with a real `Registry`, fed by the gRPC edge's
//! `convert::inbound`) driven by arbitrary sequences of protocol messages on two streams, against a model of the
//! protocol: hello first, one hello, declared destinations (overlaps refused across streams), sequence order per
//! destination, a sequence consumed by a refused message, snapshot begin/end pairing, leader-term fencing between
//! the streams. Every message must be answered exactly as the model says: forwarded (no Reject), or one Reject
//! with the model's reason, destination and sequence; and the stream must continue or end as the model says.
//!
//! The messages' contents come from small pools (valid, invalid, and fuzz bytes), and the expected verdict of a
//! single message's content reuses the writer's pure validators (fuzzed on their own in other targets); what is
//! modelled here is the state. Workers are real but cannot reach any Git remote (their work dir cannot be
//! created), so nothing is written to disk.
#![no_main]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use reverser_common::reasons::RejectReason;
use reverser_proto::PROTOCOL_VERSION;
use reverser_proto::v1::{self as pb, agent_message::Kind, writer_message};
use reverser_writer::{
    batch,
    credentials::CredentialStore,
    fencing::{self, Record, Term, Verdict},
    git,
    grpc::convert,
    metrics::Metrics,
    registry::{Caps, Registry},
    reply::Replies,
    session::{Next, Session, SessionLimits},
    worker::WorkerSettings,
};

const KEYS: &[&str] = &["ns/a", "ns/b", "ns/c", "bad key"];
const REPOS: &[&str] = &[
    "file:///nonexistent/fuzz/a.git",
    "file:///nonexistent/fuzz/b.git",
    "ftp://x/y.git",
];
const BRANCHES: &[&str] = &["main", "dev", "bad..name"];
const BASES: &[&str] = &[
    "clusters/a",
    "clusters/a/b",
    "clusters/b",
    "Clusters/A",
    ".configbutler",
    "",
    "x/",
];
const PATHS: &[&str] = &[
    "core/v1/configmaps/ns/a.yaml",
    "core/v1/configmaps/ns/b.yaml",
    "apps/v1/deployments/ns/web.yaml",
    "../x.yaml",
    "core/v1/configmaps/ns/A.yaml",
    ".configbutler/owner.yaml",
];
const CONTENTS: &[&str] = &[
    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  namespace: ns\ndata:\n  k: v\n",
    "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\ndata:\n  k: dg==\n",
    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\nyes: 1\n",
    "- not\n- a mapping\n",
    "{",
];
const MAX_OBJECT_BYTES: usize = 400;

#[derive(Arbitrary, Debug)]
enum Seq {
    Next,
    Same,
    Zero,
    Back,
    Jump(u8),
}

#[derive(Arbitrary, Debug)]
enum Content {
    Pool(u8),
    Large,
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum PathChoice {
    Pool(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Msg {
    Empty,
    Hello {
        cluster: u8,
        bad_version: bool,
        blank_instance: bool,
        term: Option<(u8, u8, u8)>,
    },
    Destination {
        key: u8,
        repo: u8,
        branch: u8,
        base: u8,
        recipients: u8,
        prune: u8,
    },
    Upsert {
        key: u8,
        seq: Seq,
        path: PathChoice,
        content: Content,
    },
    Delete {
        key: u8,
        seq: Seq,
        path: PathChoice,
    },
    Begin {
        key: u8,
        seq: Seq,
        scope: u8,
        epoch: u8,
    },
    End {
        key: u8,
        seq: Seq,
        scope: u8,
        epoch: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Step {
    second_stream: bool,
    msg: Msg,
}

fn pick<'a>(pool: &[&'a str], i: u8) -> &'a str {
    pool[usize::from(i) % pool.len()]
}

fn scope(i: u8) -> Option<pb::SnapshotScope> {
    let s = |g: &str, v: &str, r: &str, n: &str| pb::SnapshotScope {
        group: g.into(),
        version: v.into(),
        resource: r.into(),
        namespace: n.into(),
    };
    match i % 6 {
        0 => Some(s("", "v1", "configmaps", "ns")),
        1 => Some(s("", "v1", "configmaps", "")),
        2 => Some(s("apps", "v1", "deployments", "")),
        3 => Some(s("", "", "configmaps", "")),
        4 => Some(s("", "v1", "..", "")),
        _ => None,
    }
}

/// What the model expects of one message.
#[derive(Debug, PartialEq)]
enum Expect {
    Forwarded,
    Welcome,
    /// Declared (no Reject).
    Declared,
    Reject {
        reason: RejectReason,
        destination: String,
        sequence: u64,
        close: bool,
    },
}

#[derive(Clone)]
struct Declared {
    worker: String,
    last: u64,
    open: HashMap<String, u64>,
}

#[derive(Default)]
struct StreamModel {
    cluster: Option<String>,
    term: Option<Term>,
    closed: bool,
    declared: HashMap<String, Declared>,
}

/// The registry's view: destination (cluster, key) → (worker, base folder).
type RegistryModel = HashMap<(String, String), (String, String)>;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// A work dir that cannot be created (its parent is a regular file): workers never touch the disk.
fn work_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let file =
            std::env::temp_dir().join(format!("reverser-fuzz-not-a-dir-{}", std::process::id()));
        std::fs::write(&file, b"").expect("temp file");
        file.join("work")
    })
    .clone()
}

fn settings() -> WorkerSettings {
    let hour = Duration::from_secs(3600);
    WorkerSettings {
        work_dir: work_dir(),
        limits: batch::Limits {
            max_files: 100_000,
            max_bytes: usize::MAX / 2,
            max_wait: hour,
        },
        deletes_cap: 1000,
        bot_name: "fuzz".into(),
        bot_email: "fuzz@example.invalid".into(),
        push_max_retries: 0,
        push_max_batches: 50,
        push_max_delay: hour,
        queue_capacity: 4096,
        retry_initial: hour,
        retry_max: hour,
        refetch_after: hour,
        ca_cert_file: None,
    }
}

fuzz_target!(|steps: Vec<Step>| {
    if steps.len() > 64 {
        return;
    }
    runtime().block_on(run(steps));
});

async fn run(steps: Vec<Step>) {
    let limits = SessionLimits {
        max_object_bytes: MAX_OBJECT_BYTES,
        max_message_bytes: 4096,
    };
    let registry = Registry::new(
        settings(),
        Caps {
            max_global: 64,
            max_per_repo: 64,
        },
        CredentialStore::default(),
        None,
        Metrics::default(),
    );
    let mut streams = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = Replies::channel(reverser_writer::reply::REPLY_CAPACITY);
        let session = Session::new(registry.clone(), Metrics::default(), limits.clone(), tx);
        streams.push((session, rx, StreamModel::default()));
    }
    let mut reg_model = RegistryModel::new();
    let mut terms: HashMap<String, Record> = HashMap::new();
    // Accepted snapshot messages (stream, destination, sequence): a worker may refuse them later on its own
    // (it checks snapshots per destination across streams) with SnapshotMismatch.
    let mut accepted_snapshots: Vec<(usize, String, u64)> = Vec::new();
    let large = format!("{}\n#{}\n", CONTENTS[0], "x".repeat(MAX_OBJECT_BYTES));

    for (n, step) in steps.into_iter().enumerate() {
        let index = usize::from(step.second_stream);
        if streams[index].2.closed {
            continue;
        }
        // Build the message and the model's verdict.
        let (message, expect) = build(
            step.msg,
            &mut streams[index].2,
            &mut reg_model,
            &mut terms,
            &limits,
            &large,
        );
        let snapshot_key = match &message.kind {
            Some(Kind::SnapshotBegin(b)) => Some((b.destination.clone(), b.sequence)),
            Some(Kind::SnapshotEnd(e)) => Some((e.destination.clone(), e.sequence)),
            _ => None,
        };
        let (session, replies, model) = &mut streams[index];
        let next = session.handle(convert::inbound(message, &limits)).await;
        // Let workers run (they may answer on their own).
        tokio::task::yield_now().await;
        let mut rejects = Vec::new();
        let mut welcomes = 0;
        while let Ok(reply) = replies.replies.try_recv() {
            match pb::WriterMessage::from(reply).kind {
                Some(writer_message::Kind::Reject(r)) => rejects.push(r),
                Some(writer_message::Kind::Welcome(w)) => {
                    assert_eq!(w.protocol_version, PROTOCOL_VERSION);
                    assert_eq!(w.max_object_bytes, MAX_OBJECT_BYTES as u64);
                    welcomes += 1;
                }
                _ => {}
            }
        }
        // Worker-side snapshot refusals of earlier accepted snapshot messages are the worker's to make.
        // The session's own answer first; what remains may only be the worker's later refusal of an earlier
        // accepted snapshot message.
        let close = match &expect {
            Expect::Reject {
                reason,
                destination,
                sequence,
                close,
            } => {
                let found = rejects.iter().position(|r| {
                    (r.reason.as_str(), r.destination.as_str(), r.sequence)
                        == (reason.as_str(), destination.as_str(), *sequence)
                });
                let Some(found) = found else {
                    panic!(
                        "step {n}: expected a {reason:?} reject for {destination:?} {sequence}, got {rejects:?}"
                    );
                };
                rejects.remove(found);
                assert_eq!(welcomes, 0);
                *close
            }
            Expect::Forwarded | Expect::Declared | Expect::Welcome => {
                assert_eq!(welcomes, usize::from(expect == Expect::Welcome), "step {n}");
                if let (Expect::Forwarded, Some(key)) = (&expect, snapshot_key) {
                    accepted_snapshots.push((index, key.0, key.1));
                }
                false
            }
        };
        for r in &rejects {
            assert!(
                r.reason == RejectReason::SnapshotMismatch.as_str()
                    && accepted_snapshots.contains(&(index, r.destination.clone(), r.sequence)),
                "step {n}: expected {expect:?}, got the extra reject {r:?}"
            );
        }
        match (&next, close) {
            (Next::Continue, false) => {}
            (Next::Close(_), true) => model.closed = true,
            (other, _) => panic!("step {n}: expected close={close}, the session said {other:?}"),
        }
    }
    drop(streams);
    let (workers, _lease_loops) = registry.shutdown();
    for worker in workers {
        let _ = worker.shutdown().await;
    }
}

fn sequence(seq: Seq, last: u64) -> u64 {
    match seq {
        Seq::Next => last + 1,
        Seq::Same => last,
        Seq::Zero => 0,
        Seq::Back => last.saturating_sub(1),
        Seq::Jump(n) => last + u64::from(n),
    }
}

fn reject(reason: RejectReason, destination: &str, sequence: u64, close: bool) -> Expect {
    Expect::Reject {
        reason,
        destination: destination.to_owned(),
        sequence,
        close,
    }
}

fn superseded(model: &StreamModel, terms: &HashMap<String, Record>) -> bool {
    match (&model.cluster, &model.term) {
        (Some(cluster), Some(term)) => terms.get(cluster).is_some_and(|r| r.current != *term),
        _ => false,
    }
}

fn hello_verdict(
    hello: &pb::Hello,
    model: &mut StreamModel,
    terms: &mut HashMap<String, Record>,
) -> Expect {
    let identity = match convert::validate_hello(hello) {
        Ok(identity) => identity,
        Err(rejection) => return reject(rejection.reason, "", 0, true),
    };
    if let Some(term) = convert::validate_leader_term(hello).expect("validated with the hello") {
        let uid = identity.cluster_uid.clone();
        match fencing::compare(terms.get(&uid), &term) {
            Verdict::Stale(_) => return reject(RejectReason::StaleLeaderTerm, "", 0, true),
            Verdict::Current => {}
            Verdict::Newer => match terms.get_mut(&uid) {
                Some(record) => {
                    if record.current.lease_uid != term.lease_uid {
                        let old = record.current.lease_uid.clone();
                        record.retired.push(old);
                        let excess = record.retired.len().saturating_sub(32);
                        record.retired.drain(..excess);
                    }
                    record.current = term.clone();
                }
                None => {
                    terms.insert(
                        uid,
                        Record {
                            current: term.clone(),
                            retired: Vec::new(),
                        },
                    );
                }
            },
        }
        model.term = Some(term);
    }
    model.cluster = Some(identity.cluster_uid);
    Expect::Welcome
}

fn build(
    msg: Msg,
    model: &mut StreamModel,
    registry: &mut RegistryModel,
    terms: &mut HashMap<String, Record>,
    limits: &SessionLimits,
    large: &str,
) -> (pb::AgentMessage, Expect) {
    let wrap = |kind: Kind| pb::AgentMessage { kind: Some(kind) };
    if let Msg::Empty = msg {
        return (
            pb::AgentMessage { kind: None },
            reject(RejectReason::ProtocolViolation, "", 0, false),
        );
    }
    let Some(cluster) = model.cluster.clone() else {
        // Before the hello only a hello is accepted.
        return match msg {
            Msg::Hello {
                cluster,
                bad_version,
                blank_instance,
                term,
            } => {
                let hello = hello_message(cluster, bad_version, blank_instance, term);
                let expect = hello_verdict(&hello, model, terms);
                (wrap(Kind::Hello(hello)), expect)
            }
            other => (
                any_message(other, limits, large),
                reject(RejectReason::ProtocolViolation, "", 0, true),
            ),
        };
    };
    if superseded(model, terms) {
        return (
            any_message(msg, limits, large),
            reject(RejectReason::StaleLeaderTerm, "", 0, true),
        );
    }
    match msg {
        Msg::Hello {
            cluster,
            bad_version,
            blank_instance,
            term,
        } => (
            wrap(Kind::Hello(hello_message(
                cluster,
                bad_version,
                blank_instance,
                term,
            ))),
            reject(RejectReason::ProtocolViolation, "", 0, false),
        ),
        Msg::Destination {
            key,
            repo,
            branch,
            base,
            recipients,
            prune,
        } => {
            let message = destination_message(key, repo, branch, base, recipients, prune);
            let expect = match convert::validate_destination(&cluster, &message) {
                Err(rejection) => reject(rejection.reason, &message.key, 0, false),
                Ok(_) => {
                    let worker = git::worker_id(&message.repo_url, &message.branch);
                    let id = (cluster.clone(), message.key.clone());
                    let overlap = registry
                        .iter()
                        .any(|(other_id, (other_worker, other_base))| {
                            *other_id != id
                                && *other_worker == worker
                                && reverser_common::paths::folders_overlap(
                                    other_base,
                                    &message.base_folder,
                                )
                        });
                    if overlap {
                        reject(RejectReason::OverlappingBaseFolder, &message.key, 0, false)
                    } else {
                        registry.insert(id, (worker.clone(), message.base_folder.clone()));
                        let same_worker = model
                            .declared
                            .get(&message.key)
                            .is_some_and(|d| d.worker == worker);
                        if !same_worker {
                            model.declared.insert(
                                message.key.clone(),
                                Declared {
                                    worker,
                                    last: 0,
                                    open: HashMap::new(),
                                },
                            );
                        }
                        Expect::Declared
                    }
                }
            };
            (wrap(Kind::Destination(message)), expect)
        }
        other => forwardable(other, model, limits, large),
    }
}

fn destination_message(
    key: u8,
    repo: u8,
    branch: u8,
    base: u8,
    recipients: u8,
    prune: u8,
) -> pb::Destination {
    pb::Destination {
        key: pick(KEYS, key).into(),
        repo_url: pick(REPOS, repo).into(),
        branch: pick(BRANCHES, branch).into(),
        base_folder: pick(BASES, base).into(),
        age_recipients: match recipients % 3 {
            0 => vec![],
            1 => vec!["age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p".into()],
            _ => vec!["age1-not-a-key".into()],
        },
        // 0..=3 are the known modes; 4 is a value from a newer agent, which the writer refuses.
        prune: i32::from(prune % 5),
        ..Default::default()
    }
}

/// Any message, without a verdict (for streams that refuse whatever comes).
fn any_message(msg: Msg, limits: &SessionLimits, large: &str) -> pb::AgentMessage {
    let wrap = |kind: Kind| pb::AgentMessage { kind: Some(kind) };
    match msg {
        Msg::Empty => pb::AgentMessage { kind: None },
        Msg::Hello {
            cluster,
            bad_version,
            blank_instance,
            term,
        } => wrap(Kind::Hello(hello_message(
            cluster,
            bad_version,
            blank_instance,
            term,
        ))),
        Msg::Destination {
            key,
            repo,
            branch,
            base,
            recipients,
            prune,
        } => wrap(Kind::Destination(destination_message(
            key, repo, branch, base, recipients, prune,
        ))),
        other => forwardable(other, &mut StreamModel::default(), limits, large).0,
    }
}

fn hello_message(
    cluster: u8,
    bad_version: bool,
    blank_instance: bool,
    term: Option<(u8, u8, u8)>,
) -> pb::Hello {
    pb::Hello {
        cluster_uid: format!("uid-{}", cluster % 2),
        cluster_name: "fuzz".into(),
        instance_id: if blank_instance {
            " ".into()
        } else {
            "agent-0".into()
        },
        controller_namespace: "ns".into(),
        controller_name: "agent".into(),
        protocol_version: PROTOCOL_VERSION + u32::from(bad_version),
        leader_term: term.map(|(lease, transitions, holder)| pb::LeaderTerm {
            lease_uid: format!("lease-{}", lease % 2),
            transitions: u64::from(transitions % 4),
            holder: format!("holder-{}", holder % 2),
        }),
    }
}

/// What a message's content alone makes of it: refused with a reason, or accepted (for a snapshot message:
/// begin or end, scope folder, epoch).
type ContentVerdict = Result<Option<(bool, String, u64)>, RejectReason>;

/// An upsert, delete or snapshot message and its verdict on a stream past its hello.
fn forwardable(
    msg: Msg,
    model: &mut StreamModel,
    limits: &SessionLimits,
    large: &str,
) -> (pb::AgentMessage, Expect) {
    let wrap = |kind: Kind| pb::AgentMessage { kind: Some(kind) };
    let path = |choice: PathChoice| match choice {
        PathChoice::Pool(i) => pick(PATHS, i).to_owned(),
        PathChoice::Raw(s) => s,
    };
    let key = match &msg {
        Msg::Upsert { key, .. }
        | Msg::Delete { key, .. }
        | Msg::Begin { key, .. }
        | Msg::End { key, .. } => pick(KEYS, *key),
        Msg::Empty | Msg::Hello { .. } | Msg::Destination { .. } => {
            unreachable!("handled by build")
        }
    };
    let last = model.declared.get(key).map_or(0, |d| d.last);
    let begin = matches!(msg, Msg::Begin { .. });
    // The message, its sequence and what its content alone makes of it.
    let (message, sequence, content): (pb::AgentMessage, u64, ContentVerdict) = match msg {
        Msg::Upsert {
            seq,
            path: p,
            content,
            ..
        } => {
            let sequence = sequence(seq, last);
            let content = match content {
                Content::Pool(i) => pick(CONTENTS, i).as_bytes().to_vec(),
                Content::Large => large.as_bytes().to_vec(),
                Content::Bytes(bytes) => bytes,
            };
            let p = path(p);
            let verdict = convert::validate_upsert(&p, &content, limits)
                .map(|()| None)
                .map_err(|r| r.reason);
            let upsert = pb::Upsert {
                sequence,
                destination: key.into(),
                path: p,
                content,
                ..Default::default()
            };
            (wrap(Kind::Upsert(upsert)), sequence, verdict)
        }
        Msg::Delete { seq, path: p, .. } => {
            let sequence = sequence(seq, last);
            let p = path(p);
            let verdict = reverser_common::paths::validate_object_path(&p)
                .map(|()| None)
                .map_err(|_| RejectReason::InvalidPath);
            let delete = pb::Delete {
                sequence,
                destination: key.into(),
                path: p,
                ..Default::default()
            };
            (wrap(Kind::Delete(delete)), sequence, verdict)
        }
        Msg::Begin {
            seq,
            scope: s,
            epoch,
            ..
        }
        | Msg::End {
            seq,
            scope: s,
            epoch,
            ..
        } => {
            let sequence = sequence(seq, last);
            let scope = scope(s);
            let epoch = u64::from(epoch % 3);
            let verdict = convert::validate_scope(scope.as_ref())
                .map(|scope| Some((begin, scope.folder, epoch)))
                .map_err(|r| r.reason);
            let kind = if begin {
                Kind::SnapshotBegin(pb::SnapshotBegin {
                    sequence,
                    destination: key.into(),
                    scope,
                    epoch,
                })
            } else {
                Kind::SnapshotEnd(pb::SnapshotEnd {
                    sequence,
                    destination: key.into(),
                    scope,
                    epoch,
                })
            };
            (wrap(kind), sequence, verdict)
        }
        _ => unreachable!(),
    };
    let Some(declared) = model.declared.get_mut(key) else {
        return (
            message,
            reject(RejectReason::UnknownDestination, key, sequence, false),
        );
    };
    if sequence == 0 || sequence <= declared.last {
        return (
            message,
            reject(RejectReason::OutOfOrder, key, sequence, false),
        );
    }
    declared.last = sequence;
    let expect = match content {
        Err(reason) => reject(reason, key, sequence, false),
        Ok(None) => Expect::Forwarded,
        Ok(Some((true, folder, epoch))) => {
            declared.open.insert(folder, epoch);
            Expect::Forwarded
        }
        Ok(Some((false, folder, epoch))) => {
            if declared.open.get(&folder) == Some(&epoch) {
                declared.open.remove(&folder);
                Expect::Forwarded
            } else {
                reject(RejectReason::SnapshotMismatch, key, sequence, false)
            }
        }
    };
    (message, expect)
}
