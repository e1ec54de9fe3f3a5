//! Pure batching and commit planning for one (repository, branch) worker. Nothing here touches git or the
//! network (the branch tip is read through [`TreeView`]), so every rule is unit-tested on plain maps.
//!
//! The data flow, in the order a change meets it:
//!
//! 1. [`Buffer`] (`buffer`): the worker offers each change; the buffer keeps them in arrival order as [`Entry`]s,
//!    counts the caps ([`Limits`]) that make a flush due, and tracks snapshot epochs: every upsert between a
//!    `SnapshotBegin` and its `SnapshotEnd` is remembered, and the end becomes a sweep entry that deletes the
//!    scope's files nobody re-sent (orphans). A CommitRequest becomes a flush entry.
//! 2. [`plan()`] (`plan`) replays the entries over the branch tip, one named phase after the other:
//!    - `replay`: the latest content per path wins; sweeps find their orphans in the tree as the earlier entries
//!      leave it;
//!    - `refuse`: writes refused alone (file/folder clashes, kustomization file names, namespace clashes);
//!    - `effective_changes`: semantic no-ops dropped, updates edited into the file in place (comments kept);
//!    - `check_markers` (`marker`): ownership markers created, or compared (exclusive destinations refused);
//!    - `sops_configs`, `sourceignores`: the files the writer keeps beside the objects;
//!    - `kustomizations` ([`kustomize`]): files listed in and unlisted from kustomizations;
//!    - `group`: one commit per author, installation and message template, a CommitRequest's changes in a commit
//!      of their own, messages from [`template`]s.
//! 3. The worker builds the [`Plan`]'s commits with git; when git refuses a batch, [`quarantine`] finds the
//!    entries to refuse by planning halves of it.

pub mod kustomize;
pub mod quarantine;
pub mod template;

mod buffer;
mod group;
mod marker;
mod outcome;
mod plan;
mod refuse;

pub use buffer::{Accepted, Buffer, Entry, EntryOp, Limits};
pub use group::author_identity;
pub use marker::{marker_mismatch, render_marker};
pub use outcome::{EditFallback, MarkerConflict, Plan, PlanStats, PlannedCommit};
pub use plan::{PlanContext, TreeView, Verb, plan};

#[cfg(test)]
mod tests;
