//! Pure batching and commit planning for one (repository, branch) worker.
//!
//! Changes arrive in sequence order and are buffered ([`Buffer`]). Snapshot epochs are tracked here too: every
//! upsert between a `SnapshotBegin` and its `SnapshotEnd` is remembered, and the end turns into a *sweep* entry
//! that deletes the scope's files nobody re-sent (orphans). When the worker flushes, [`plan`] replays the buffer
//! in arrival order over the branch tip ([`TreeView`]): the latest content per path wins, semantically equal
//! content is a no-op, ownership markers are checked and created, and the effective changes are grouped into one
//! commit per author. Nothing here touches git or the network, so every rule is unit-tested on plain maps.

pub mod kustomize;
pub mod quarantine;
pub mod template;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use reverser_common::{paths, sops, yaml, yaml_edit};

use crate::{
    git::{FileChange, GitError},
    model::{
        Bytes, Change, ClusterIdentity, DestinationId, DestinationRef, FlushOrder, ObjectId,
        Operation, Scope, one_line,
    },
};

/// Flush thresholds (seed Appendix X).
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_files: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
}

/// Read access to the tree a plan is made against (the branch tip).
pub trait TreeView {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, GitError>;
    /// Every file under `folder`, recursively, as full repository paths.
    fn list(&self, folder: &str) -> Result<Vec<String>, GitError>;
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
    fn object(&self) -> Option<&ObjectId> {
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

/// Settings a plan needs besides the entries and the tree.
#[derive(Clone, Debug)]
pub struct PlanContext {
    pub bot_name: String,
    pub bot_email: String,
    /// Maximum orphans one sweep deletes; 0 disables orphan deletion.
    pub deletes_cap: usize,
    /// RFC 3339 time written into new ownership markers.
    pub now_rfc3339: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verb {
    Create,
    Update,
    Delete,
}

impl Verb {
    fn tag(&self) -> &'static str {
        match self {
            Verb::Create => "[CREATE]",
            Verb::Update => "[UPDATE]",
            Verb::Delete => "[DELETE]",
        }
    }
}

/// One commit to create, in order.
#[derive(Clone, Debug)]
pub struct PlannedCommit {
    pub author_name: String,
    pub author_email: String,
    pub message: String,
    pub changes: Vec<FileChange>,
    /// Destinations touched, for logs and statuses.
    pub destinations: Vec<DestinationId>,
    /// The entry index of the flush (CommitRequest) this commit answers.
    pub flush: Option<usize>,
    /// The commit's id once created (filled in by the worker).
    pub id: Option<String>,
}

/// A destination whose ownership marker names another owner.
#[derive(Clone, Debug)]
pub struct MarkerConflict {
    pub destination: DestinationRef,
    pub exclusive: bool,
    pub found_owner: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanStats {
    pub written: usize,
    pub deleted: usize,
    pub orphans_deleted: usize,
    pub noops: usize,
    pub bytes: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub commits: Vec<PlannedCommit>,
    pub marker_conflicts: Vec<MarkerConflict>,
    /// Entries refused because their destination's marker belongs to someone else (exclusive mode).
    pub refused_entries: Vec<usize>,
    /// Writes refused because their path would be a file and a folder at once (against the tree or an
    /// earlier write of the batch): entry index and why. Nothing else in the batch is held back by them.
    pub path_conflicts: Vec<(usize, String)>,
    /// Writes refused because the destination omits namespaces and another namespace has the same kind and name:
    /// entry index and why.
    pub namespace_clashes: Vec<(usize, String)>,
    /// Kustomizations left alone because they cannot be read or edited: an entry index of the destination and
    /// why (file and reason).
    pub kustomization_problems: Vec<(usize, String)>,
    /// Destinations whose kustomizations were looked at (an entry index of each).
    pub kustomization_checked: Vec<usize>,
    /// Sweeps the delete cap stopped early: entry index of the sweep and how many orphans are left.
    pub truncated_sweeps: Vec<(usize, usize)>,
    /// Sweeps that deleted every orphan they found (entry indexes).
    pub completed_sweeps: Vec<usize>,
    /// Orphans deleted per sweep: entry index of the sweep and how many of its orphans the commits delete.
    pub sweep_deletions: Vec<(usize, usize)>,
    /// Updates written as the new rendering although the file in the tree has a layout of its own (comments, key
    /// order) that could not be kept: see [`content_over`].
    pub edit_fallbacks: Vec<EditFallback>,
    pub stats: PlanStats,
}

/// A file whose comments and layout were replaced by the canonical rendering, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EditFallback {
    pub path: String,
    pub reason: &'static str,
}

impl Plan {
    /// The plan of a subset of a batch, with its entry indexes turned into the batch's (`batch_index[i]` is the
    /// batch index of the subset's entry `i`).
    pub fn remapped(mut self, batch_index: &[usize]) -> Plan {
        let map = |i: &mut usize| *i = batch_index[*i];
        self.refused_entries.iter_mut().for_each(map);
        self.path_conflicts.iter_mut().for_each(|(i, _)| map(i));
        self.namespace_clashes.iter_mut().for_each(|(i, _)| map(i));
        self.kustomization_problems
            .iter_mut()
            .for_each(|(i, _)| map(i));
        self.kustomization_checked.iter_mut().for_each(map);
        self.truncated_sweeps.iter_mut().for_each(|(i, _)| map(i));
        self.completed_sweeps.iter_mut().for_each(map);
        self.sweep_deletions.iter_mut().for_each(|(i, _)| map(i));
        self.commits
            .iter_mut()
            .filter_map(|c| c.flush.as_mut())
            .for_each(map);
        self
    }

    /// Appends a plan built on top of this one (quarantine builds a batch in pieces).
    pub fn absorb(&mut self, later: Plan) {
        self.commits.extend(later.commits);
        for conflict in later.marker_conflicts {
            if !self
                .marker_conflicts
                .iter()
                .any(|c| c.destination.id == conflict.destination.id)
            {
                self.marker_conflicts.push(conflict);
            }
        }
        self.refused_entries.extend(later.refused_entries);
        self.path_conflicts.extend(later.path_conflicts);
        self.namespace_clashes.extend(later.namespace_clashes);
        self.kustomization_problems
            .extend(later.kustomization_problems);
        self.kustomization_checked
            .extend(later.kustomization_checked);
        self.truncated_sweeps.extend(later.truncated_sweeps);
        self.completed_sweeps.extend(later.completed_sweeps);
        self.sweep_deletions.extend(later.sweep_deletions);
        self.edit_fallbacks.extend(later.edit_fallbacks);
        let (a, b) = (&mut self.stats, later.stats);
        a.written += b.written;
        a.deleted += b.deleted;
        a.orphans_deleted += b.orphans_deleted;
        a.noops += b.noops;
        a.bytes += b.bytes;
    }
}

/// The last word about one path within the buffer.
#[derive(Debug)]
struct Slot<'a> {
    content: Option<&'a Bytes>,
    fingerprint: Option<&'a str>,
    entry: usize,
    author: Option<&'a str>,
    orphan: bool,
}

/// Replays `entries` over `tree` and plans the commits that bring the tree to the result.
pub fn plan(entries: &[Entry], tree: &dyn TreeView, ctx: &PlanContext) -> Result<Plan, GitError> {
    // 1. Latest content per path, in arrival order; sweeps see the tree as the earlier entries left it.
    let mut slots: BTreeMap<String, Slot<'_>> = BTreeMap::new();
    let mut truncated_sweeps = Vec::new();
    let mut completed_sweeps = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        match &entry.op {
            EntryOp::Write {
                path,
                content,
                author,
                fingerprint,
                ..
            } => {
                slots.insert(
                    path.clone(),
                    Slot {
                        content: Some(content),
                        fingerprint: fingerprint.as_deref(),
                        entry: index,
                        author: author.as_deref(),
                        orphan: false,
                    },
                );
            }
            EntryOp::Remove { path, author, .. } => {
                slots.insert(
                    path.clone(),
                    Slot {
                        content: None,
                        fingerprint: None,
                        entry: index,
                        author: author.as_deref(),
                        orphan: false,
                    },
                );
            }
            EntryOp::Sweep {
                folder,
                namespace_given,
                keep,
                base_folder,
            } => {
                if ctx.deletes_cap == 0 {
                    continue;
                }
                let scope_relative = folder
                    .strip_prefix(base_folder)
                    .and_then(|f| f.strip_prefix('/'))
                    .unwrap_or("");
                let mut candidates: Vec<String> = Vec::new();
                let listed = tree.list(folder)?;
                let mut present: HashSet<String> = listed.into_iter().collect();
                for (path, slot) in &slots {
                    if path.starts_with(folder.as_str()) {
                        if slot.content.is_some() {
                            present.insert(path.clone());
                        } else {
                            present.remove(path);
                        }
                    }
                }
                let mut present: Vec<String> = present.into_iter().collect();
                present.sort();
                let mut left = 0usize;
                for path in &present {
                    let Some(relative) = path
                        .strip_prefix(base_folder.as_str())
                        .and_then(|p| p.strip_prefix('/'))
                    else {
                        continue;
                    };
                    if !paths::in_scope(scope_relative, *namespace_given, relative)
                        || keep.contains(path)
                        || (entry.destination.placement.kustomization.is_on()
                            && kustomize::is_kustomization_file(path))
                    {
                        continue;
                    }
                    // Over the cap: count what is left (reported, deleted by a later sweep).
                    if candidates.len() >= ctx.deletes_cap {
                        left += 1;
                    } else {
                        candidates.push(path.clone());
                    }
                }
                if left > 0 {
                    truncated_sweeps.push((index, left));
                } else {
                    completed_sweeps.push(index);
                }
                for path in candidates {
                    slots.insert(
                        path,
                        Slot {
                            content: None,
                            fingerprint: None,
                            entry: index,
                            author: None,
                            orphan: true,
                        },
                    );
                }
            }
            EntryOp::Nothing | EntryOp::Flush(_) => {}
        }
    }

    // 1b. A write that would turn a file into a folder or the other way round (git's D/F conflict) is refused
    // alone, in arrival order: the earlier write (or the tree) wins.
    let mut path_conflicts = refuse_path_conflicts(&mut slots, entries, tree)?;
    path_conflicts.extend(refuse_kustomization_names(&mut slots, entries));
    let namespace_clashes = refuse_namespace_clashes(&mut slots, entries, tree)?;

    // 2. Effective changes against the tree.
    struct Effective<'a> {
        path: &'a str,
        slot: &'a Slot<'a>,
        verb: Verb,
        /// The object's `kind`, read only for destinations whose message template uses it.
        kind: Option<String>,
        /// An update edited into the file in the tree (its comments and layout kept), written instead of the
        /// slot's content.
        edited: Option<Vec<u8>>,
    }
    let mut effective: Vec<Effective<'_>> = Vec::new();
    let mut stats = PlanStats::default();
    let mut sweep_deletions: BTreeMap<usize, usize> = BTreeMap::new();
    let mut edit_fallbacks = Vec::new();
    for (path, slot) in &slots {
        let current = tree.read(path)?;
        let kind = entries[slot.entry]
            .destination
            .commit_template
            .as_ref()
            .filter(|t| t.uses_kind())
            .and_then(|_| {
                let manifest = slot.content.map(|c| &c[..]).or(current.as_deref())?;
                template::kind_of(manifest)
            });
        let mut edited = None;
        let verb = match (slot.content, current) {
            // Ciphertext differs on every encryption: the plaintext fingerprint decides.
            (Some(_), Some(old))
                if slot
                    .fingerprint
                    .is_some_and(|f| sops::fingerprint_of(&old).as_deref() == Some(f)) =>
            {
                stats.noops += 1;
                continue;
            }
            (Some(new), Some(old)) if yaml::semantically_equal(&old, new) => {
                stats.noops += 1;
                continue;
            }
            (Some(new), Some(old)) => {
                match content_over(&old, new, slot.fingerprint.is_some()) {
                    Ok(content) => edited = content,
                    Err(fallback) => edit_fallbacks.push(EditFallback {
                        path: path.clone(),
                        reason: fallback.reason(),
                    }),
                }
                Verb::Update
            }
            (Some(_), None) => Verb::Create,
            (None, Some(_)) => Verb::Delete,
            (None, None) => {
                stats.noops += 1;
                continue;
            }
        };
        effective.push(Effective {
            path: path.as_str(),
            slot,
            verb,
            kind,
            edited,
        });
    }

    // 3. Ownership markers of the destinations that change something.
    let destination_of_entry: Vec<&DestinationRef> =
        entries.iter().map(|e| &e.destination).collect();
    let mut touched: BTreeMap<&DestinationId, &DestinationRef> = BTreeMap::new();
    for change in &effective {
        let destination = destination_of_entry[change.slot.entry];
        touched.insert(&destination.id, destination);
    }
    let mut marker_conflicts = Vec::new();
    let mut refused_destinations: HashSet<&DestinationId> = HashSet::new();
    let mut new_markers: HashMap<&DestinationId, FileChange> = HashMap::new();
    for (id, destination) in &touched {
        let marker_path = paths::marker_path(&destination.base_folder);
        match tree.read(&marker_path)? {
            None => {
                new_markers.insert(
                    id,
                    FileChange {
                        path: marker_path,
                        content: Some(render_marker(
                            &destination.origin.identity,
                            &ctx.now_rfc3339,
                        )),
                    },
                );
            }
            Some(existing) => {
                if let Some(found_owner) = marker_mismatch(&existing, &destination.origin.identity)
                {
                    if destination.exclusive_mode {
                        refused_destinations.insert(id);
                    }
                    marker_conflicts.push(MarkerConflict {
                        destination: (*destination).clone(),
                        exclusive: destination.exclusive_mode,
                        found_owner,
                    });
                }
            }
        }
    }
    let refused_entries: Vec<usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| refused_destinations.contains(&e.destination.id))
        .map(|(i, _)| i)
        .collect();
    effective.retain(|c| !refused_destinations.contains(&destination_of_entry[c.slot.entry].id));

    // The sops CLI configuration of destinations that write encrypted files: created when missing, kept in line
    // with the recipients while it is the generated one, never touched once a person replaced it.
    let mut new_sops_configs: HashMap<&DestinationId, FileChange> = HashMap::new();
    let mut touched_sourceignore: HashSet<&DestinationId> = HashSet::new();
    for change in &effective {
        let destination = destination_of_entry[change.slot.entry];
        if change.slot.fingerprint.is_none()
            || change.slot.content.is_none()
            || destination.age_recipients.is_empty()
            || new_sops_configs.contains_key(&destination.id)
        {
            continue;
        }
        let path = paths::join(&destination.base_folder, sops::CONFIG_FILE);
        let wanted = sops::render_config(&destination.age_recipients);
        let write = match tree.read(&path)? {
            None => true,
            Some(existing) => sops::is_generated_config(&existing) && existing != wanted.as_bytes(),
        };
        if write {
            new_sops_configs.insert(
                &destination.id,
                FileChange {
                    path,
                    content: Some(wanted.into_bytes()),
                },
            );
        }
    }

    // Flux's ignore rules for the writer's own files, in every base folder that changes: created when missing,
    // kept while generated, never touched once a person replaced it.
    let mut new_sourceignores: HashMap<&DestinationId, FileChange> = HashMap::new();
    for change in &effective {
        let destination = destination_of_entry[change.slot.entry];
        if new_sourceignores.contains_key(&destination.id)
            || touched_sourceignore.contains(&destination.id)
        {
            continue;
        }
        touched_sourceignore.insert(&destination.id);
        let path = paths::join(&destination.base_folder, kustomize::SOURCEIGNORE_FILE);
        let wanted = kustomize::render_sourceignore();
        let write = match tree.read(&path)? {
            // A folder of that name (someone's) is left alone: the rules are a courtesy, not worth a refused batch.
            None => tree.list(&path)?.is_empty(),
            Some(existing) => {
                kustomize::is_generated_sourceignore(&existing) && existing != wanted.as_bytes()
            }
        };
        if write {
            new_sourceignores.insert(
                &destination.id,
                FileChange {
                    path,
                    content: Some(wanted.as_bytes().to_vec()),
                },
            );
        }
    }

    // Kustomizations: every file written (re-sent ones too) is listed, every file removed unlisted.
    let mut kustomizations: BTreeMap<&DestinationId, (&DestinationRef, Vec<FileChange>)> =
        BTreeMap::new();
    let mut kustomization_problems: Vec<(usize, String)> = Vec::new();
    let mut kustomization_checked: Vec<usize> = Vec::new();
    {
        let mut planners: BTreeMap<&DestinationId, (usize, kustomize::Planner<'_>)> =
            BTreeMap::new();
        for (path, slot) in &slots {
            let destination = destination_of_entry[slot.entry];
            let mode = destination.placement.kustomization;
            if !mode.is_on() || refused_destinations.contains(&destination.id) {
                continue;
            }
            let (_, planner) = planners.entry(&destination.id).or_insert_with(|| {
                (
                    slot.entry,
                    kustomize::Planner::new(
                        tree,
                        &destination.base_folder,
                        mode == crate::model::KustomizationMode::Create,
                    ),
                )
            });
            if slot.content.is_some() {
                planner.list(path, false)?;
            } else {
                planner.unlist(path)?;
            }
        }
        for (id, (entry, planner)) in planners {
            let edits = planner.finish();
            kustomization_checked.push(entry);
            for problem in edits.problems {
                kustomization_problems.push((entry, problem));
            }
            if !edits.changes.is_empty() {
                kustomizations.insert(id, (destination_of_entry[entry], edits.changes));
            }
        }
    }

    // 4. One commit per (author, installation), ordered by first arrival. A destination's changes that arrived
    // before one of its flushes (CommitRequests) form that flush's commit, authored by the requester.
    let flushes: Vec<(usize, &DestinationId, &FlushOrder)> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match &e.op {
            EntryOp::Flush(order) => Some((i, &e.destination.id, &**order)),
            _ => None,
        })
        .collect();
    let flush_of = |destination: &DestinationId, entry: usize| -> Option<(usize, &FlushOrder)> {
        flushes
            .iter()
            .find(|(i, d, _)| *i > entry && *d == destination)
            .map(|&(i, _, order)| (i, order))
    };
    let mut groups: Vec<(GroupKey<'_>, Vec<&Effective<'_>>)> = Vec::new();
    let mut order: Vec<&Effective<'_>> = effective.iter().collect();
    order.sort_by_key(|c| (c.slot.entry, c.path));
    for change in order {
        let destination = destination_of_entry[change.slot.entry];
        let flush = flush_of(&destination.id, change.slot.entry);
        let key = GroupKey {
            author: match flush {
                Some((_, order)) => order.author.as_deref(),
                None => change.slot.author,
            },
            identity: &destination.origin.identity,
            template: destination.commit_template.as_deref(),
            flush,
        };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(change),
            None => groups.push((key, vec![change])),
        }
    }
    // A kustomization edit goes into the destination's last commit of the batch: by then every file it lists
    // exists and every file it unlists is gone.
    let mut last_group: HashMap<&DestinationId, usize> = HashMap::new();
    for (index, (_, members)) in groups.iter().enumerate() {
        for change in members {
            last_group.insert(&destination_of_entry[change.slot.entry].id, index);
        }
    }
    let mut commits = Vec::with_capacity(groups.len() + kustomizations.len());
    for (group_index, (key, members)) in groups.into_iter().enumerate() {
        let (author_name, author_email) = match key.author {
            Some(user) => author_identity(user),
            None => (ctx.bot_name.clone(), ctx.bot_email.clone()),
        };
        let mut changes = Vec::with_capacity(members.len() + 1);
        let mut lines = Vec::with_capacity(members.len());
        let mut destinations: Vec<DestinationId> = Vec::new();
        let (mut created, mut updated, mut deleted) = (0usize, 0usize, 0usize);
        for change in &members {
            let destination = destination_of_entry[change.slot.entry];
            if !destinations.contains(&destination.id) {
                destinations.push(destination.id.clone());
                if let Some(marker) = new_markers.remove(&destination.id) {
                    changes.push(marker);
                }
                if let Some(config) = new_sops_configs.remove(&destination.id) {
                    changes.push(config);
                }
                if let Some(ignore) = new_sourceignores.remove(&destination.id) {
                    changes.push(ignore);
                }
            }
            let content = match &change.edited {
                Some(edited) => Some(edited.clone()),
                None => change.slot.content.map(|c| c.to_vec()),
            };
            stats.bytes += content.as_ref().map_or(0, Vec::len);
            match change.verb {
                Verb::Create => created += 1,
                Verb::Update => updated += 1,
                Verb::Delete => deleted += 1,
            }
            if change.verb == Verb::Delete {
                stats.deleted += 1;
                if change.slot.orphan {
                    stats.orphans_deleted += 1;
                    *sweep_deletions.entry(change.slot.entry).or_insert(0) += 1;
                }
            } else {
                stats.written += 1;
            }
            let shown = change
                .path
                .strip_prefix(destination.base_folder.as_str())
                .and_then(|p| p.strip_prefix('/'))
                .unwrap_or(change.path);
            let shown = shown.strip_suffix(".yaml").unwrap_or(shown);
            let note = if change.slot.orphan {
                " (orphan: no longer in the cluster)"
            } else {
                ""
            };
            lines.push(format!("{} {}{}", change.verb.tag(), one_line(shown), note));
            changes.push(FileChange {
                path: change.path.to_owned(),
                content,
            });
        }
        for id in &destinations {
            if last_group.get(id) == Some(&group_index)
                && let Some((_, edits)) = kustomizations.remove(id)
            {
                changes.extend(edits);
            }
        }
        let mut trailers = key.identity.trailers();
        if let Some((_, order)) = key.flush {
            trailers.push_str(&format!(
                "\nX-ConfigButler-CommitRequest: {}",
                one_line(&order.request_name)
            ));
        }
        let message = if let Some(text) = key.flush.and_then(|(_, order)| order.message.as_ref()) {
            format!("{text}\n\n{trailers}\n")
        } else if let Some(template) = key.template {
            let fields = commit_fields(
                &members
                    .iter()
                    .map(|c| {
                        let destination = destination_of_entry[c.slot.entry];
                        TemplateInput {
                            verb: &c.verb,
                            path: c.path,
                            base_folder: &destination.base_folder,
                            object: entries[c.slot.entry].op.object(),
                            kind: c.kind.as_deref(),
                        }
                    })
                    .collect::<Vec<_>>(),
                key.author.unwrap_or(&ctx.bot_name),
                &lines,
                (created, updated, deleted),
            );
            format!("{}\n\n{trailers}\n", template.render(&fields))
        } else if lines.len() == 1 {
            format!("{}\n\n{trailers}\n", lines[0])
        } else {
            let folders: Vec<String> = members
                .iter()
                .map(|c| destination_of_entry[c.slot.entry].base_folder.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            format!(
                "Sync {} objects in {}: {}\n\n{}\n\n{trailers}\n",
                lines.len(),
                folders.join(", "),
                summary(created, updated, deleted),
                object_lines(&lines)
            )
        };
        commits.push(PlannedCommit {
            author_name,
            author_email,
            message,
            changes,
            destinations,
            flush: key.flush.map(|(index, _)| index),
            id: None,
        });
    }
    // Kustomization edits of destinations whose objects did not change (re-sent files not listed yet).
    for (id, (destination, edits)) in kustomizations {
        commits.push(PlannedCommit {
            author_name: ctx.bot_name.clone(),
            author_email: ctx.bot_email.clone(),
            message: format!(
                "List {} mirrored files in the kustomizations of {}\n\n{}\n",
                edits.len(),
                one_line(&destination.base_folder),
                destination.origin.identity.trailers()
            ),
            changes: edits,
            destinations: vec![id.clone()],
            flush: None,
            id: None,
        });
    }
    Ok(Plan {
        commits,
        marker_conflicts,
        refused_entries,
        namespace_clashes,
        kustomization_problems,
        kustomization_checked,
        path_conflicts,
        truncated_sweeps,
        completed_sweeps,
        sweep_deletions: sweep_deletions.into_iter().collect(),
        edit_fallbacks,
        stats,
    })
}

/// What to write over `old` for the update to `new`: `Ok(None)` writes `new` as it is, `Ok(Some(text))` is `old`
/// edited in place (a person's comments, key order and formatting kept, see [`yaml_edit`]), `Err` writes `new`
/// although `old` had a layout of its own.
///
/// Always on: it only acts on files a person reformatted or commented. A file in the writer's own layout (the
/// common case) takes the fast path, one pass over the bytes, and never reaches the parser.
fn content_over(
    old: &[u8],
    new: &[u8],
    encrypted: bool,
) -> Result<Option<Vec<u8>>, yaml_edit::Fallback> {
    if yaml_edit::same_layout(old, new) {
        return Ok(None);
    }
    // A SOPS file's MAC covers its values: it is replaced whole.
    if encrypted {
        return Err(yaml_edit::Fallback::Sops);
    }
    let (Ok(old), Ok(new)) = (std::str::from_utf8(old), std::str::from_utf8(new)) else {
        return Err(yaml_edit::Fallback::Unparseable);
    };
    let edited = yaml_edit::edit_in_place(old, new)?;
    Ok((edited != new).then(|| edited.into_bytes()))
}

/// Removes from `slots` every write whose path clashes with a file or folder of the tree or of an earlier accepted
/// write; returns the refused entries with a reason that names only the refused path (the other path may belong
/// to another client).
fn refuse_path_conflicts(
    slots: &mut BTreeMap<String, Slot<'_>>,
    entries: &[Entry],
    tree: &dyn TreeView,
) -> Result<Vec<(usize, String)>, GitError> {
    let mut writes: Vec<(usize, String)> = slots
        .iter()
        .filter(|(_, slot)| slot.content.is_some())
        .map(|(path, slot)| (slot.entry, path.clone()))
        .collect();
    writes.sort();
    let mut accepted: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let mut refused = Vec::new();
    for (index, path) in writes {
        // A file at `candidate` in the result, as far as decided yet.
        // A deletion in the same batch does not make room: the batch's commits (one per author) may apply the
        // write before the deletion, and git would refuse that tree. The next batch can write it.
        let file_at = |candidate: &str| -> Result<bool, GitError> {
            Ok(accepted.contains(candidate) || tree.read(candidate)?.is_some())
        };
        let mut why = None;
        for (slash, _) in path.match_indices('/') {
            if file_at(&path[..slash])? {
                why = Some("a folder on its path is a file");
                break;
            }
        }
        if why.is_none() {
            let prefix = format!("{path}/");
            let below_pending = accepted
                .range(prefix.clone()..)
                .next()
                .is_some_and(|p| p.starts_with(&prefix));
            let below_tree = || -> Result<bool, GitError> {
                Ok(tree.list(&path)?.iter().any(|p| p.starts_with(&prefix)))
            };
            if below_pending || below_tree()? {
                why = Some("it is a folder holding other files");
            }
        }
        match why {
            Some(why) => {
                let entry = &entries[index];
                let shown = path
                    .strip_prefix(entry.destination.base_folder.as_str())
                    .and_then(|p| p.strip_prefix('/'))
                    .unwrap_or(&path);
                refused.push((
                    index,
                    format!("cannot write {}: {why} in the branch", one_line(shown)),
                ));
                slots.remove(&path);
            }
            None => {
                accepted.insert(path);
            }
        }
    }
    Ok(refused)
}

/// Refuses writes whose file name kustomize would read as a kustomization, in destinations that keep
/// kustomizations (the writer would edit the object as a kustomization, and kustomize would build its folder).
fn refuse_kustomization_names(
    slots: &mut BTreeMap<String, Slot<'_>>,
    entries: &[Entry],
) -> Vec<(usize, String)> {
    let refused: Vec<(String, usize)> = slots
        .iter()
        .filter(|(path, slot)| {
            slot.content.is_some()
                && entries[slot.entry]
                    .destination
                    .placement
                    .kustomization
                    .is_on()
                && kustomize::is_kustomization_file(path)
        })
        .map(|(path, slot)| (path.clone(), slot.entry))
        .collect();
    refused
        .into_iter()
        .map(|(path, index)| {
            slots.remove(&path);
            let shown = path
                .strip_prefix(entries[index].destination.base_folder.as_str())
                .and_then(|p| p.strip_prefix('/'))
                .unwrap_or(&path);
            (
                index,
                format!(
                    "cannot write {}: kustomize reads a file of that name as a kustomization (spec.kustomization is on)",
                    one_line(shown)
                ),
            )
        })
        .collect()
}

/// In destinations that omit namespaces, refuses a new file `{g}/{v}/{r}/{ns}/{name}` when another namespace
/// folder of the same resource has `{name}` (in the tree as the batch leaves it, or an earlier write of the
/// batch): deployed into one namespace they would be one object. Files that exist already are updated.
fn refuse_namespace_clashes(
    slots: &mut BTreeMap<String, Slot<'_>>,
    entries: &[Entry],
    tree: &dyn TreeView,
) -> Result<Vec<(usize, String)>, GitError> {
    // (resource folder, file name) → namespaces that have it.
    let mut owners: HashMap<(String, String), std::collections::BTreeSet<String>> = HashMap::new();
    let mut listed: HashSet<String> = HashSet::new();
    let split = |base: &str, path: &str| -> Option<(String, String, String)> {
        let relative = path.strip_prefix(base)?.strip_prefix('/')?;
        let parts: Vec<&str> = relative.split('/').collect();
        (parts.len() == 5).then(|| {
            (
                format!("{base}/{}/{}/{}", parts[0], parts[1], parts[2]),
                parts[3].to_owned(),
                parts[4].to_owned(),
            )
        })
    };
    let mut writes: Vec<(usize, String)> = slots
        .iter()
        .filter(|(_, slot)| {
            slot.content.is_some() && entries[slot.entry].destination.placement.omit_namespace
        })
        .map(|(path, slot)| (slot.entry, path.clone()))
        .collect();
    if writes.is_empty() {
        return Ok(Vec::new());
    }
    writes.sort();
    let mut refused = Vec::new();
    for (index, path) in writes {
        let base = entries[index].destination.base_folder.as_str();
        let Some((resource_folder, namespace, name)) = split(base, &path) else {
            continue;
        };
        if listed.insert(resource_folder.clone()) {
            let mut present: HashSet<String> = tree.list(&resource_folder)?.into_iter().collect();
            for (other, slot) in slots.iter() {
                if slot.content.is_none() {
                    present.remove(other);
                }
            }
            for file in present {
                if let Some((folder, ns, file_name)) = split(base, &file) {
                    owners.entry((folder, file_name)).or_default().insert(ns);
                }
            }
        }
        let holders = owners.entry((resource_folder, name.clone())).or_default();
        let other = holders.iter().find(|ns| **ns != namespace).cloned();
        match other {
            Some(other) if tree.read(&path)?.is_none() => {
                let shown = path
                    .strip_prefix(base)
                    .and_then(|p| p.strip_prefix('/'))
                    .unwrap_or(&path);
                refused.push((
                    index,
                    format!(
                        "cannot write {}: namespace {} of this destination already has {}, and with omitNamespace \
                         both would be one object in the namespace chosen at deploy time",
                        one_line(shown),
                        one_line(&other),
                        one_line(name.strip_suffix(".yaml").unwrap_or(&name))
                    ),
                ));
                slots.remove(&path);
            }
            _ => {
                holders.insert(namespace);
            }
        }
    }
    Ok(refused)
}

#[derive(PartialEq, Eq)]
struct GroupKey<'a> {
    author: Option<&'a str>,
    identity: &'a ClusterIdentity,
    /// Destinations with different message templates never share a commit.
    template: Option<&'a template::CommitTemplate>,
    /// The flush whose commit this is (its entry index and order): never shared with other changes.
    flush: Option<(usize, &'a FlushOrder)>,
}

/// What a message template needs to know about one object of a commit.
struct TemplateInput<'a> {
    verb: &'a Verb,
    path: &'a str,
    base_folder: &'a str,
    object: Option<&'a ObjectId>,
    kind: Option<&'a str>,
}

/// Most object lines a commit message lists.
const MAX_MESSAGE_LINES: usize = 1000;

/// The `{objects}` list: one line per object, at most [`MAX_MESSAGE_LINES`].
fn object_lines(lines: &[String]) -> String {
    let mut body = lines
        .iter()
        .take(MAX_MESSAGE_LINES)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    if lines.len() > MAX_MESSAGE_LINES {
        body.push_str(&format!(
            "\n... and {} more",
            lines.len() - MAX_MESSAGE_LINES
        ));
    }
    body
}

fn summary(created: usize, updated: usize, deleted: usize) -> String {
    let mut summary = Vec::new();
    for (count, word) in [
        (created, "created"),
        (updated, "updated"),
        (deleted, "deleted"),
    ] {
        if count > 0 {
            summary.push(format!("{count} {word}"));
        }
    }
    summary.join(", ")
}

/// The template values of one commit. The identity comes from the agent's `ObjectIdentity`, or from the file's
/// path (`{group}/{version}/{resource}/[{namespace}/]{name}.yaml`) for orphans a sweep deletes.
fn commit_fields(
    members: &[TemplateInput<'_>],
    author: &str,
    lines: &[String],
    (created, updated, deleted): (usize, usize, usize),
) -> template::CommitFields {
    struct Identity {
        group: String,
        version: String,
        resource: String,
        namespace: String,
        name: String,
    }
    let identities: Vec<Identity> = members
        .iter()
        .map(|m| match m.object.filter(|o| !o.resource.is_empty()) {
            Some(o) => Identity {
                group: if o.group.is_empty() {
                    "core".into()
                } else {
                    one_line(&o.group)
                },
                version: one_line(&o.version),
                resource: one_line(&o.resource),
                namespace: one_line(&o.namespace),
                name: one_line(&o.name),
            },
            None => {
                let relative = m
                    .path
                    .strip_prefix(m.base_folder)
                    .and_then(|p| p.strip_prefix('/'))
                    .unwrap_or(m.path);
                let file = relative.strip_suffix(".yaml").unwrap_or(relative);
                let file = file.strip_suffix(".sops").unwrap_or(file);
                let decode =
                    |s: &str| one_line(&paths::decode_segment(s).unwrap_or_else(|_| s.to_owned()));
                let segments: Vec<&str> = file.split('/').collect();
                let (namespace, name) = match segments.len() {
                    5 => (decode(segments[3]), decode(segments[4])),
                    4 => (String::new(), decode(segments[3])),
                    _ => (
                        String::new(),
                        decode(segments.last().copied().unwrap_or("")),
                    ),
                };
                let at = |i: usize| {
                    segments
                        .get(i)
                        .filter(|_| segments.len() >= 4)
                        .map(|s| decode(s))
                        .unwrap_or_default()
                };
                Identity {
                    group: at(0),
                    version: at(1),
                    resource: at(2),
                    namespace,
                    name,
                }
            }
        })
        .collect();
    let operation = template::common(members.iter().map(|m| match m.verb {
        Verb::Create => "create",
        Verb::Update => "update",
        Verb::Delete => "delete",
    }));
    let folders: std::collections::BTreeSet<&str> = members.iter().map(|m| m.base_folder).collect();
    template::CommitFields {
        operation: if operation == "various" {
            "sync".into()
        } else {
            operation
        },
        kind: template::common(members.iter().map(|m| m.kind.unwrap_or(""))),
        resource: template::common(identities.iter().map(|i| i.resource.as_str())),
        group: template::common(identities.iter().map(|i| i.group.as_str())),
        version: template::common(identities.iter().map(|i| i.version.as_str())),
        namespace: template::common(identities.iter().map(|i| i.namespace.as_str())),
        name: template::common(identities.iter().map(|i| i.name.as_str())),
        author: one_line(author),
        count: members.len(),
        folder: folders.into_iter().collect::<Vec<_>>().join(", "),
        summary: summary(created, updated, deleted),
        objects: object_lines(lines),
    }
}

/// Git author for a Kubernetes username: an e-mail username is used as is; anything else gets a deterministic
/// `…@noreply.cluster.local` address. Names never contain `<`, `>` or control characters (git would refuse or
/// mis-parse them).
pub fn author_identity(username: &str) -> (String, String) {
    let name: String = username
        .chars()
        .filter(|c| !c.is_control() && *c != '<' && *c != '>')
        .collect();
    let name = name.trim().to_owned();
    let looks_like_email = {
        let mut parts = name.splitn(2, '@');
        let local = parts.next().unwrap_or_default();
        let domain = parts.next().unwrap_or_default();
        !local.is_empty()
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "@._+-".contains(c))
    };
    if looks_like_email {
        return (name.clone(), name);
    }
    let mut local: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    local = local.trim_matches(|c| c == '-' || c == '.').to_owned();
    if local.is_empty() {
        local = "unknown".to_owned();
    }
    let name = if name.is_empty() { local.clone() } else { name };
    (name, format!("{local}@noreply.cluster.local"))
}

/// The ownership marker written into `{baseFolder}/.configbutler/owner.yaml`.
pub fn render_marker(identity: &ClusterIdentity, now_rfc3339: &str) -> Vec<u8> {
    let value = serde_json::json!({
        "clusterUID": identity.cluster_uid,
        "clusterName": identity.cluster_name,
        "controllerNamespace": identity.controller_namespace,
        "controllerName": identity.controller_name,
        "instanceID": identity.instance_id,
        "timestamp": now_rfc3339,
    });
    let mut text = String::from(
        "# Written by gitops-reverser: this folder is mirrored from the cluster below.\n",
    );
    text.push_str(&serde_saphyr::to_string(&value).unwrap_or_default());
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.into_bytes()
}

/// `Some(description of the recorded owner)` when the marker names another installation. The instance id is
/// not compared: it changes with every agent restart.
pub fn marker_mismatch(marker: &[u8], identity: &ClusterIdentity) -> Option<String> {
    let value = match yaml::parse_document(marker) {
        Ok(value) => value,
        Err(_) => return Some("an unreadable marker".to_owned()),
    };
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let (uid, ns, name) = (
        field("clusterUID"),
        field("controllerNamespace"),
        field("controllerName"),
    );
    if uid == identity.cluster_uid
        && ns == identity.controller_namespace
        && name == identity.controller_name
    {
        None
    } else {
        Some(format!("cluster {uid} controller {ns}/{name}"))
    }
}

#[cfg(test)]
mod tests {
    mod placement;

    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::model::{Origin, Prune};

    struct MapTree(BTreeMap<String, Vec<u8>>);

    impl TreeView for MapTree {
        fn read(&self, path: &str) -> Result<Option<Vec<u8>>, GitError> {
            Ok(self.0.get(path).cloned())
        }
        fn list(&self, folder: &str) -> Result<Vec<String>, GitError> {
            let prefix = format!("{folder}/");
            Ok(self
                .0
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .cloned()
                .collect())
        }
    }

    fn tree(files: &[(&str, &str)]) -> MapTree {
        MapTree(
            files
                .iter()
                .map(|(p, c)| ((*p).to_owned(), c.as_bytes().to_vec()))
                .collect(),
        )
    }

    fn identity(uid: &str) -> ClusterIdentity {
        ClusterIdentity {
            cluster_uid: uid.into(),
            cluster_name: "test".into(),
            instance_id: "agent-0".into(),
            controller_namespace: "gitops".into(),
            controller_name: "reverser".into(),
            leader_term: None,
        }
    }

    fn destination(base: &str, exclusive: bool) -> DestinationRef {
        destination_for("uid-a", base, exclusive)
    }

    fn destination_for(uid: &str, base: &str, exclusive: bool) -> DestinationRef {
        let (replies, _) = crate::reply::Replies::channel(1);
        DestinationRef {
            id: DestinationId {
                cluster_uid: uid.into(),
                key: format!("gitops/{base}"),
            },
            base_folder: base.into(),
            exclusive_mode: exclusive,
            age_recipients: Vec::new().into(),
            prune: Prune::OnSnapshot,
            commit_template: None,
            placement: Default::default(),
            origin: Arc::new(Origin {
                session_id: 1,
                identity: identity(uid),
                replies,
            }),
            acked: Arc::new(AtomicU64::new(0)),
            conditions: Default::default(),
        }
    }

    fn upsert(
        d: &DestinationRef,
        seq: u64,
        path: &str,
        content: &str,
        author: Option<&str>,
    ) -> Change {
        Change {
            destination: d.clone(),
            sequence: seq,
            operation: Operation::Upsert {
                path: path.into(),
                content: content.as_bytes().into(),
                object: ObjectId::default(),
                author: author.map(Into::into),
                fingerprint: None,
            },
        }
    }

    fn encrypted(fingerprint: &str, ciphertext: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n  annotations:\n    {}: {fingerprint}\n\
             data:\n  password: ENC[AES256_GCM,data:{ciphertext},iv:x,tag:y,type:str]\nsops:\n  version: 3.9.4\n",
            sops::FINGERPRINT_ANNOTATION
        )
    }

    fn sealed_upsert(
        d: &DestinationRef,
        seq: u64,
        path: &str,
        fingerprint: &str,
        ciphertext: &str,
    ) -> Change {
        let mut change = upsert(d, seq, path, &encrypted(fingerprint, ciphertext), None);
        if let Operation::Upsert { fingerprint: f, .. } = &mut change.operation {
            *f = Some(fingerprint.to_owned());
        }
        change
    }

    fn encrypting(base: &str, recipients: &[&str]) -> DestinationRef {
        let mut d = destination(base, false);
        d.age_recipients = recipients
            .iter()
            .map(|r| (*r).to_owned())
            .collect::<Vec<_>>()
            .into();
        d
    }

    const SECRET_PATH: &str = "core/v1/secrets/shop/db.sops.yaml";

    #[test]
    fn equal_fingerprint_is_a_no_op_although_the_ciphertext_differs() {
        let d = encrypting("clusters/prod", &["age1a"]);
        let config = sops::render_config(&["age1a".to_owned()]);
        let t = tree(&[
            (
                "clusters/prod/core/v1/secrets/shop/db.sops.yaml",
                &encrypted("v1:aa", "OLD"),
            ),
            (
                "clusters/prod/.configbutler/owner.yaml",
                &marker_for("uid-a"),
            ),
            ("clusters/prod/.sops.yaml", &config),
        ]);
        let same = buffer(vec![sealed_upsert(&d, 1, SECRET_PATH, "v1:aa", "NEW")]);
        let plan_same = plan(same.entries(), &t, &context(500)).unwrap();
        assert!(plan_same.commits.is_empty());
        assert_eq!(plan_same.stats.noops, 1);
        // Another fingerprint (changed data or recipients) re-encrypts once.
        let changed = buffer(vec![sealed_upsert(&d, 2, SECRET_PATH, "v1:bb", "NEW")]);
        let plan_changed = plan(changed.entries(), &t, &context(500)).unwrap();
        assert_eq!(
            changed_paths(&plan_changed),
            vec![(
                "clusters/prod/core/v1/secrets/shop/db.sops.yaml".to_owned(),
                true
            )]
        );
    }

    #[test]
    fn first_encrypted_file_bootstraps_sops_config_and_keeps_a_human_one() {
        let d = encrypting("clusters/prod", &["age1b", "age1a"]);
        let b = buffer(vec![
            upsert(&d, 1, "core/v1/configmaps/shop/a.yaml", CM, None),
            sealed_upsert(&d, 2, SECRET_PATH, "v1:aa", "C"),
        ]);
        let plan1 = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
        let paths = changed_paths(&plan1);
        assert!(
            paths.contains(&("clusters/prod/.sops.yaml".to_owned(), true)),
            "{paths:?}"
        );
        let config = plan1.commits[0]
            .changes
            .iter()
            .find(|c| c.path == "clusters/prod/.sops.yaml")
            .and_then(|c| c.content.clone())
            .unwrap();
        assert!(
            String::from_utf8(config)
                .unwrap()
                .contains("age: 'age1a,age1b'")
        );
        // Recipients changed: the generated file follows them.
        let stale = sops::render_config(&["age1old".to_owned()]);
        let t = tree(&[
            (
                "clusters/prod/.configbutler/owner.yaml",
                &marker_for("uid-a"),
            ),
            ("clusters/prod/.sops.yaml", &stale),
        ]);
        let b2 = buffer(vec![sealed_upsert(&d, 3, SECRET_PATH, "v1:cc", "C")]);
        let paths2 = changed_paths(&plan(b2.entries(), &t, &context(500)).unwrap());
        assert!(paths2.contains(&("clusters/prod/.sops.yaml".to_owned(), true)));
        // A configuration written by a person is left alone; plain destinations never get one.
        let human = tree(&[
            (
                "clusters/prod/.configbutler/owner.yaml",
                &marker_for("uid-a"),
            ),
            ("clusters/prod/.sops.yaml", "creation_rules: []\n"),
        ]);
        let paths3 = changed_paths(&plan(b2.entries(), &human, &context(500)).unwrap());
        assert!(
            !paths3
                .iter()
                .any(|(p, _)| p.ends_with(".sops.yaml") && !p.contains("secrets"))
        );
        let plain = destination("clusters/prod", false);
        let b4 = buffer(vec![upsert(
            &plain,
            4,
            "core/v1/configmaps/shop/a.yaml",
            CM,
            None,
        )]);
        let paths4 = changed_paths(&plan(b4.entries(), &tree(&[]), &context(500)).unwrap());
        assert!(!paths4.iter().any(|(p, _)| p.ends_with("/.sops.yaml")));
    }

    fn delete(d: &DestinationRef, seq: u64, path: &str) -> Change {
        Change {
            destination: d.clone(),
            sequence: seq,
            operation: Operation::Delete {
                path: path.into(),
                object: ObjectId::default(),
                author: None,
            },
        }
    }

    fn snapshot(
        d: &DestinationRef,
        seq: u64,
        folder: &str,
        ns: bool,
        epoch: u64,
        begin: bool,
    ) -> Change {
        let scope = Scope {
            folder: folder.into(),
            namespace_given: ns,
        };
        Change {
            destination: d.clone(),
            sequence: seq,
            operation: if begin {
                Operation::SnapshotBegin { scope, epoch }
            } else {
                Operation::SnapshotEnd { scope, epoch }
            },
        }
    }

    fn context(cap: usize) -> PlanContext {
        PlanContext {
            bot_name: "Bot".into(),
            bot_email: "bot@example.com".into(),
            deletes_cap: cap,
            now_rfc3339: "2026-11-26T00:00:00Z".into(),
        }
    }

    fn buffer(changes: Vec<Change>) -> Buffer {
        let mut buffer = Buffer::default();
        let now = Instant::now();
        for change in changes {
            assert_eq!(buffer.push(change, now), Accepted::Buffered);
        }
        buffer
    }

    fn marker_for(uid: &str) -> String {
        String::from_utf8(render_marker(&identity(uid), "2026-01-01T00:00:00Z")).unwrap()
    }

    /// Changed paths, without the base folders' `.sourceignore` (its own test checks it).
    fn changed_paths(plan: &Plan) -> Vec<(String, bool)> {
        plan.commits
            .iter()
            .flat_map(|c| {
                c.changes
                    .iter()
                    .filter(|f| !f.path.ends_with("/.sourceignore"))
                    .map(|f| (f.path.clone(), f.content.is_some()))
            })
            .collect()
    }

    const CM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  k: v\n";
    const CM2: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  k: w\n";

    #[test]
    fn latest_content_per_path_wins_and_first_write_adds_the_marker() {
        let d = destination("clusters/prod", false);
        let b = buffer(vec![
            upsert(&d, 1, "core/v1/configmaps/shop/a.yaml", CM, None),
            upsert(&d, 2, "core/v1/configmaps/shop/a.yaml", CM2, None),
        ]);
        let plan = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
        assert_eq!(plan.commits.len(), 1);
        let commit = &plan.commits[0];
        assert_eq!(commit.changes.len(), 3, "marker + ignore rules + object");
        assert_eq!(
            commit.changes[0].path,
            "clusters/prod/.configbutler/owner.yaml"
        );
        assert_eq!(commit.changes[2].content.as_deref(), Some(CM2.as_bytes()));
        assert!(
            commit
                .message
                .starts_with("[CREATE] core/v1/configmaps/shop/a\n"),
            "{}",
            commit.message
        );
        assert!(commit.message.contains("X-ConfigButler-ClusterUID: uid-a"));
        assert_eq!(
            (commit.author_name.as_str(), commit.author_email.as_str()),
            ("Bot", "bot@example.com")
        );
    }

    #[test]
    fn semantically_equal_content_is_a_no_op() {
        let d = destination("clusters/prod", false);
        let reformatted = "kind: ConfigMap\napiVersion: v1\ndata: {k: v}\nmetadata: {name: a}\n";
        let t = tree(&[
            ("clusters/prod/core/v1/configmaps/shop/a.yaml", CM),
            (
                "clusters/prod/.configbutler/owner.yaml",
                &marker_for("uid-a"),
            ),
        ]);
        let b = buffer(vec![
            upsert(&d, 1, "core/v1/configmaps/shop/a.yaml", reformatted, None),
            delete(&d, 2, "core/v1/configmaps/shop/gone.yaml"),
        ]);
        let plan = plan(b.entries(), &t, &context(500)).unwrap();
        assert!(plan.commits.is_empty());
        assert_eq!(plan.stats.noops, 2);
    }

    #[test]
    fn an_update_keeps_the_comments_and_key_order_a_person_gave_the_file() {
        let d = destination("clusters/prod", false);
        let path = "clusters/prod/core/v1/configmaps/shop/a.yaml";
        let commented = "# owned by team-a\nkind: ConfigMap\napiVersion: v1\nmetadata:\n  name: a\ndata:\n  k: v # the key\n";
        let marker = marker_for("uid-a");
        let t = tree(&[
            (path, commented),
            ("clusters/prod/.configbutler/owner.yaml", &marker),
            // Flux's ignore rules are there already (a folder the writer wrote to before).
            (
                "clusters/prod/.sourceignore",
                kustomize::render_sourceignore(),
            ),
        ]);
        let b = buffer(vec![upsert(
            &d,
            1,
            "core/v1/configmaps/shop/a.yaml",
            CM2,
            None,
        )]);
        let plan = plan(b.entries(), &t, &context(500)).unwrap();
        assert_eq!(plan.commits.len(), 1);
        let written = plan.commits[0].changes[0].content.as_deref().unwrap();
        assert_eq!(
            std::str::from_utf8(written).unwrap(),
            "# owned by team-a\nkind: ConfigMap\napiVersion: v1\nmetadata:\n  name: a\ndata:\n  k: w # the key\n"
        );
        assert_eq!(plan.stats.bytes, written.len());
        assert!(plan.edit_fallbacks.is_empty());

        // A file in the writer's own layout gets the new rendering as it is.
        let t = tree(&[
            (path, CM),
            ("clusters/prod/.configbutler/owner.yaml", &marker),
            // Flux's ignore rules are there already (a folder the writer wrote to before).
            (
                "clusters/prod/.sourceignore",
                kustomize::render_sourceignore(),
            ),
        ]);
        let plan = plan_of(&b, &t);
        assert_eq!(
            plan.commits[0].changes[0].content.as_deref(),
            Some(CM2.as_bytes())
        );
        assert!(plan.edit_fallbacks.is_empty());
    }

    fn plan_of(b: &Buffer, t: &MapTree) -> Plan {
        plan(b.entries(), t, &context(500)).unwrap()
    }

    #[test]
    fn a_commented_file_that_cannot_be_edited_is_rewritten_and_the_fallback_reported() {
        let d = destination("clusters/prod", false);
        let path = "clusters/prod/core/v1/configmaps/shop/a.yaml";
        let marker = marker_for("uid-a");
        // An anchor: editing could change what the alias shares.
        let anchored = "# shared\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: &n a\ndata:\n  k: v\n  n: *n\n";
        let t = tree(&[
            (path, anchored),
            ("clusters/prod/.configbutler/owner.yaml", &marker),
            // Flux's ignore rules are there already (a folder the writer wrote to before).
            (
                "clusters/prod/.sourceignore",
                kustomize::render_sourceignore(),
            ),
        ]);
        let b = buffer(vec![upsert(
            &d,
            1,
            "core/v1/configmaps/shop/a.yaml",
            CM2,
            None,
        )]);
        let plan = plan_of(&b, &t);
        assert_eq!(
            plan.commits[0].changes[0].content.as_deref(),
            Some(CM2.as_bytes())
        );
        assert_eq!(
            plan.edit_fallbacks,
            vec![EditFallback {
                path: path.into(),
                reason: "anchor_or_tag"
            }]
        );
    }

    #[test]
    fn one_commit_per_author_in_arrival_order() {
        let d = destination("c", false);
        let t = tree(&[("c/.configbutler/owner.yaml", &marker_for("uid-a"))]);
        let b = buffer(vec![
            upsert(
                &d,
                1,
                "core/v1/configmaps/ns/a.yaml",
                CM,
                Some("alice@example.com"),
            ),
            upsert(
                &d,
                2,
                "core/v1/configmaps/ns/b.yaml",
                CM,
                Some("system:serviceaccount:kube-system:deployer"),
            ),
            upsert(
                &d,
                3,
                "core/v1/configmaps/ns/c.yaml",
                CM,
                Some("alice@example.com"),
            ),
            upsert(&d, 4, "core/v1/configmaps/ns/d.yaml", CM, None),
        ]);
        let plan = plan(b.entries(), &t, &context(500)).unwrap();
        let authors: Vec<_> = plan
            .commits
            .iter()
            .map(|c| (c.author_email.as_str(), c.changes.len()))
            .collect();
        assert_eq!(
            authors,
            vec![
                ("alice@example.com", 3),
                (
                    "system-serviceaccount-kube-system-deployer@noreply.cluster.local",
                    1
                ),
                ("bot@example.com", 1)
            ]
        );
        assert!(plan.commits[0].message.starts_with("Sync 2 objects in c: 2 created\n\n[CREATE] core/v1/configmaps/ns/a\n[CREATE] core/v1/configmaps/ns/c\n"));
    }

    #[test]
    fn sweep_deletes_only_unseen_yaml_files_of_its_scope() {
        let d = destination("c", false);
        let t = tree(&[
            ("c/.configbutler/owner.yaml", &marker_for("uid-a")),
            ("c/apps/v1/deployments/shop/kept.yaml", CM),
            ("c/apps/v1/deployments/shop/orphan.yaml", CM),
            ("c/apps/v1/deployments/other/orphan2.yaml", CM),
            ("c/apps/v1/deployments/shop/README.md", "notes"),
            ("c/apps/v1/deployments/shop/deep/x.yaml", CM),
            ("c/apps/v1/statefulsets/shop/other-scope.yaml", CM),
            ("elsewhere/apps/v1/deployments/shop/x.yaml", CM),
        ]);
        let b = buffer(vec![
            snapshot(&d, 1, "apps/v1/deployments", false, 7, true),
            upsert(&d, 2, "apps/v1/deployments/shop/kept.yaml", CM, None),
            upsert(&d, 3, "apps/v1/deployments/shop/new.yaml", CM, None),
            snapshot(&d, 4, "apps/v1/deployments", false, 7, false),
        ]);
        let plan = plan(b.entries(), &t, &context(500)).unwrap();
        let mut paths = changed_paths(&plan);
        paths.sort();
        assert_eq!(
            paths,
            vec![
                ("c/apps/v1/deployments/other/orphan2.yaml".into(), false),
                ("c/apps/v1/deployments/shop/new.yaml".into(), true),
                ("c/apps/v1/deployments/shop/orphan.yaml".into(), false),
            ]
        );
        assert_eq!(plan.stats.orphans_deleted, 2);
        assert_eq!(plan.sweep_deletions, vec![(3, 2)], "the sweep is entry 3");
        assert!(
            plan.commits
                .iter()
                .any(|c| c.message.contains("(orphan: no longer in the cluster)"))
        );
    }

    /// The same tree and messages under each prune mode: a delete of `gone.yaml`, and a complete snapshot of the
    /// scope that re-sent only `kept.yaml` (so `orphan.yaml` is an orphan).
    fn paths_deleted_under(prune: Prune) -> Vec<String> {
        let mut d = destination("c", false);
        d.prune = prune;
        let t = tree(&[
            ("c/.configbutler/owner.yaml", &marker_for("uid-a")),
            ("c/core/v1/configmaps/shop/kept.yaml", CM),
            ("c/core/v1/configmaps/shop/orphan.yaml", CM),
            ("c/core/v1/configmaps/shop/gone.yaml", CM),
        ]);
        let mut b = Buffer::default();
        let now = Instant::now();
        for change in [
            delete(&d, 1, "core/v1/configmaps/shop/gone.yaml"),
            snapshot(&d, 2, "core/v1/configmaps", false, 3, true),
            upsert(&d, 3, "core/v1/configmaps/shop/kept.yaml", CM, None),
            snapshot(&d, 4, "core/v1/configmaps", false, 3, false),
        ] {
            assert_eq!(b.push(change, now), Accepted::Buffered, "{prune:?}");
        }
        // A mismatched end is still refused whatever the mode.
        assert!(matches!(
            b.push(snapshot(&d, 5, "core/v1/configmaps", false, 9, false), now),
            Accepted::SnapshotMismatch(_)
        ));
        let plan = plan(b.entries(), &t, &context(500)).unwrap();
        let mut deleted: Vec<String> = changed_paths(&plan)
            .into_iter()
            .filter(|(_, written)| !written)
            .map(|(path, _)| path)
            .collect();
        deleted.sort();
        deleted
    }

    #[test]
    fn prune_modes_choose_which_deletions_happen() {
        assert_eq!(
            paths_deleted_under(Prune::OnSnapshot),
            vec![
                "c/core/v1/configmaps/shop/gone.yaml",
                "c/core/v1/configmaps/shop/orphan.yaml"
            ]
        );
        assert_eq!(
            paths_deleted_under(Prune::OnDelete),
            vec!["c/core/v1/configmaps/shop/gone.yaml"]
        );
        assert!(paths_deleted_under(Prune::Never).is_empty());
    }

    #[test]
    fn sweep_respects_the_cap_and_zero_disables_it() {
        let d = destination("c", false);
        let files: Vec<(String, String)> = (0..10)
            .map(|i| (format!("c/core/v1/configmaps/ns/o{i}.yaml"), CM.to_owned()))
            .collect();
        let mut entries: Vec<(&str, &str)> = files
            .iter()
            .map(|(p, c)| (p.as_str(), c.as_str()))
            .collect();
        let marker = marker_for("uid-a");
        entries.push(("c/.configbutler/owner.yaml", &marker));
        let t = tree(&entries);
        let b = buffer(vec![
            snapshot(&d, 1, "core/v1/configmaps/ns", true, 1, true),
            snapshot(&d, 2, "core/v1/configmaps/ns", true, 1, false),
        ]);
        let capped = plan(b.entries(), &t, &context(3)).unwrap();
        assert_eq!(capped.stats.deleted, 3);
        let deleted: Vec<_> = changed_paths(&capped).into_iter().map(|(p, _)| p).collect();
        assert_eq!(
            deleted,
            vec![
                "c/core/v1/configmaps/ns/o0.yaml",
                "c/core/v1/configmaps/ns/o1.yaml",
                "c/core/v1/configmaps/ns/o2.yaml"
            ]
        );
        let disabled = plan(b.entries(), &t, &context(0)).unwrap();
        assert!(disabled.commits.is_empty());
        // The truncation is reported with what is left; a sweep under the cap completes.
        assert_eq!(capped.truncated_sweeps, vec![(1, 7)]);
        assert!(capped.completed_sweeps.is_empty());
        let complete = plan(b.entries(), &t, &context(10)).unwrap();
        assert!(complete.truncated_sweeps.is_empty());
        assert_eq!(complete.completed_sweeps, vec![1]);
    }

    fn refused(plan: &Plan) -> Vec<usize> {
        plan.path_conflicts.iter().map(|(i, _)| *i).collect()
    }

    #[test]
    fn a_file_under_a_pending_file_is_refused_alone() {
        let d = destination("c", false);
        let b = buffer(vec![
            upsert(&d, 1, "a/x.yaml", CM, None),
            upsert(&d, 2, "a/x.yaml/y.yaml", CM, None),
            upsert(&d, 3, "a/z.yaml", CM, None),
        ]);
        let p = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
        assert_eq!(refused(&p), vec![1]);
        assert!(p.path_conflicts[0].1.contains("a/x.yaml/y.yaml"));
        let written: Vec<_> = changed_paths(&p).into_iter().map(|(p, _)| p).collect();
        assert_eq!(
            written,
            vec!["c/.configbutler/owner.yaml", "c/a/x.yaml", "c/a/z.yaml"]
        );
    }

    #[test]
    fn a_file_where_a_pending_folder_is_is_refused_alone() {
        let d = destination("c", false);
        let b = buffer(vec![
            upsert(&d, 1, "a/x.yaml/y.yaml", CM, None),
            upsert(&d, 2, "a/x.yaml", CM, None),
        ]);
        let p = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
        assert_eq!(refused(&p), vec![1]);
        assert_eq!(p.stats.written, 1);
    }

    #[test]
    fn conflicts_with_the_tree_are_refused_and_deletions_resolve_them() {
        let d = destination("c", false);
        let marker = marker_for("uid-a");
        // A person pushed a/x.yaml as a folder; another client owns a file b/f.yaml.
        let t = tree(&[
            ("c/.configbutler/owner.yaml", &marker),
            ("c/a/x.yaml/human.yaml", CM),
            ("c/b/f.yaml", CM),
        ]);
        let b = buffer(vec![
            upsert(&d, 1, "a/x.yaml", CM, None),
            upsert(&d, 2, "b/f.yaml/g.yaml", CM, None),
            upsert(&d, 3, "ok.yaml", CM, None),
        ]);
        let p = plan(b.entries(), &t, &context(500)).unwrap();
        assert_eq!(refused(&p), vec![0, 1]);
        for (_, message) in &p.path_conflicts {
            assert!(!message.contains("human.yaml") && !message.contains("b/f.yaml "));
        }
        assert_eq!(changed_paths(&p), vec![("c/ok.yaml".to_owned(), true)]);
        // A deletion in the same batch does not make room (its commit may come after the write's): refused too.
        let b = buffer(vec![
            delete(&d, 1, "b/f.yaml"),
            upsert(&d, 2, "b/f.yaml/g.yaml", CM, Some("alice")),
        ]);
        let p = plan(b.entries(), &t, &context(500)).unwrap();
        assert_eq!(refused(&p), vec![1]);
        assert_eq!(changed_paths(&p), vec![("c/b/f.yaml".to_owned(), false)]);
    }

    #[test]
    fn clients_sharing_a_branch_do_not_hold_each_other_back() {
        let a = destination_for("uid-a", "c", false);
        let b_dest = destination_for("uid-b", "c", false);
        let b = buffer(vec![
            upsert(&a, 1, "a/x.yaml", CM, None),
            upsert(&b_dest, 1, "a/x.yaml/y.yaml", CM, None),
            upsert(&b_dest, 2, "b.yaml", CM, None),
        ]);
        let p = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
        assert_eq!(refused(&p), vec![1]);
        assert!(!p.path_conflicts[0].1.contains("a/x.yaml:"));
        assert_eq!(p.stats.written, 2);
    }

    #[test]
    fn snapshot_spanning_earlier_flushes_keeps_what_it_saw() {
        // Objects upserted (and pushed) earlier in the same epoch are in the tree, not the buffer: still kept.
        let d = destination("c", false);
        let mut b = buffer(vec![
            snapshot(&d, 1, "core/v1/configmaps", false, 1, true),
            upsert(&d, 2, "core/v1/configmaps/ns/early.yaml", CM, None),
        ]);
        b.take();
        b.push(
            snapshot(&d, 3, "core/v1/configmaps", false, 1, false),
            Instant::now(),
        );
        let t = tree(&[
            ("c/.configbutler/owner.yaml", &marker_for("uid-a")),
            ("c/core/v1/configmaps/ns/early.yaml", CM),
            ("c/core/v1/configmaps/ns/stale.yaml", CM),
        ]);
        let plan = plan(b.entries(), &t, &context(500)).unwrap();
        assert_eq!(
            changed_paths(&plan),
            vec![("c/core/v1/configmaps/ns/stale.yaml".into(), false)]
        );
    }

    #[test]
    fn snapshot_end_without_begin_is_refused() {
        let d = destination("c", false);
        let mut b = Buffer::default();
        let result = b.push(
            snapshot(&d, 1, "core/v1/configmaps", false, 1, false),
            Instant::now(),
        );
        assert!(matches!(result, Accepted::SnapshotMismatch(_)));
        b.push(
            snapshot(&d, 2, "core/v1/configmaps", false, 1, true),
            Instant::now(),
        );
        let result = b.push(
            snapshot(&d, 3, "core/v1/configmaps", false, 2, false),
            Instant::now(),
        );
        assert!(
            matches!(result, Accepted::SnapshotMismatch(_)),
            "other epoch"
        );
        assert_eq!(b.len(), 1, "only the begin is buffered");
    }

    #[test]
    fn foreign_marker_refuses_writes_in_exclusive_mode_and_warns_otherwise() {
        let t = tree(&[("c/.configbutler/owner.yaml", &marker_for("uid-other"))]);
        let exclusive = destination("c", true);
        let b = buffer(vec![upsert(
            &exclusive,
            1,
            "core/v1/configmaps/ns/a.yaml",
            CM,
            None,
        )]);
        let refused = plan(b.entries(), &t, &context(500)).unwrap();
        assert!(refused.commits.is_empty());
        assert_eq!(refused.refused_entries, vec![0]);
        assert_eq!(refused.marker_conflicts.len(), 1);
        assert!(
            refused.marker_conflicts[0]
                .found_owner
                .contains("uid-other")
        );

        let shared = destination("c", false);
        let b = buffer(vec![upsert(
            &shared,
            1,
            "core/v1/configmaps/ns/a.yaml",
            CM,
            None,
        )]);
        let warned = plan(b.entries(), &t, &context(500)).unwrap();
        assert_eq!(
            changed_paths(&warned),
            vec![("c/core/v1/configmaps/ns/a.yaml".into(), true)]
        );
        assert_eq!(warned.marker_conflicts.len(), 1);
        assert!(warned.refused_entries.is_empty());
    }

    #[test]
    fn two_clusters_on_one_branch_commit_separately_with_their_trailers() {
        let a = destination_for("uid-a", "clusters/a", false);
        let b_dest = destination_for("uid-b", "clusters/b", false);
        let b = buffer(vec![
            upsert(&a, 1, "core/v1/configmaps/ns/x.yaml", CM, None),
            upsert(&b_dest, 1, "core/v1/configmaps/ns/x.yaml", CM, None),
        ]);
        let plan = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
        assert_eq!(plan.commits.len(), 2);
        assert!(plan.commits[0].message.contains("ClusterUID: uid-a"));
        assert!(plan.commits[1].message.contains("ClusterUID: uid-b"));
    }

    #[test]
    fn flush_is_due_on_any_cap() {
        let limits = Limits {
            max_files: 2,
            max_bytes: 1000,
            max_wait: Duration::from_secs(20),
        };
        let d = destination("c", false);
        let start = Instant::now();
        let mut b = Buffer::default();
        assert!(!b.flush_due(&limits, start), "empty buffer never flushes");
        b.push(
            upsert(&d, 1, "core/v1/configmaps/ns/a.yaml", CM, None),
            start,
        );
        b.push(
            upsert(&d, 2, "core/v1/configmaps/ns/a.yaml", CM2, None),
            start,
        );
        assert!(!b.flush_due(&limits, start), "same path counts once");
        assert!(
            b.flush_due(&limits, start + Duration::from_secs(20)),
            "time cap"
        );
        b.push(
            upsert(&d, 3, "core/v1/configmaps/ns/b.yaml", CM, None),
            start,
        );
        assert!(b.flush_due(&limits, start), "file cap");
        let mut big = Buffer::default();
        big.push(
            upsert(
                &d,
                1,
                "core/v1/configmaps/ns/a.yaml",
                &"x: 1\n".repeat(300),
                None,
            ),
            start,
        );
        assert!(big.flush_due(&limits, start), "byte cap");
    }

    #[test]
    fn author_identities_are_safe_and_deterministic() {
        assert_eq!(
            author_identity("alice@example.com"),
            ("alice@example.com".into(), "alice@example.com".into())
        );
        assert_eq!(
            author_identity("bob"),
            ("bob".into(), "bob@noreply.cluster.local".into())
        );
        assert_eq!(
            author_identity("Eve <evil@x.com>\nInjected: yes"),
            (
                "Eve evil@x.comInjected: yes".into(),
                "eve-evil-x.cominjected--yes@noreply.cluster.local".into()
            )
        );
        assert_eq!(author_identity(":::").1, "unknown@noreply.cluster.local");
    }

    fn templated(base: &str, subject: &str, body: &str) -> DestinationRef {
        let mut d = destination(base, false);
        d.commit_template = Some(Arc::new(
            template::CommitTemplate::parse(subject, body).unwrap(),
        ));
        d
    }

    fn upsert_of(
        d: &DestinationRef,
        seq: u64,
        ns: &str,
        name: &str,
        author: Option<&str>,
    ) -> Change {
        let mut change = upsert(
            d,
            seq,
            &format!("core/v1/configmaps/{ns}/{name}.yaml"),
            &CM.replace("name: a", &format!("name: {name}")),
            author,
        );
        if let Operation::Upsert { object, .. } = &mut change.operation {
            *object = ObjectId {
                group: String::new(),
                version: "v1".into(),
                resource: "configmaps".into(),
                namespace: ns.into(),
                name: name.into(),
            };
        }
        change
    }

    const TRAILERS: &str = "X-ConfigButler-ClusterUID: uid-a\nX-ConfigButler-ControllerNS: gitops\nX-ConfigButler-ControllerName: reverser\nX-ConfigButler-InstanceID: agent-0";

    #[test]
    fn a_template_writes_subject_and_body_and_keeps_the_trailers() {
        let d = templated(
            "clusters/prod",
            "{operation}({kind}): {namespace}/{name}",
            "Changed by {author} ({count} object(s): {summary})\n\n{objects}",
        );
        let t = tree(&[(
            "clusters/prod/.configbutler/owner.yaml",
            &marker_for("uid-a"),
        )]);
        let b = buffer(vec![upsert_of(
            &d,
            1,
            "shop",
            "settings",
            Some("alice@example.com"),
        )]);
        let plan = plan(b.entries(), &t, &context(500)).unwrap();
        assert_eq!(
            plan.commits[0].message,
            format!(
                "create(ConfigMap): shop/settings\n\nChanged by alice@example.com (1 object(s): 1 created)\n\n\
                 [CREATE] core/v1/configmaps/shop/settings\n\n{TRAILERS}\n"
            )
        );
    }

    #[test]
    fn a_template_over_several_objects_names_what_they_share() {
        let d = templated(
            "c",
            "{operation} {count} {kind} in {namespace} ({name}) by {author}",
            "",
        );
        let t = tree(&[
            ("c/.configbutler/owner.yaml", &marker_for("uid-a")),
            ("c/core/v1/configmaps/shop/old.yaml", CM),
        ]);
        let b = buffer(vec![
            upsert_of(&d, 1, "shop", "a", None),
            upsert_of(&d, 2, "shop", "b", None),
        ]);
        let planned = plan(b.entries(), &t, &context(500)).unwrap();
        assert_eq!(
            planned.commits[0].message,
            format!("create 2 ConfigMap in shop (various) by Bot\n\n{TRAILERS}\n")
        );
        // A deletion's kind comes from the file it removes; mixed operations read "sync".
        let b = buffer(vec![
            upsert_of(&d, 1, "shop", "a", None),
            delete(&d, 2, "core/v1/configmaps/shop/old.yaml"),
        ]);
        let plan = plan(b.entries(), &t, &context(500)).unwrap();
        assert_eq!(
            plan.commits[0].message,
            format!("sync 2 ConfigMap in shop (various) by Bot\n\n{TRAILERS}\n")
        );
    }

    #[test]
    fn a_template_names_orphans_by_their_path() {
        let d = templated(
            "c",
            "{operation} {group}/{version} {resource} {namespace}/{name}",
            "{objects}",
        );
        let t = tree(&[
            ("c/.configbutler/owner.yaml", &marker_for("uid-a")),
            ("c/apps/v1/deployments/shop/orphan.yaml", CM),
        ]);
        let b = buffer(vec![
            snapshot(&d, 1, "apps/v1/deployments", false, 7, true),
            snapshot(&d, 2, "apps/v1/deployments", false, 7, false),
        ]);
        let plan = plan(b.entries(), &t, &context(500)).unwrap();
        assert_eq!(
            plan.commits[0].message,
            format!(
                "delete apps/v1 deployments shop/orphan\n\n\
                 [DELETE] apps/v1/deployments/shop/orphan (orphan: no longer in the cluster)\n\n{TRAILERS}\n"
            )
        );
    }

    #[test]
    fn destinations_with_different_templates_commit_separately() {
        let a = templated("a", "first {name}", "");
        let b_dest = templated("b", "second {name}", "");
        let plain = destination("p", false);
        let t = tree(&[
            ("a/.configbutler/owner.yaml", &marker_for("uid-a")),
            ("b/.configbutler/owner.yaml", &marker_for("uid-a")),
            ("p/.configbutler/owner.yaml", &marker_for("uid-a")),
        ]);
        let b = buffer(vec![
            upsert_of(&a, 1, "ns", "x", None),
            upsert_of(&b_dest, 2, "ns", "y", None),
            upsert_of(&plain, 3, "ns", "z", None),
        ]);
        let plan = plan(b.entries(), &t, &context(500)).unwrap();
        let subjects: Vec<&str> = plan
            .commits
            .iter()
            .map(|c| c.message.lines().next().unwrap())
            .collect();
        assert_eq!(
            subjects,
            ["first x", "second y", "[CREATE] core/v1/configmaps/ns/z"]
        );
        assert!(
            plan.commits
                .iter()
                .all(|c| c.message.ends_with(&format!("{TRAILERS}\n")))
        );
    }

    fn flush(d: &DestinationRef, seq: u64, author: Option<&str>, message: Option<&str>) -> Change {
        Change {
            destination: d.clone(),
            sequence: seq,
            operation: Operation::Flush(Arc::new(FlushOrder {
                message: message.map(str::to_owned),
                author: author.map(str::to_owned),
                request_name: "ns/req".into(),
                request_uid: "uid-req".into(),
            })),
        }
    }

    #[test]
    fn a_flush_makes_its_destinations_earlier_changes_one_commit_by_the_requester() {
        let d = destination("c", false);
        let b = buffer(vec![
            upsert(&d, 1, "core/v1/configmaps/ns/a.yaml", CM, Some("bob")),
            upsert(&d, 2, "core/v1/configmaps/ns/b.yaml", CM2, Some("carol")),
            flush(&d, 3, Some("alice"), Some("Release\n\nBody")),
            upsert(&d, 4, "core/v1/configmaps/ns/c.yaml", CM, Some("bob")),
        ]);
        assert!(b.flush_requested());
        assert!(b.flush_due(
            &Limits {
                max_files: 100,
                max_bytes: 1 << 20,
                max_wait: Duration::from_secs(3600)
            },
            Instant::now()
        ));
        let plan = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
        assert_eq!(plan.commits.len(), 2, "{:?}", plan.commits);
        let requested = &plan.commits[0];
        assert_eq!(requested.flush, Some(2));
        assert_eq!(requested.author_name, "alice");
        assert!(
            requested
                .message
                .starts_with("Release\n\nBody\n\nX-ConfigButler-ClusterUID: "),
            "{}",
            requested.message
        );
        assert!(
            requested
                .message
                .ends_with("X-ConfigButler-CommitRequest: ns/req\n"),
            "{}",
            requested.message
        );
        let paths: Vec<&str> = requested.changes.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "c/.configbutler/owner.yaml",
                "c/.sourceignore",
                "c/core/v1/configmaps/ns/a.yaml",
                "c/core/v1/configmaps/ns/b.yaml"
            ]
        );
        // A change after the request is not part of it.
        assert_eq!(plan.commits[1].flush, None);
        assert_eq!(plan.commits[1].author_name, "bob");
        assert_eq!(plan.commits[1].changes.len(), 1);
        // Nothing pending before a request: no commit answers it.
        let only = buffer(vec![flush(&d, 5, Some("alice"), None)]);
        assert!(plan_of(&only, &tree(&[])).commits.is_empty());
    }
}
