//! What a [`super::plan()`] says: the commits to build and everything refused, checked or counted on the way.

use crate::{
    git::FileChange,
    model::{DestinationId, DestinationRef},
};

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
    /// order) that could not be kept (see `content_over` in the plan module).
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
