//! The buffer of one worker: changes in arrival order, the caps that decide when to flush, and the open snapshot
//! epochs whose ends become sweeps.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use reverser_common::paths;

use crate::model::{
    Bytes, Change, DestinationId, DestinationRef, FlushOrder, ObjectId, Operation, Scope,
};

/// Flush thresholds (seed Appendix X).
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_files: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
}

/// What one buffered entry does to the tree.
#[derive(Clone, Debug)]
pub enum EntryOp {
    Write {
        path: String,
        content: Bytes,
        object: ObjectId,
        author: Option<String>,
        /// Keyed fingerprint of a SOPS-encrypted object's plaintext (see [`reverser_common::sops`]).
        fingerprint: Option<String>,
    },
    Remove {
        path: String,
        object: ObjectId,
        author: Option<String>,
    },
    /// Delete the scope's files not in `keep` (full paths), at most `cap` of them.
    Sweep {
        folder: String,
        namespace_given: bool,
        keep: Arc<HashSet<String>>,
        base_folder: String,
    },
    /// Nothing to write (a snapshot begin); only acknowledged.
    Nothing,
    /// A CommitRequest: the destination's earlier entries of this batch form one commit by the requester, and
    /// the worker pushes now.
    Flush(Arc<FlushOrder>),
}

impl EntryOp {
    /// The object a write or removal is about.
    pub(super) fn object(&self) -> Option<&ObjectId> {
        match self {
            EntryOp::Write { object, .. } | EntryOp::Remove { object, .. } => Some(object),
            EntryOp::Sweep { .. } | EntryOp::Nothing | EntryOp::Flush(_) => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub destination: DestinationRef,
    pub sequence: u64,
    pub op: EntryOp,
}

#[derive(Debug)]
struct OpenSnapshot {
    epoch: u64,
    folder: String,
    namespace_given: bool,
    seen: HashSet<String>,
}

/// Result of offering a change to the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    Buffered,
    /// A `SnapshotEnd` without its `SnapshotBegin` (or with another epoch): nothing is deleted.
    SnapshotMismatch(String),
}

/// Changes received but not yet pushed, plus the open snapshot epochs.
#[derive(Debug, Default)]
pub struct Buffer {
    entries: Vec<Entry>,
    distinct_paths: HashSet<String>,
    bytes: usize,
    first_at: Option<Instant>,
    snapshots: HashMap<(DestinationId, String), OpenSnapshot>,
    /// A flush (CommitRequest) is buffered: commit and push now, whatever the caps say.
    flush_requested: bool,
}

impl Buffer {
    pub fn push(&mut self, change: Change, now: Instant) -> Accepted {
        let base = change.destination.base_folder.clone();
        let op = match change.operation {
            Operation::Upsert {
                path,
                content,
                object,
                author,
                fingerprint,
            } => {
                let full = paths::join(&base, &path);
                for snapshot in self
                    .snapshots
                    .iter_mut()
                    .filter(|((d, _), _)| *d == change.destination.id)
                {
                    if paths::in_scope(&snapshot.1.folder, snapshot.1.namespace_given, &path) {
                        snapshot.1.seen.insert(full.clone());
                    }
                }
                self.bytes += content.len();
                self.distinct_paths.insert(full.clone());
                EntryOp::Write {
                    path: full,
                    content,
                    object,
                    author,
                    fingerprint,
                }
            }
            // A destination that never prunes keeps the file; the delete is only acknowledged.
            Operation::Delete { .. } if !change.destination.prune.deletes() => EntryOp::Nothing,
            Operation::Delete {
                path,
                object,
                author,
            } => {
                let full = paths::join(&base, &path);
                self.distinct_paths.insert(full.clone());
                EntryOp::Remove {
                    path: full,
                    object,
                    author,
                }
            }
            Operation::SnapshotBegin { scope, epoch } => {
                let Scope {
                    folder,
                    namespace_given,
                } = scope;
                self.snapshots.insert(
                    (change.destination.id.clone(), folder.clone()),
                    OpenSnapshot {
                        epoch,
                        folder,
                        namespace_given,
                        seen: HashSet::new(),
                    },
                );
                EntryOp::Nothing
            }
            Operation::Flush(order) => {
                self.flush_requested = true;
                EntryOp::Flush(order)
            }
            Operation::SnapshotEnd { scope, epoch } => {
                let key = (change.destination.id.clone(), scope.folder.clone());
                match self.snapshots.remove(&key) {
                    // The epoch matched, but the destination does not delete orphans.
                    Some(open) if open.epoch == epoch && !change.destination.prune.sweeps() => {
                        EntryOp::Nothing
                    }
                    Some(open) if open.epoch == epoch => EntryOp::Sweep {
                        folder: paths::join(&base, &open.folder),
                        namespace_given: open.namespace_given,
                        keep: Arc::new(open.seen),
                        base_folder: base,
                    },
                    Some(open) => {
                        let message = format!(
                            "SnapshotEnd epoch {epoch} does not match the open SnapshotBegin epoch {} of {}",
                            open.epoch, scope.folder
                        );
                        self.snapshots.insert(key, open);
                        return Accepted::SnapshotMismatch(message);
                    }
                    None => {
                        return Accepted::SnapshotMismatch(format!(
                            "SnapshotEnd for {} (epoch {epoch}) without a SnapshotBegin",
                            scope.folder
                        ));
                    }
                }
            }
        };
        self.first_at.get_or_insert(now);
        self.entries.push(Entry {
            destination: change.destination,
            sequence: change.sequence,
            op,
        });
        Accepted::Buffered
    }

    /// Whether a flush is due now (any cap reached, or the oldest change waited long enough).
    pub fn flush_due(&self, limits: &Limits, now: Instant) -> bool {
        !self.entries.is_empty()
            && (self.flush_requested
                || self.distinct_paths.len() >= limits.max_files
                || self.bytes >= limits.max_bytes
                || self
                    .first_at
                    .is_some_and(|t| now.duration_since(t) >= limits.max_wait))
    }

    /// A file or byte cap is reached (the batch filled up rather than waited out its time).
    pub fn full(&self, limits: &Limits) -> bool {
        self.distinct_paths.len() >= limits.max_files || self.bytes >= limits.max_bytes
    }

    /// Far past the flush caps (a failing remote): time to stop accepting more until a push succeeds.
    pub fn over_hard_cap(&self, limits: &Limits) -> bool {
        self.distinct_paths.len() >= limits.max_files.saturating_mul(4).max(1000)
            || self.bytes >= limits.max_bytes.saturating_mul(4)
    }

    /// When the time cap fires, if anything is buffered.
    pub fn deadline(&self, limits: &Limits) -> Option<Instant> {
        // A flush is due at once: its time is already past.
        self.first_at.map(|t| {
            if self.flush_requested {
                t
            } else {
                t + limits.max_wait
            }
        })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A flush (CommitRequest) waits in the buffer: it is pushed at once, not held for more changes.
    pub fn flush_requested(&self) -> bool {
        self.flush_requested
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn pending_files(&self) -> usize {
        self.distinct_paths.len()
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Takes the buffered entries (after they were pushed); open snapshots stay open.
    pub fn take(&mut self) -> Vec<Entry> {
        self.distinct_paths.clear();
        self.bytes = 0;
        self.first_at = None;
        self.flush_requested = false;
        std::mem::take(&mut self.entries)
    }

    /// Drops every entry and open snapshot of a destination (it was withdrawn or moved).
    pub fn forget_destination(&mut self, id: &DestinationId) {
        self.snapshots.retain(|(d, _), _| d != id);
    }

    /// Moves the entries and open snapshots of one destination into a buffer of their own (a destination being
    /// suspended); the others stay, in order.
    pub fn split_destination(&mut self, id: &DestinationId) -> Buffer {
        let (theirs, ours): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|e| e.destination.id == *id);
        self.entries = ours;
        let mut split = Buffer {
            entries: theirs,
            ..Buffer::default()
        };
        let keys: Vec<(DestinationId, String)> = self
            .snapshots
            .keys()
            .filter(|(d, _)| d == id)
            .cloned()
            .collect();
        for key in keys {
            if let Some(open) = self.snapshots.remove(&key) {
                split.snapshots.insert(key, open);
            }
        }
        split.first_at = self.first_at.filter(|_| !split.entries.is_empty());
        self.recount();
        split.recount();
        split
    }

    /// Appends another buffer's entries (after this one's) and takes over its open snapshots.
    pub fn absorb(&mut self, other: Buffer, now: Instant) {
        if !other.entries.is_empty() {
            let since = other.first_at.unwrap_or(now);
            self.first_at = Some(self.first_at.map_or(since, |t| t.min(since)));
        }
        self.entries.extend(other.entries);
        self.snapshots.extend(other.snapshots);
        self.recount();
    }

    /// Keeps only what decides the result of replaying the buffer: the last write or removal per path, the last
    /// sweep per scope, no snapshot begins. Replaying the kept entries in their order gives the same tree: a sweep
    /// keeps every path upserted in its epoch (those come after any earlier write of the path), a later sweep of
    /// the same scope deletes whatever an earlier one would have, and a later write or removal of a path overrides
    /// what any earlier entry did to it. Bounds a buffer that is never flushed (a suspended destination) by the
    /// number of paths and scopes instead of the number of messages.
    pub fn compact(&mut self) {
        let mut paths: HashSet<String> = HashSet::new();
        let mut sweeps: HashSet<(DestinationId, String, bool)> = HashSet::new();
        let mut keep = vec![false; self.entries.len()];
        for (index, entry) in self.entries.iter().enumerate().rev() {
            keep[index] = match &entry.op {
                EntryOp::Write { path, .. } | EntryOp::Remove { path, .. } => {
                    paths.insert(path.clone())
                }
                EntryOp::Sweep {
                    folder,
                    namespace_given,
                    ..
                } => sweeps.insert((
                    entry.destination.id.clone(),
                    folder.clone(),
                    *namespace_given,
                )),
                EntryOp::Nothing => false,
                // A CommitRequest waits for its answer: it stays, in its place.
                EntryOp::Flush(_) => true,
            };
        }
        let mut flags = keep.into_iter();
        self.entries.retain(|_| flags.next().unwrap_or(true));
        if self.entries.is_empty() {
            self.first_at = None;
        }
        self.recount();
    }

    fn recount(&mut self) {
        self.distinct_paths.clear();
        self.bytes = 0;
        for entry in &self.entries {
            match &entry.op {
                EntryOp::Write { path, content, .. } => {
                    self.bytes += content.len();
                    self.distinct_paths.insert(path.clone());
                }
                EntryOp::Remove { path, .. } => {
                    self.distinct_paths.insert(path.clone());
                }
                EntryOp::Sweep { .. } | EntryOp::Nothing | EntryOp::Flush(_) => {}
            }
        }
        if self.entries.is_empty() {
            self.first_at = None;
        }
    }
}
