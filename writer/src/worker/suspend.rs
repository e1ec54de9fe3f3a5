//! Suspended destinations (`Destination.suspend`, GitDestination `spec.suspend`).
//!
//! A suspended destination's changes go into a buffer of its own ([`Held`]) instead of the worker's: validated,
//! snapshot epochs tracked and sweeps formed as usual, but never committed. Now and then (the batch interval, or
//! at once on an explicit flush) the worker plans that buffer against the branch tip exactly as a flush would and
//! sends the destination's agent a [`SuspendPreview`]. Un-suspending appends the held entries to the worker's
//! buffer and flushes at once, so the commit writes what the last preview showed (plus what changed since).
//!
//! Bounds: the held buffer is compacted before every preview ([`Buffer::compact`]: the last change per path, the
//! last sweep per scope), so it grows with the destination's paths, not with time. Held changes are acked once
//! held (with an empty commit), so a suspended destination never fills an agent's unacked budget and holds
//! back no other destination. The price: they live in this process only. After a writer restart the agent
//! re-lists everything (it does after every reconnect), which rebuilds the held buffer; a deletion held before the
//! restart is then found again by the snapshot sweep (prune `OnSnapshot`), but not with prune `OnDelete`.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{SecondsFormat, Utc};
use tracing::{info, warn};

use reverser_common::reasons::RejectReason;

use super::{CommitTree, PushWhen, Worker, network_deadline, watchdog};
use crate::{
    batch::{self, Accepted, Buffer, PlanContext, TreeView},
    git::GitError,
    model::{Change, DestinationId, DestinationRef, Origin},
    reply::{Reply, SuspendPreview},
};

/// Paths of each kind (added, changed, deleted) a preview lists; the counts cover all of them.
pub const PREVIEW_PATHS_CAP: usize = 50;
/// A preview waits while more changes are queued (a relist streaming in), but not longer than this.
const PREVIEW_MAX_DEFER: Duration = Duration::from_secs(30);
/// After a preview that took `t`, the next one of the destination waits at least `t` times this: planning a large
/// held buffer over and over would otherwise cost more than receiving it.
const PREVIEW_COST_SPACING: u32 = 4;

/// The held changes of one suspended destination.
pub(super) struct Held {
    /// The latest declaration (where previews go).
    destination: DestinationRef,
    buffer: Buffer,
    /// Highest held sequence per stream (session id), and the highest acked per stream.
    highest: BTreeMap<u64, (u64, Arc<Origin>)>,
    acked: BTreeMap<u64, u64>,
    /// A preview is owed since then (changes arrived, or the suspension began).
    owed_since: Option<Instant>,
    /// No preview before then (see [`PREVIEW_COST_SPACING`]).
    not_before: Option<Instant>,
}

impl Worker {
    /// A declaration said whether `destination` is suspended. Suspending moves its buffered changes aside;
    /// resuming hands the held ones to the next flush, which runs now.
    pub(super) async fn set_suspended(&mut self, destination: DestinationRef, suspend: bool) {
        let id = destination.id.clone();
        match (suspend, self.held.contains_key(&id)) {
            (true, true) => {
                if let Some(held) = self.held.get_mut(&id) {
                    held.destination = destination;
                }
            }
            (true, false) => {
                let buffer = self.buffer.split_destination(&id);
                info!(worker = %self.id, destination = %id, moved = buffer.len(), "destination suspended: holding its changes");
                let mut held = Held {
                    destination,
                    buffer: Buffer::default(),
                    highest: BTreeMap::new(),
                    acked: BTreeMap::new(),
                    not_before: None,
                    // The first preview goes out at once.
                    owed_since: Some(
                        Instant::now()
                            .checked_sub(self.settings.limits.max_wait)
                            .unwrap_or_else(Instant::now),
                    ),
                };
                for entry in buffer.entries() {
                    held.note(entry.destination.origin.clone(), entry.sequence);
                }
                held.buffer = buffer;
                self.held.insert(id, held);
            }
            (false, true) => {
                let Some(mut held) = self.held.remove(&id) else {
                    return;
                };
                held.buffer.compact();
                info!(worker = %self.id, destination = %id, held = held.buffer.len(), "destination resumed: flushing its held changes");
                self.buffer.absorb(held.buffer, Instant::now());
                self.flush_now(None, PushWhen::Now).await;
            }
            (false, false) => {}
        }
    }

    /// Takes `change` into its destination's held buffer when that is suspended; otherwise gives it back.
    pub(super) fn hold(&mut self, change: Change) -> Option<Change> {
        let Some(held) = self.held.get_mut(&change.destination.id) else {
            return Some(change);
        };
        let (origin, sequence) = (change.destination.origin.clone(), change.sequence);
        let destination = change.destination.clone();
        if let Accepted::SnapshotMismatch(message) = held.buffer.push(change, Instant::now()) {
            warn!(worker = %self.id, destination = %destination.id, sequence, %message, "snapshot mismatch");
            self.metrics
                .messages_rejected
                .with_label_values(&[RejectReason::SnapshotMismatch.as_str()])
                .inc();
            destination.origin.reject(
                &destination.id.key,
                sequence,
                RejectReason::SnapshotMismatch,
                message,
            );
            return None;
        }
        held.note(origin, sequence);
        held.destination = destination;
        held.owed_since.get_or_insert_with(Instant::now);
        None
    }

    /// Acks what the suspended destinations hold (see the module notes). Not while a committed, unpushed batch
    /// still carries changes of the destination: an ack covers every earlier sequence.
    pub(super) fn ack_held(&mut self) {
        for (id, held) in &mut self.held {
            let in_flight = self
                .unpushed
                .iter()
                .any(|c| c.entries.iter().any(|e| e.destination.id == *id));
            if in_flight {
                continue;
            }
            for (session, (sequence, origin)) in &held.highest {
                let acked = held.acked.entry(*session).or_default();
                if *acked >= *sequence {
                    continue;
                }
                *acked = *sequence;
                held.destination
                    .acked
                    .fetch_max(*sequence, std::sync::atomic::Ordering::Relaxed);
                origin.send(Reply::Ack {
                    destination: id.key.clone(),
                    sequence: *sequence,
                    commit_sha: String::new(),
                });
            }
        }
    }

    /// When the next preview is owed: the batch interval after the first change since the last one, and not
    /// before the cost spacing allows.
    pub(super) fn preview_deadline(&self) -> Option<Instant> {
        self.held.values().filter_map(|h| self.owed_at(h)).min()
    }

    fn owed_at(&self, held: &Held) -> Option<Instant> {
        let owed = held.owed_since? + self.settings.limits.max_wait;
        Some(held.not_before.map_or(owed, |t| t.max(owed)))
    }

    /// Whether a preview should be made now: one is owed, and the queue is empty (or it waited long enough).
    pub(super) fn preview_due(&self, now: Instant, queue_empty: bool) -> bool {
        self.held.values().any(|h| {
            self.owed_at(h).is_some_and(|t| t <= now)
                && (queue_empty || h.owed_since.is_some_and(|t| t + PREVIEW_MAX_DEFER <= now))
        })
    }

    /// Plans the held buffers whose preview is owed (every one with `force`) against the branch tip and sends
    /// the previews. Nothing is committed.
    pub(super) async fn preview_held(&mut self, force: bool) {
        let now = Instant::now();
        let due: Vec<DestinationId> = self
            .held
            .iter()
            .filter(|(_, h)| {
                h.owed_since.is_some() && (force || self.owed_at(h).is_some_and(|t| t <= now))
            })
            .map(|(id, _)| id.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        let mut jobs = Vec::with_capacity(due.len());
        for id in &due {
            if let Some(held) = self.held.get_mut(id) {
                held.buffer.compact();
                jobs.push((
                    held.destination.clone(),
                    Arc::new(held.buffer.entries().to_vec()),
                ));
            }
        }
        if self.clone.is_none() && self.open().await.is_err() {
            self.postpone_previews(&due, now);
            return;
        }
        let Some(mut clone) = self.clone.take() else {
            self.postpone_previews(&due, now);
            return;
        };
        // A fetch moves the base: only when nothing is held on top of the old one (as a flush decides).
        let refetch = self.unpushed.is_empty()
            && self
                .last_fetch
                .is_none_or(|t| t.elapsed() >= self.settings.refetch_after);
        let context = PlanContext {
            bot_name: self.settings.bot_name.clone(),
            bot_email: self.settings.bot_email.clone(),
            deletes_cap: self.settings.deletes_cap,
            now_rfc3339: Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
        };
        let planning = Instant::now();
        let ran = watchdog::run(network_deadline(), &self.abandoned, move |watch| {
            let fetched = if refetch {
                watch.network(|| clone.fetch()).map(|_| true)
            } else {
                Ok(false)
            };
            let base = clone.base();
            let tree = CommitTree {
                clone: &clone,
                commit: base,
            };
            let previews: Vec<(DestinationRef, Result<SuspendPreview, GitError>)> = jobs
                .into_iter()
                .map(|(destination, entries)| {
                    let preview = batch::plan(&entries, &tree, &context).and_then(|plan| {
                        preview_of(&destination.id.key, &plan, &tree, base, entries.len())
                    });
                    (destination, preview)
                })
                .collect();
            (clone, fetched, previews)
        })
        .await;
        let Some((clone, fetched, previews)) = ran else {
            self.clone = None;
            let _ = self.abandoned_error();
            self.postpone_previews(&due, now);
            return;
        };
        self.clone = Some(clone);
        let not_before = Instant::now() + planning.elapsed() * PREVIEW_COST_SPACING;
        for id in &due {
            if let Some(held) = self.held.get_mut(id) {
                held.not_before = Some(not_before);
            }
        }
        match fetched {
            Ok(true) => self.last_fetch = Some(Instant::now()),
            Ok(false) => {}
            // The preview is made against the tip already fetched; the failure shows at the next push.
            Err(error) => {
                warn!(worker = %self.id, %error, "fetch before a suspend preview failed; previewing against the last tip")
            }
        }
        for (destination, preview) in previews {
            match preview {
                Ok(preview) => {
                    info!(worker = %self.id, destination = %destination.id, added = preview.added,
                        changed = preview.changed, deleted = preview.deleted, base = %preview.base_commit,
                        "suspend preview");
                    if let Some(held) = self.held.get_mut(&destination.id) {
                        held.owed_since = None;
                        held.destination.suspend_preview(preview);
                    }
                }
                Err(error) => {
                    warn!(worker = %self.id, destination = %destination.id, %error, "suspend preview failed; will retry");
                    if let Some(held) = self.held.get_mut(&destination.id) {
                        held.owed_since = Some(now);
                    }
                }
            }
        }
    }

    /// The previews of `due` failed before planning: try again after the batch interval.
    fn postpone_previews(&mut self, due: &[DestinationId], now: Instant) {
        for id in due {
            if let Some(held) = self.held.get_mut(id) {
                held.owed_since = Some(now);
            }
        }
    }

    /// A destination moved to another worker: what it held here is dropped (never written; its agent re-sends
    /// it to the new place with its next relist).
    pub(super) fn forget_held(&mut self, id: &DestinationId) {
        if let Some(held) = self.held.remove(id) {
            warn!(worker = %self.id, destination = %id, dropped = held.buffer.len(), "suspended destination moved away; dropped its held changes");
        }
    }
}

impl Held {
    fn note(&mut self, origin: Arc<Origin>, sequence: u64) {
        let slot = self
            .highest
            .entry(origin.session_id)
            .or_insert((0, origin.clone()));
        if sequence > slot.0 {
            *slot = (sequence, origin);
        }
    }
}

/// What `plan` would change in `tree`: files added, changed and deleted (each path once, by its final state).
fn preview_of(
    key: &str,
    plan: &batch::Plan,
    tree: &dyn TreeView,
    base: Option<git2::Oid>,
    held: usize,
) -> Result<SuspendPreview, GitError> {
    let mut last: BTreeMap<&str, bool> = BTreeMap::new();
    for commit in &plan.commits {
        for change in &commit.changes {
            last.insert(change.path.as_str(), change.content.is_some());
        }
    }
    let mut preview = SuspendPreview {
        destination: key.to_owned(),
        paths_cap: PREVIEW_PATHS_CAP as u64,
        base_commit: base.map(|b| b.to_string()).unwrap_or_default(),
        held_messages: held as u64,
        ..Default::default()
    };
    for (path, written) in last {
        let exists = tree.read(path)?.is_some();
        let (count, paths) = match (written, exists) {
            (true, false) => (&mut preview.added, &mut preview.added_paths),
            (true, true) => (&mut preview.changed, &mut preview.changed_paths),
            (false, true) => (&mut preview.deleted, &mut preview.deleted_paths),
            // Removing a file that is not there changes nothing.
            (false, false) => continue,
        };
        *count += 1;
        if paths.len() < PREVIEW_PATHS_CAP {
            paths.push(path.to_owned());
        }
    }
    Ok(preview)
}
