//! Phase 6 of [`super::plan()`]: the effective changes grouped into commits and their messages.
//!
//! One commit per (author, installation, message template), ordered by first arrival. A destination's changes
//! that arrived before one of its flushes (CommitRequests) form that flush's commit, authored by the requester.
//! The files the writer keeps beside the objects (marker, `.sops.yaml`, `.sourceignore`) go into the first
//! commit of their destination, its kustomization edits into its last.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use reverser_common::paths;

use crate::{
    git::FileChange,
    model::{ClusterIdentity, DestinationId, DestinationRef, FlushOrder, ObjectId, one_line},
};

use super::{
    Entry, EntryOp, PlanContext, PlanStats, PlannedCommit, Verb, plan::Effective, template,
};

/// The files a destination's commits carry besides its objects.
pub(super) struct Companions<'a> {
    pub(super) markers: HashMap<&'a DestinationId, FileChange>,
    pub(super) sops_configs: HashMap<&'a DestinationId, FileChange>,
    pub(super) sourceignores: HashMap<&'a DestinationId, FileChange>,
    pub(super) kustomizations: BTreeMap<&'a DestinationId, (&'a DestinationRef, Vec<FileChange>)>,
}

/// The commits of a plan and what they do.
pub(super) struct Grouped {
    pub(super) commits: Vec<PlannedCommit>,
    /// Every count but the no-ops.
    pub(super) stats: PlanStats,
    /// Entry index of a sweep → how many of its orphans the commits delete.
    pub(super) sweep_deletions: BTreeMap<usize, usize>,
}

/// Groups `effective` into commits, with the companion files placed.
pub(super) fn commits(
    entries: &[Entry],
    effective: &[Effective<'_>],
    mut companions: Companions<'_>,
    ctx: &PlanContext,
) -> Grouped {
    let groups = groups(entries, effective);
    // A kustomization edit goes into the destination's last commit of the batch: by then every file it lists
    // exists and every file it unlists is gone.
    let mut last_group: HashMap<&DestinationId, usize> = HashMap::new();
    for (index, (_, members)) in groups.iter().enumerate() {
        for change in members {
            last_group.insert(&entries[change.slot.entry].destination.id, index);
        }
    }
    let mut grouped = Grouped {
        commits: Vec::with_capacity(groups.len() + companions.kustomizations.len()),
        stats: PlanStats::default(),
        sweep_deletions: BTreeMap::new(),
    };
    for (group_index, (key, members)) in groups.into_iter().enumerate() {
        let mut commit = build_commit(entries, &key, &members, &mut companions, ctx, &mut grouped);
        for id in &commit.destinations {
            if last_group.get(id) == Some(&group_index)
                && let Some((_, edits)) = companions.kustomizations.remove(id)
            {
                commit.changes.extend(edits);
            }
        }
        grouped.commits.push(commit);
    }
    // Kustomization edits of destinations whose objects did not change (re-sent files not listed yet).
    for (id, (destination, edits)) in companions.kustomizations {
        grouped.commits.push(PlannedCommit {
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
    grouped
}

/// The changes grouped by [`GroupKey`], groups and their members in order of first arrival.
fn groups<'e, 'a>(
    entries: &'e [Entry],
    effective: &'e [Effective<'a>],
) -> Vec<(GroupKey<'e>, Vec<&'e Effective<'a>>)> {
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
    let mut groups: Vec<(GroupKey<'e>, Vec<&'e Effective<'a>>)> = Vec::new();
    let mut order: Vec<&Effective<'a>> = effective.iter().collect();
    order.sort_by_key(|c| (c.slot.entry, c.path));
    for change in order {
        let destination = &entries[change.slot.entry].destination;
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
    groups
}

/// One group's commit (without its kustomization edits); counts what it does into `grouped`.
fn build_commit(
    entries: &[Entry],
    key: &GroupKey<'_>,
    members: &[&Effective<'_>],
    companions: &mut Companions<'_>,
    ctx: &PlanContext,
    grouped: &mut Grouped,
) -> PlannedCommit {
    let (author_name, author_email) = match key.author {
        Some(user) => author_identity(user),
        None => (ctx.bot_name.clone(), ctx.bot_email.clone()),
    };
    let stats = &mut grouped.stats;
    let mut changes = Vec::with_capacity(members.len() + 1);
    let mut lines = Vec::with_capacity(members.len());
    let mut destinations: Vec<DestinationId> = Vec::new();
    let (mut created, mut updated, mut deleted) = (0usize, 0usize, 0usize);
    for change in members {
        let destination = &entries[change.slot.entry].destination;
        if !destinations.contains(&destination.id) {
            destinations.push(destination.id.clone());
            if let Some(marker) = companions.markers.remove(&destination.id) {
                changes.push(marker);
            }
            if let Some(config) = companions.sops_configs.remove(&destination.id) {
                changes.push(config);
            }
            if let Some(ignore) = companions.sourceignores.remove(&destination.id) {
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
                *grouped
                    .sweep_deletions
                    .entry(change.slot.entry)
                    .or_insert(0) += 1;
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
    let message = message(
        entries,
        key,
        members,
        &lines,
        (created, updated, deleted),
        ctx,
    );
    PlannedCommit {
        author_name,
        author_email,
        message,
        changes,
        destinations,
        flush: key.flush.map(|(index, _)| index),
        id: None,
    }
}

/// A commit's message: the CommitRequest's text, else the destination's template, else the object line (one
/// object) or a summary; the trailers always.
fn message(
    entries: &[Entry],
    key: &GroupKey<'_>,
    members: &[&Effective<'_>],
    lines: &[String],
    counts: (usize, usize, usize),
    ctx: &PlanContext,
) -> String {
    let mut trailers = key.identity.trailers();
    if let Some((_, order)) = key.flush {
        trailers.push_str(&format!(
            "\nX-ConfigButler-CommitRequest: {}",
            one_line(&order.request_name)
        ));
    }
    if let Some(text) = key.flush.and_then(|(_, order)| order.message.as_ref()) {
        format!("{text}\n\n{trailers}\n")
    } else if let Some(template) = key.template {
        let fields = commit_fields(
            &members
                .iter()
                .map(|c| {
                    let entry = &entries[c.slot.entry];
                    TemplateInput {
                        verb: &c.verb,
                        path: c.path,
                        base_folder: &entry.destination.base_folder,
                        object: entry.op.object(),
                        kind: c.kind.as_deref(),
                    }
                })
                .collect::<Vec<_>>(),
            key.author.unwrap_or(&ctx.bot_name),
            lines,
            counts,
        );
        format!("{}\n\n{trailers}\n", template.render(&fields))
    } else if lines.len() == 1 {
        format!("{}\n\n{trailers}\n", lines[0])
    } else {
        let folders: Vec<String> = members
            .iter()
            .map(|c| entries[c.slot.entry].destination.base_folder.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let (created, updated, deleted) = counts;
        format!(
            "Sync {} objects in {}: {}\n\n{}\n\n{trailers}\n",
            lines.len(),
            folders.join(", "),
            summary(created, updated, deleted),
            object_lines(lines)
        )
    }
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
    let folders: BTreeSet<&str> = members.iter().map(|m| m.base_folder).collect();
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
