//! Writes refused alone, before anything is committed: a path that would be a file and a folder at once, a file
//! name kustomize reads as a kustomization, and the same object name in two namespaces of a destination that
//! omits namespaces. Each refusal names only the refused path; the rest of the batch goes on.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::{git::GitError, model::one_line};

use super::{Entry, TreeView, kustomize, plan::Slot};

/// Removes from `slots` every write whose path clashes with a file or folder of the tree or of an earlier accepted
/// write; returns the refused entries with a reason that names only the refused path (the other path may belong
/// to another client).
pub(super) fn refuse_path_conflicts(
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
    let mut accepted: BTreeSet<String> = BTreeSet::new();
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
pub(super) fn refuse_kustomization_names(
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
pub(super) fn refuse_namespace_clashes(
    slots: &mut BTreeMap<String, Slot<'_>>,
    entries: &[Entry],
    tree: &dyn TreeView,
) -> Result<Vec<(usize, String)>, GitError> {
    // (resource folder, file name) → namespaces that have it.
    let mut owners: HashMap<(String, String), BTreeSet<String>> = HashMap::new();
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
