//! What the writer tells an agent stream, in domain terms: acks, rejects, destination conditions, suspend
//! previews, sweep reports and CommitRequest answers. The session and the workers build [`Reply`] values; the gRPC
//! edge ([`crate::grpc`]) turns them into protocol messages.
//!
//! Replies travel on one bounded channel per stream ([`Replies`], [`REPLY_CAPACITY`]). Senders never wait: a
//! worker serves the streams of many agents and must not stall because one agent stopped reading its replies.
//! When a stream's channel is full, the reply is not queued and the stream is marked overflowed; the gRPC edge
//! then ends that stream with `RESOURCE_EXHAUSTED` (logged and counted in
//! `gitops_reverser_slow_streams_ended_total`). So a reply is never dropped while its stream goes on: either it
//! is delivered in order, or the stream ends and the agent, as after any disconnect, re-sends what was not acked.

use std::sync::Arc;

use tokio::sync::{
    mpsc::{self, error::TrySendError},
    watch,
};
use tracing::warn;

use reverser_common::reasons::{ConditionReason, ConditionType, RejectReason};

/// Replies one stream may have queued (sent, not yet taken by the gRPC layer). A reply is a few hundred bytes
/// (a suspend preview at most a few KiB), so a full channel holds about a megabyte; a reading agent takes them
/// as fast as they come, and only an agent that stopped reading fills it.
pub const REPLY_CAPACITY: usize = 4096;

/// One reply to an agent stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The stream's `Hello` was accepted; the limits the agent must keep to.
    Welcome {
        max_message_bytes: u64,
        max_object_bytes: u64,
    },
    /// Every change of `destination` up to `sequence` is in `commit_sha` (empty: held by a suspended
    /// destination, not pushed).
    Ack {
        destination: String,
        sequence: u64,
        commit_sha: String,
    },
    /// A refused message (sequence 0 and an empty destination: about the stream itself).
    Reject {
        destination: String,
        sequence: u64,
        reason: RejectReason,
        message: String,
    },
    /// A destination's condition changed.
    Status(Condition),
    /// A pushed commit deleted `deleted` orphan files of `destination`; `left` wait for the next snapshot.
    SweepReport {
        destination: String,
        deleted: u64,
        left: u64,
        commit_sha: String,
    },
    SuspendPreview(SuspendPreview),
    FlushResult(FlushResult),
}

/// A destination condition, as reported to the agent and listed by `WriterAdmin.ListDestinations`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub destination: String,
    pub kind: ConditionType,
    pub status: bool,
    pub reason: ConditionReason,
    pub message: String,
}

/// What flushing a suspended destination would write now.
pub use reverser_common::preview::SuspendPreview;

/// How a CommitRequest was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushOutcome {
    Committed,
    NothingPending,
}

impl FlushOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Committed => "FLUSH_OUTCOME_COMMITTED",
            Self::NothingPending => "FLUSH_OUTCOME_NOTHING_PENDING",
        }
    }
}

/// The answer to one CommitRequest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushResult {
    pub destination: String,
    pub request_uid: String,
    pub commit_sha: String,
    pub outcome: FlushOutcome,
    pub branch: String,
    pub message: String,
}

/// The sending side of a stream's replies (cheap to clone; the session and every worker holding the stream's
/// changes have one). See the module notes for what happens when the stream's channel is full.
#[derive(Clone, Debug)]
pub struct Replies {
    sender: mpsc::Sender<Reply>,
    overflowed: Arc<watch::Sender<bool>>,
}

/// The receiving side of a stream's replies, for the gRPC edge.
#[derive(Debug)]
pub struct ReplyReceiver {
    pub replies: mpsc::Receiver<Reply>,
    /// Turns true once a reply found the channel full: the stream must end.
    pub overflowed: watch::Receiver<bool>,
}

impl Replies {
    /// A stream's reply channel holding at most `capacity` replies.
    pub fn channel(capacity: usize) -> (Replies, ReplyReceiver) {
        let (sender, replies) = mpsc::channel(capacity);
        let (overflowed, overflowed_rx) = watch::channel(false);
        (
            Replies {
                sender,
                overflowed: Arc::new(overflowed),
            },
            ReplyReceiver {
                replies,
                overflowed: overflowed_rx,
            },
        )
    }

    /// Queues `reply` without waiting. A closed stream just means the agent went away (it re-sends unacked work
    /// when it comes back); a full one ends the stream (see the module notes).
    pub fn send(&self, reply: Reply) {
        match self.sender.try_send(reply) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(reply)) => {
                if !self.overflowed.send_replace(true) {
                    warn!(
                        capacity = self.sender.max_capacity(),
                        reply = reply.kind(),
                        "an agent stream does not read its replies; ending it"
                    );
                }
            }
        }
    }

    /// Whether the stream's replies overflowed (it is about to end).
    pub fn overflowed(&self) -> bool {
        *self.overflowed.borrow()
    }
}

impl Reply {
    /// The reply's kind, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Reply::Welcome { .. } => "welcome",
            Reply::Ack { .. } => "ack",
            Reply::Reject { .. } => "reject",
            Reply::Status(_) => "destination_status",
            Reply::SweepReport { .. } => "sweep_report",
            Reply::SuspendPreview(_) => "suspend_preview",
            Reply::FlushResult(_) => "flush_result",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(sequence: u64) -> Reply {
        Reply::Ack {
            destination: "ns/a".into(),
            sequence,
            commit_sha: "c".into(),
        }
    }

    #[test]
    fn a_full_channel_marks_the_stream_overflowed_and_never_blocks() {
        let (replies, mut receiver) = Replies::channel(2);
        replies.send(ack(1));
        replies.send(ack(2));
        assert!(!replies.overflowed());
        replies.send(ack(3));
        assert!(replies.overflowed());
        assert!(*receiver.overflowed.borrow_and_update());
        // What was queued before the overflow is delivered in order; nothing after it is.
        assert_eq!(receiver.replies.try_recv().unwrap(), ack(1));
        assert_eq!(receiver.replies.try_recv().unwrap(), ack(2));
        assert!(receiver.replies.try_recv().is_err());
    }

    #[test]
    fn a_closed_stream_is_not_an_overflow() {
        let (replies, receiver) = Replies::channel(1);
        drop(receiver);
        replies.send(ack(1));
        replies.send(ack(2));
        assert!(!replies.overflowed());
    }
}
