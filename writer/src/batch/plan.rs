//! [`plan`]: the phases that turn a batch of entries into commits over the branch tip ([`TreeView`]), each a
//! function of its own; the driver reads as their list. Commit grouping is in `group`, the refusals in `refuse`.

use std::collections::{BTreeMap, HashMap, HashSet};

use reverser_common::{paths, sops, yaml, yaml_edit};

use crate::{
    git::{FileChange, GitError},
    model::{Bytes, DestinationId, DestinationRef, KustomizationMode},
};

use super::{
    EditFallback, Entry, EntryOp, MarkerConflict, Plan, PlanStats, group, kustomize,
    marker::{marker_mismatch, render_marker},
    refuse::{refuse_kustomization_names, refuse_namespace_clashes, refuse_path_conflicts},
    template,
};

/// Read access to the tree a plan is made against (the branch tip).
pub trait TreeView {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, GitError>;
    /// Every file under `folder`, recursively, as full repository paths.
    fn list(&self, folder: &str) -> Result<Vec<String>, GitError>;
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
    pub(super) fn tag(&self) -> &'static str {
        match self {
            Verb::Create => "[CREATE]",
            Verb::Update => "[UPDATE]",
            Verb::Delete => "[DELETE]",
        }
    }
}

/// The last word about one path within the buffer.
#[derive(Debug)]
pub(super) struct Slot<'a> {
    pub(super) content: Option<&'a Bytes>,
    pub(super) fingerprint: Option<&'a str>,
    /// The index of the entry that decided it.
    pub(super) entry: usize,
    pub(super) author: Option<&'a str>,
    /// Deleted by a sweep (no longer in the cluster).
    pub(super) orphan: bool,
}

/// Replays `entries` over `tree` and plans the commits that bring the tree to the result.
pub fn plan(entries: &[Entry], tree: &dyn TreeView, ctx: &PlanContext) -> Result<Plan, GitError> {
    // 1. The latest content per path, and the orphans of the sweeps.
    let Replayed {
        mut slots,
        truncated_sweeps,
        completed_sweeps,
    } = replay(entries, tree, ctx.deletes_cap)?;
    // 1b. Writes refused alone: a file that would be a folder (or the other way round; the earlier write or the
    // tree wins), a kustomization's file name, one object name in two namespaces of a destination without them.
    let mut path_conflicts = refuse_path_conflicts(&mut slots, entries, tree)?;
    path_conflicts.extend(refuse_kustomization_names(&mut slots, entries));
    let namespace_clashes = refuse_namespace_clashes(&mut slots, entries, tree)?;
    // 2. What differs from the tree, updates edited in place.
    let Effects {
        mut effective,
        noops,
        edit_fallbacks,
    } = effective_changes(&slots, entries, tree)?;
    // 3. Ownership markers: an exclusive destination in someone else's folder is refused whole.
    let markers = check_markers(&effective, entries, tree, ctx)?;
    let refused_entries: Vec<usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| markers.refused.contains(&e.destination.id))
        .map(|(i, _)| i)
        .collect();
    effective.retain(|c| {
        !markers
            .refused
            .contains(&entries[c.slot.entry].destination.id)
    });
    // 4. The files the writer keeps beside the objects.
    let sops_configs = sops_configs(&effective, entries, tree)?;
    let sourceignores = sourceignores(&effective, entries, tree)?;
    // 5. Kustomizations.
    let kustomizations = kustomizations(&slots, entries, &markers.refused, tree)?;
    // 6. Commits.
    let grouped = group::commits(
        entries,
        &effective,
        group::Companions {
            markers: markers.created,
            sops_configs,
            sourceignores,
            kustomizations: kustomizations.edits,
        },
        ctx,
    );
    Ok(Plan {
        commits: grouped.commits,
        marker_conflicts: markers.conflicts,
        refused_entries,
        namespace_clashes,
        kustomization_problems: kustomizations.problems,
        kustomization_checked: kustomizations.checked,
        path_conflicts,
        truncated_sweeps,
        completed_sweeps,
        sweep_deletions: grouped.sweep_deletions.into_iter().collect(),
        edit_fallbacks,
        stats: PlanStats {
            noops,
            ..grouped.stats
        },
    })
}

/// The buffer replayed: the last word per path, and how the sweeps went.
struct Replayed<'a> {
    slots: BTreeMap<String, Slot<'a>>,
    /// Sweeps the delete cap stopped early: entry index and how many orphans are left.
    truncated_sweeps: Vec<(usize, usize)>,
    completed_sweeps: Vec<usize>,
}

/// Phase 1: the latest content per path, in arrival order; sweeps see the tree as the earlier entries left it
/// and delete at most `deletes_cap` orphans each (0: none).
fn replay<'a>(
    entries: &'a [Entry],
    tree: &dyn TreeView,
    deletes_cap: usize,
) -> Result<Replayed<'a>, GitError> {
    let mut slots: BTreeMap<String, Slot<'a>> = BTreeMap::new();
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
                if deletes_cap == 0 {
                    continue;
                }
                let Orphans { found, left } = orphans(
                    &slots,
                    tree,
                    Sweep {
                        folder,
                        namespace_given: *namespace_given,
                        keep,
                        base_folder,
                        keeps_kustomizations: entry.destination.placement.kustomization.is_on(),
                        cap: deletes_cap,
                    },
                )?;
                if left > 0 {
                    truncated_sweeps.push((index, left));
                } else {
                    completed_sweeps.push(index);
                }
                for path in found {
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
    Ok(Replayed {
        slots,
        truncated_sweeps,
        completed_sweeps,
    })
}

/// One sweep entry, as [`orphans`] reads it.
struct Sweep<'s> {
    folder: &'s str,
    namespace_given: bool,
    keep: &'s HashSet<String>,
    base_folder: &'s str,
    /// The destination keeps kustomizations: they are not orphans.
    keeps_kustomizations: bool,
    cap: usize,
}

/// The orphans a sweep deletes (at most its cap, in path order) and how many more it found.
struct Orphans {
    found: Vec<String>,
    left: usize,
}

/// The files of a sweep's scope that nobody re-sent, in the tree as the earlier entries (`slots`) leave it.
fn orphans(
    slots: &BTreeMap<String, Slot<'_>>,
    tree: &dyn TreeView,
    sweep: Sweep<'_>,
) -> Result<Orphans, GitError> {
    let Sweep {
        folder,
        namespace_given,
        keep,
        base_folder,
        keeps_kustomizations,
        cap,
    } = sweep;
    let scope_relative = folder
        .strip_prefix(base_folder)
        .and_then(|f| f.strip_prefix('/'))
        .unwrap_or("");
    let mut candidates: Vec<String> = Vec::new();
    let listed = tree.list(folder)?;
    let mut present: HashSet<String> = listed.into_iter().collect();
    for (path, slot) in slots {
        if path.starts_with(folder) {
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
            .strip_prefix(base_folder)
            .and_then(|p| p.strip_prefix('/'))
        else {
            continue;
        };
        if !paths::in_scope(scope_relative, namespace_given, relative)
            || keep.contains(path)
            || (keeps_kustomizations && kustomize::is_kustomization_file(path))
        {
            continue;
        }
        // Over the cap: count what is left (reported, deleted by a later sweep).
        if candidates.len() >= cap {
            left += 1;
        } else {
            candidates.push(path.clone());
        }
    }
    Ok(Orphans {
        found: candidates,
        left,
    })
}

/// One path whose result differs from the tree.
pub(super) struct Effective<'a> {
    pub(super) path: &'a str,
    pub(super) slot: &'a Slot<'a>,
    pub(super) verb: Verb,
    /// The object's `kind`, read only for destinations whose message template uses it.
    pub(super) kind: Option<String>,
    /// An update edited into the file in the tree (its comments and layout kept), written instead of the slot's
    /// content.
    pub(super) edited: Option<Vec<u8>>,
}

/// What [`effective_changes`] found.
struct Effects<'a> {
    effective: Vec<Effective<'a>>,
    noops: usize,
    edit_fallbacks: Vec<EditFallback>,
}

/// Phase 2: the effective changes against the tree. Semantically equal content (or an equal plaintext
/// fingerprint) is a no-op; an update keeps the comments and layout of the file in the tree where it can.
fn effective_changes<'a>(
    slots: &'a BTreeMap<String, Slot<'a>>,
    entries: &[Entry],
    tree: &dyn TreeView,
) -> Result<Effects<'a>, GitError> {
    let mut effective = Vec::new();
    let mut noops = 0usize;
    let mut edit_fallbacks = Vec::new();
    for (path, slot) in slots {
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
                noops += 1;
                continue;
            }
            (Some(new), Some(old)) if yaml::semantically_equal(&old, new) => {
                noops += 1;
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
                noops += 1;
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
    Ok(Effects {
        effective,
        noops,
        edit_fallbacks,
    })
}

/// What the ownership markers say.
struct Markers<'a> {
    /// Markers to create (destinations writing into a folder without one).
    created: HashMap<&'a DestinationId, FileChange>,
    conflicts: Vec<MarkerConflict>,
    /// Exclusive destinations whose folder someone else owns: all their entries are refused.
    refused: HashSet<&'a DestinationId>,
}

/// Phase 3: the ownership markers of the destinations that change something: created when missing, compared
/// with the destination's identity when present.
fn check_markers<'a>(
    effective: &[Effective<'_>],
    entries: &'a [Entry],
    tree: &dyn TreeView,
    ctx: &PlanContext,
) -> Result<Markers<'a>, GitError> {
    let mut touched: BTreeMap<&DestinationId, &DestinationRef> = BTreeMap::new();
    for change in effective {
        let destination = &entries[change.slot.entry].destination;
        touched.insert(&destination.id, destination);
    }
    let mut markers = Markers {
        created: HashMap::new(),
        conflicts: Vec::new(),
        refused: HashSet::new(),
    };
    for (id, destination) in touched {
        let marker_path = paths::marker_path(&destination.base_folder);
        match tree.read(&marker_path)? {
            None => {
                markers.created.insert(
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
                        markers.refused.insert(id);
                    }
                    markers.conflicts.push(MarkerConflict {
                        destination: destination.clone(),
                        exclusive: destination.exclusive_mode,
                        found_owner,
                    });
                }
            }
        }
    }
    Ok(markers)
}

/// Phase 4a: the sops CLI configuration of destinations that write encrypted files: created when missing, kept in
/// line with the recipients while it is the generated one, never touched once a person replaced it.
fn sops_configs<'a>(
    effective: &[Effective<'_>],
    entries: &'a [Entry],
    tree: &dyn TreeView,
) -> Result<HashMap<&'a DestinationId, FileChange>, GitError> {
    let mut configs: HashMap<&DestinationId, FileChange> = HashMap::new();
    for change in effective {
        let destination = &entries[change.slot.entry].destination;
        if change.slot.fingerprint.is_none()
            || change.slot.content.is_none()
            || destination.age_recipients.is_empty()
            || configs.contains_key(&destination.id)
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
            configs.insert(
                &destination.id,
                FileChange {
                    path,
                    content: Some(wanted.into_bytes()),
                },
            );
        }
    }
    Ok(configs)
}

/// Phase 4b: Flux's ignore rules for the writer's own files, in every base folder that changes: created when
/// missing, kept while generated, never touched once a person replaced it.
fn sourceignores<'a>(
    effective: &[Effective<'_>],
    entries: &'a [Entry],
    tree: &dyn TreeView,
) -> Result<HashMap<&'a DestinationId, FileChange>, GitError> {
    let mut ignores: HashMap<&DestinationId, FileChange> = HashMap::new();
    let mut looked_at: HashSet<&DestinationId> = HashSet::new();
    for change in effective {
        let destination = &entries[change.slot.entry].destination;
        if ignores.contains_key(&destination.id) || !looked_at.insert(&destination.id) {
            continue;
        }
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
            ignores.insert(
                &destination.id,
                FileChange {
                    path,
                    content: Some(wanted.as_bytes().to_vec()),
                },
            );
        }
    }
    Ok(ignores)
}

/// What [`kustomizations`] plans.
struct KustomizationPlan<'a> {
    /// Per destination: the destination and its kustomization file changes.
    edits: BTreeMap<&'a DestinationId, (&'a DestinationRef, Vec<FileChange>)>,
    problems: Vec<(usize, String)>,
    checked: Vec<usize>,
}

/// Phase 5: in destinations that keep kustomizations, every file written (re-sent ones too) is listed and every
/// file removed unlisted.
fn kustomizations<'a>(
    slots: &BTreeMap<String, Slot<'_>>,
    entries: &'a [Entry],
    refused: &HashSet<&DestinationId>,
    tree: &dyn TreeView,
) -> Result<KustomizationPlan<'a>, GitError> {
    let mut planned = KustomizationPlan {
        edits: BTreeMap::new(),
        problems: Vec::new(),
        checked: Vec::new(),
    };
    let mut planners: BTreeMap<&DestinationId, (usize, kustomize::Planner<'_>)> = BTreeMap::new();
    for (path, slot) in slots {
        let destination = &entries[slot.entry].destination;
        let mode = destination.placement.kustomization;
        if !mode.is_on() || refused.contains(&destination.id) {
            continue;
        }
        let (_, planner) = planners.entry(&destination.id).or_insert_with(|| {
            (
                slot.entry,
                kustomize::Planner::new(
                    tree,
                    &destination.base_folder,
                    mode == KustomizationMode::Create,
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
        planned.checked.push(entry);
        for problem in edits.problems {
            planned.problems.push((entry, problem));
        }
        if !edits.changes.is_empty() {
            planned
                .edits
                .insert(id, (&entries[entry].destination, edits.changes));
        }
    }
    Ok(planned)
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
