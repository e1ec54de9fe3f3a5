//! Trees parsed once and kept in memory, and new trees built from them.
//!
//! libgit2 caches parsed objects only up to 4 KiB per tree (the limit can only be raised through an
//! `unsafe` global), while a folder of a few hundred manifests is tens of KiB: every path lookup
//! and every `git_tree_create_updated` re-read and re-parsed it. Here a tree is parsed once and
//! shared; a commit rewrites only the trees on the paths it changes, serialised exactly as git does
//! (entries in git's order, modes in octal without leading zeros), and the new trees go into the
//! commit's pack ([`NewPack`]). Trees are immutable and content-addressed, so the cache can never be
//! stale; it only has to stay bounded.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use git2::{ObjectType, Oid, Repository};

use super::GitError;
use super::pack::NewPack;

pub(crate) const MODE_TREE: u32 = 0o040000;
pub(crate) const MODE_BLOB: u32 = 0o100644;
const MODE_GITLINK: u32 = 0o160000;
const MODE_TYPE: u32 = 0o170000;

/// Parsed entries the cache may hold before it is emptied: ~90 bytes each, so ~50 MiB per clone
/// at most. The trees of a 100,000-file tip are ~100,000 entries; superseded trees are evicted
/// as they are replaced, so the cap is only reached by repositories several times that size.
const MAX_CACHED_ENTRIES: usize = 600_000;
const MAX_CACHED_COMMITS: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) name: Box<[u8]>,
    pub(crate) mode: u32,
    pub(crate) id: Oid,
}

impl Entry {
    pub(crate) fn is_tree(&self) -> bool {
        self.mode & MODE_TYPE == MODE_TREE
    }

    /// A file as git's tree walk reports blobs: regular files and symlinks, not submodules.
    pub(crate) fn is_blob(&self) -> bool {
        !self.is_tree() && self.mode & MODE_TYPE != MODE_GITLINK
    }
}

type Entries = Arc<Vec<Entry>>;

/// Parsed trees and commit → tree ids.
#[derive(Default)]
pub(crate) struct TreeCache {
    trees: HashMap<Oid, Entries>,
    cached_entries: usize,
    commits: HashMap<Oid, Oid>,
}

impl TreeCache {
    /// The entries of tree `id`.
    fn get(&mut self, repo: &Repository, id: Oid) -> Result<Entries, GitError> {
        if let Some(entries) = self.trees.get(&id) {
            return Ok(entries.clone());
        }
        let odb = repo.odb().map_err(other)?;
        let object = odb.read(id).map_err(other)?;
        if object.kind() != ObjectType::Tree {
            return Err(GitError::Other(format!("{id} is not a tree")));
        }
        let entries = Arc::new(
            parse(object.data())
                .ok_or_else(|| GitError::Other(format!("tree {id} cannot be parsed")))?,
        );
        self.insert(id, entries.clone());
        Ok(entries)
    }

    fn insert(&mut self, id: Oid, entries: Entries) {
        if self.cached_entries + entries.len() > MAX_CACHED_ENTRIES {
            self.trees.clear();
            self.cached_entries = 0;
        }
        self.cached_entries += entries.len();
        if let Some(old) = self.trees.insert(id, entries) {
            self.cached_entries -= old.len();
        }
    }

    fn evict(&mut self, id: Oid) {
        if let Some(old) = self.trees.remove(&id) {
            self.cached_entries -= old.len();
        }
    }

    /// The root tree of `commit`.
    pub(crate) fn commit_tree(&mut self, repo: &Repository, commit: Oid) -> Result<Oid, GitError> {
        if let Some(tree) = self.commits.get(&commit) {
            return Ok(*tree);
        }
        let tree = repo.find_commit(commit).map_err(other)?.tree_id();
        self.remember_commit(commit, tree);
        Ok(tree)
    }

    pub(crate) fn remember_commit(&mut self, commit: Oid, tree: Oid) {
        if self.commits.len() >= MAX_CACHED_COMMITS {
            self.commits.clear();
        }
        self.commits.insert(commit, tree);
    }

    /// The entry at `path` (`/`-separated) under `root`.
    pub(crate) fn entry_at(
        &mut self,
        repo: &Repository,
        root: Oid,
        path: &str,
    ) -> Result<Option<Entry>, GitError> {
        let mut tree = root;
        let mut components = path.split('/').peekable();
        while let Some(component) = components.next() {
            let entries = self.get(repo, tree)?;
            let Some(index) = find(&entries, component.as_bytes()) else {
                return Ok(None);
            };
            let entry = &entries[index];
            if components.peek().is_none() {
                return Ok(Some(entry.clone()));
            }
            if !entry.is_tree() {
                return Ok(None);
            }
            tree = entry.id;
        }
        Ok(None)
    }

    /// Every file under tree `root`, as `prefix` + its path.
    pub(crate) fn files(
        &mut self,
        repo: &Repository,
        root: Oid,
        prefix: &str,
        out: &mut Vec<String>,
    ) -> Result<(), GitError> {
        let entries = self.get(repo, root)?;
        for entry in entries.iter() {
            let name = String::from_utf8_lossy(&entry.name);
            if entry.is_tree() {
                self.files(repo, entry.id, &format!("{prefix}{name}/"), out)?;
            } else if entry.is_blob() {
                out.push(format!("{prefix}{name}"));
            }
        }
        Ok(())
    }

    /// Adds to `out` the ids of every tree and blob reachable from tree `new` that is not the same
    /// object at the same path under `old` (None: everything under `new`). Submodules are skipped.
    pub(crate) fn new_objects(
        &mut self,
        repo: &Repository,
        new: Oid,
        old: Option<Oid>,
        out: &mut Vec<Oid>,
    ) -> Result<(), GitError> {
        if Some(new) == old {
            return Ok(());
        }
        out.push(new);
        let entries = self.get(repo, new)?;
        let old_entries = old.map(|id| self.get(repo, id)).transpose()?;
        for entry in entries.iter() {
            let before = old_entries
                .as_ref()
                .and_then(|o| find(o, &entry.name).map(|i| &o[i]));
            if before.is_some_and(|b| b.id == entry.id) {
                continue;
            }
            if entry.is_tree() {
                let old_sub = before.filter(|b| b.is_tree()).map(|b| b.id);
                self.new_objects(repo, entry.id, old_sub, out)?;
            } else if entry.is_blob() {
                out.push(entry.id);
            }
        }
        Ok(())
    }

    /// Applies `changes` (path → new blob id, or None to delete; paths sorted and unique) to the
    /// tree `base` and returns the new root tree id. New trees are added to `pack`. Deleting a
    /// missing file is a no-op; a folder left empty disappears; a file never silently replaces a
    /// folder or the other way round (git calls that a D/F conflict).
    pub(crate) fn update(
        &mut self,
        repo: &Repository,
        base: Option<Oid>,
        changes: &[(&str, Option<Oid>)],
        pack: &mut NewPack,
    ) -> Result<Oid, GitError> {
        let changes: Vec<(&[u8], Option<Oid>)> =
            changes.iter().map(|(p, id)| (p.as_bytes(), *id)).collect();
        match self.update_dir(repo, base, "", &changes, pack)? {
            Some(Some(id)) => Ok(id),
            None if base.is_some() => Ok(base.expect("checked")),
            // Everything was deleted (or nothing was there): the root is the empty tree.
            None | Some(None) => {
                let id = pack.add(ObjectType::Tree, Vec::new()).map_err(other)?;
                self.insert(id, Arc::new(Vec::new()));
                Ok(id)
            }
        }
    }

    /// None: unchanged; Some(None): the folder is now empty; Some(Some(id)): its new tree.
    fn update_dir(
        &mut self,
        repo: &Repository,
        base: Option<Oid>,
        folder: &str,
        changes: &[(&[u8], Option<Oid>)],
        pack: &mut NewPack,
    ) -> Result<Option<Option<Oid>>, GitError> {
        let mut entries: Vec<Entry> = match base {
            Some(id) => self.get(repo, id)?.as_ref().clone(),
            None => Vec::new(),
        };
        // Group by first component: the leaf operation on `name` and the changes below `name/`.
        #[derive(Default)]
        struct Group<'a> {
            leaf: Option<Option<Oid>>,
            below: Vec<(&'a [u8], Option<Oid>)>,
        }
        let mut groups: BTreeMap<&[u8], Group<'_>> = BTreeMap::new();
        for &(path, id) in changes {
            match path.iter().position(|&b| b == b'/') {
                None => groups.entry(path).or_default().leaf = Some(id),
                Some(slash) => groups
                    .entry(&path[..slash])
                    .or_default()
                    .below
                    .push((&path[slash + 1..], id)),
            }
        }
        let conflict = |name: &[u8]| {
            GitError::Unbuildable(format!(
                "D/F conflict when updating tree at {folder}{}",
                String::from_utf8_lossy(name)
            ))
        };
        let mut changed = false;
        for (name, group) in groups {
            match group.leaf {
                Some(Some(_)) if !group.below.is_empty() => return Err(conflict(name)),
                Some(Some(blob)) => match find(&entries, name) {
                    Some(i) if entries[i].is_tree() => return Err(conflict(name)),
                    Some(i) => {
                        if entries[i].id != blob || entries[i].mode != MODE_BLOB {
                            entries[i].id = blob;
                            entries[i].mode = MODE_BLOB;
                            changed = true;
                        }
                    }
                    None => {
                        insert_sorted(&mut entries, name, MODE_BLOB, blob);
                        changed = true;
                    }
                },
                Some(None) => {
                    if let Some(i) = find(&entries, name)
                        && entries[i].is_blob()
                    {
                        entries.remove(i);
                        changed = true;
                    }
                }
                None => {}
            }
            if group.below.is_empty() {
                continue;
            }
            let existing = find(&entries, name);
            let sub_base = match existing {
                Some(i) if !entries[i].is_tree() => return Err(conflict(name)),
                Some(i) => Some(entries[i].id),
                None => None,
            };
            let sub_folder = format!("{folder}{}/", String::from_utf8_lossy(name));
            match self.update_dir(repo, sub_base, &sub_folder, &group.below, pack)? {
                None => {}
                Some(None) => {
                    if let Some(i) = existing {
                        entries.remove(i);
                        changed = true;
                    }
                }
                Some(Some(id)) => {
                    match existing {
                        Some(i) => entries[i].id = id,
                        None => insert_sorted(&mut entries, name, MODE_TREE, id),
                    }
                    changed = true;
                }
            }
        }
        if !changed {
            return Ok(None);
        }
        if entries.is_empty() {
            return Ok(Some(None));
        }
        let id = pack
            .add(ObjectType::Tree, serialize(&entries))
            .map_err(other)?;
        if let Some(old) = base
            && old != id
        {
            // Superseded; read again from disk if ever needed.
            self.evict(old);
        }
        self.insert(id, Arc::new(entries));
        Ok(Some(Some(id)))
    }
}

fn other(err: git2::Error) -> GitError {
    GitError::Other(err.message().to_owned())
}

/// git's tree order (`base_name_compare`): bytewise, a tree's name compared as if it ended in `/`.
fn git_order(a: &[u8], a_tree: bool, b: &[u8], b_tree: bool) -> std::cmp::Ordering {
    let n = a.len().min(b.len());
    a[..n].cmp(&b[..n]).then_with(|| {
        let next = |name: &[u8], tree: bool| match name.get(n) {
            Some(&c) => c,
            None if tree => b'/',
            None => 0,
        };
        next(a, a_tree).cmp(&next(b, b_tree))
    })
}

fn find(entries: &[Entry], name: &[u8]) -> Option<usize> {
    [false, true].into_iter().find_map(|tree| {
        entries
            .binary_search_by(|e| git_order(&e.name, e.is_tree(), name, tree))
            .ok()
    })
}

fn insert_sorted(entries: &mut Vec<Entry>, name: &[u8], mode: u32, id: Oid) {
    let tree = mode & MODE_TYPE == MODE_TREE;
    let at = entries
        .binary_search_by(|e| git_order(&e.name, e.is_tree(), name, tree))
        .unwrap_or_else(|at| at);
    entries.insert(
        at,
        Entry {
            name: name.into(),
            mode,
            id,
        },
    );
}

/// Raw tree object data: `<octal mode> <name>\0<20-byte id>` per entry.
fn parse(mut data: &[u8]) -> Option<Vec<Entry>> {
    let mut entries = Vec::new();
    while !data.is_empty() {
        let space = data.iter().position(|&b| b == b' ')?;
        let mode = data[..space].iter().try_fold(0u32, |acc, &d| {
            (b'0'..=b'7')
                .contains(&d)
                .then(|| acc.checked_mul(8).map(|m| m + u32::from(d - b'0')))
                .flatten()
        })?;
        data = &data[space + 1..];
        let nul = data.iter().position(|&b| b == 0)?;
        let name: Box<[u8]> = data[..nul].into();
        data = &data[nul + 1..];
        let id = Oid::from_bytes(data.get(..20)?).ok()?;
        data = &data[20..];
        entries.push(Entry { name, mode, id });
    }
    Some(entries)
}

fn serialize(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(|e| e.name.len() + 28).sum());
    for e in entries {
        use std::io::Write as _;
        let _ = write!(out, "{:o} ", e.mode);
        out.extend_from_slice(&e.name);
        out.push(0);
        out.extend_from_slice(e.id.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_sort_as_if_their_names_ended_in_a_slash() {
        use std::cmp::Ordering::*;
        // "a.yaml" < "a" (tree, compared as "a/") < "a0"; a blob "a" sorts before "a.yaml".
        assert_eq!(git_order(b"a.yaml", false, b"a", true), Less);
        assert_eq!(git_order(b"a", true, b"a0", false), Less);
        assert_eq!(git_order(b"a", false, b"a.yaml", false), Less);
        assert_eq!(git_order(b"a", false, b"a", true), Less);
    }

    #[test]
    fn serialisation_round_trips_and_matches_libgit2() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path()).unwrap();
        let blob = repo.blob(b"x").unwrap();
        let sub = {
            let mut b = repo.treebuilder(None).unwrap();
            b.insert("f", blob, 0o100644).unwrap();
            b.write().unwrap()
        };
        let mut builder = repo.treebuilder(None).unwrap();
        for (name, id, mode) in [
            ("a.yaml", blob, 0o100644),
            ("a", sub, 0o040000),
            ("a0", blob, 0o100755),
            ("link", blob, 0o120000),
        ] {
            builder.insert(name, id, mode).unwrap();
        }
        let expected = builder.write().unwrap();
        let data = repo.odb().unwrap().read(expected).unwrap().data().to_vec();
        let entries = parse(&data).unwrap();
        assert_eq!(serialize(&entries), data);

        // Built from scratch through `insert_sorted`, in a different order.
        let mut built = Vec::new();
        insert_sorted(&mut built, b"link", 0o120000, blob);
        insert_sorted(&mut built, b"a0", 0o100755, blob);
        insert_sorted(&mut built, b"a", MODE_TREE, sub);
        insert_sorted(&mut built, b"a.yaml", MODE_BLOB, blob);
        assert_eq!(
            Oid::hash_object(ObjectType::Tree, &serialize(&built)).unwrap(),
            expected
        );
        assert_eq!(find(&built, b"a"), Some(1));
        assert_eq!(find(&built, b"a.yaml"), Some(0));
        assert_eq!(find(&built, b"b"), None);
    }
}
