//! [`Clone`]: a bare clone of one branch of one remote, with fetch, tree-level commits and
//! fast-forward-only push.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};

use git2::{
    AutotagOption, ErrorClass, ErrorCode, FetchOptions, ObjectType, Oid, PushOptions, Repository,
    RepositoryInitOptions, Signature,
};
use tracing::warn;

use super::auth::{CallState, callbacks};
use super::pack::{self, NewPack};
use super::tree::TreeCache;
use super::url::{endpoint, redact_url, scrub};
use super::{
    CommitMeta, FileChange, GitCredentials, GitError, PushOutcome, RepoSpec, validate_branch_name,
    validate_path,
};

/// Id of the empty tree (the same in every SHA-1 repository).
const EMPTY_TREE: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";

/// A bare clone tracking `refs/heads/<branch>` of one remote.
pub struct Clone {
    repo: Repository,
    spec: RepoSpec,
    dir: PathBuf,
    base: Option<Oid>,
    /// Parsed trees (read through `&self` by [`read_file`](Self::read_file)).
    trees: RefCell<TreeCache>,
    /// Another handle is reading the object database (a push in the background, see
    /// [`open_for_push`](Self::open_for_push)): merging would delete packs under it.
    merges_paused: bool,
    /// Packs in the clone after the last commit (see [`pack_count`](Self::pack_count)).
    packs: usize,
}

impl std::fmt::Debug for Clone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clone")
            .field("dir", &self.dir)
            .field("spec", &self.spec)
            .field("base", &self.base)
            .finish()
    }
}

impl Clone {
    /// Opens the clone at `dir` or initialises it. A BARE repository (no worktree: nothing
    /// half-written can ever be left on disk; commits are built from trees directly).
    ///
    /// The base is restored from `refs/remotes/origin/<branch>`, i.e. the remote tip as last
    /// seen by a fetch or a successful push.
    /// Uses `credentials` from the next network operation on.
    pub fn set_credentials(&mut self, credentials: Option<GitCredentials>) {
        self.spec.credentials = credentials;
    }

    pub fn open_or_init(dir: &Path, spec: RepoSpec) -> Result<Clone, GitError> {
        validate_branch_name(&spec.branch)?;
        relax_libgit2_checks();
        match Repository::open_bare(dir) {
            Ok(_) => {}
            Err(e) if e.code() == ErrorCode::NotFound => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    GitError::Other(format!("cannot create {}: {e}", dir.display()))
                })?;
                Repository::init_opts(
                    dir,
                    RepositoryInitOptions::new()
                        .bare(true)
                        .initial_head(&format!("refs/heads/{}", spec.branch)),
                )
                .map_err(local)?;
            }
            Err(e) => return Err(local(e)),
        }
        Ok(Clone::with_repo(open_repo(dir)?, dir, spec, false))
    }

    /// A handle on `repo`, its base restored from the tracking ref.
    fn with_repo(repo: Repository, dir: &Path, spec: RepoSpec, merges_paused: bool) -> Clone {
        let mut clone = Clone {
            repo,
            spec,
            dir: dir.to_owned(),
            base: None,
            trees: RefCell::default(),
            merges_paused,
            packs: 0,
        };
        clone.base = clone.repo.refname_to_id(&clone.tracking_ref()).ok();
        clone
    }

    /// A second handle on the clone at `dir`, for one push while the first handle goes on
    /// committing (on another thread). It changes nothing on disk when opened (no init, and no
    /// clean-up of the temporary files the first handle may be writing), and it is opened afresh
    /// for every push, so that it lists the packs as they are then. Use it for
    /// [`push`](Self::push) only; the first handle learns the pushed tip through
    /// [`advance_base`](Self::advance_base) and pauses its pack merges meanwhile
    /// ([`pause_pack_merges`](Self::pause_pack_merges)).
    pub fn open_for_push(dir: &Path, spec: RepoSpec) -> Result<Clone, GitError> {
        validate_branch_name(&spec.branch)?;
        relax_libgit2_checks();
        let repo = Repository::open_bare(dir).map_err(local)?;
        Ok(Clone::with_repo(repo, dir, spec, true))
    }

    /// `commit` was pushed through another handle (see [`open_for_push`](Self::open_for_push)),
    /// which also moved the tracking ref: new work builds on it.
    pub fn advance_base(&mut self, commit: Oid) {
        self.base = Some(commit);
    }

    /// While another handle reads the clone's objects, small packs are not merged: merging
    /// deletes the packs it copied, and a reader that has listed a pack but not opened it yet
    /// would then fail to read it. They are merged at the first commit after the pause.
    pub fn pause_pack_merges(&mut self, paused: bool) {
        self.merges_paused = paused;
    }

    /// The packs in the clone after its last commit: with merges paused this grows by one per
    /// commit.
    pub fn pack_count(&self) -> usize {
        self.packs
    }

    /// The spec this clone was opened with.
    pub fn spec(&self) -> &RepoSpec {
        &self.spec
    }

    /// The clone's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Fetch the branch from the remote into `refs/remotes/origin/<branch>`; returns the remote
    /// tip (None when the remote is empty or lacks the branch, which also forgets the tracking
    /// ref). The returned tip becomes the [`base`](Self::base).
    pub fn fetch(&mut self) -> Result<Option<Oid>, GitError> {
        probe(&self.spec.url)?;
        let tracking = self.tracking_ref();
        let head = self.head_ref();
        let state = CallState::default();
        let mut remote = self.repo.remote_anonymous(&self.spec.url).map_err(local)?;
        let mut opts = FetchOptions::new();
        opts.remote_callbacks(callbacks(&self.spec, &state))
            .download_tags(AutotagOption::None);
        remote
            .fetch(&[format!("+{head}:{tracking}")], Some(&mut opts), None)
            .map_err(|e| self.classify(&e, &state))?;
        // The advertised refs stay readable after the fetch disconnected.
        let tip = remote
            .list()
            .map_err(local)?
            .iter()
            .find(|h| h.name() == head)
            .map(|h| h.oid());
        drop(remote);
        match tip {
            Some(oid) => {
                self.repo
                    .reference(&tracking, oid, true, "reverser: fetch")
                    .map_err(local)?;
            }
            None => {
                if let Ok(mut r) = self.repo.find_reference(&tracking) {
                    r.delete().map_err(local)?;
                }
            }
        }
        self.base = tip;
        Ok(tip)
    }

    /// The commit new work builds on: the last known remote tip (after fetch or after our own
    /// successful push).
    pub fn base(&self) -> Option<Oid> {
        self.base
    }

    /// The content of the file at `path` in `commit`; None when the commit is None or the path
    /// is not a file there.
    pub fn read_file(&self, commit: Option<Oid>, path: &str) -> Result<Option<Vec<u8>>, GitError> {
        let Some(commit) = commit else {
            return Ok(None);
        };
        let mut trees = self.trees.borrow_mut();
        let root = trees.commit_tree(&self.repo, commit)?;
        match trees.entry_at(&self.repo, root, path)? {
            Some(entry) if entry.is_blob() => {
                let odb = self.repo.odb().map_err(local)?;
                let object = odb.read(entry.id).map_err(local)?;
                Ok(Some(object.data().to_vec()))
            }
            _ => Ok(None),
        }
    }

    /// Every file (blob) path under `folder` (recursive) at `commit`, sorted; folder "" = whole
    /// tree. A missing folder has no files.
    pub fn list_files(&self, commit: Option<Oid>, folder: &str) -> Result<Vec<String>, GitError> {
        let Some(commit) = commit else {
            return Ok(Vec::new());
        };
        let mut trees = self.trees.borrow_mut();
        let root = trees.commit_tree(&self.repo, commit)?;
        let folder = folder.trim_matches('/');
        let (tree, prefix) = if folder.is_empty() {
            (root, String::new())
        } else {
            match trees.entry_at(&self.repo, root, folder)? {
                Some(entry) if entry.is_tree() => (entry.id, format!("{folder}/")),
                _ => return Ok(Vec::new()),
            }
        };
        let mut files = Vec::new();
        trees.files(&self.repo, tree, &prefix, &mut files)?;
        files.sort();
        Ok(files)
    }

    /// Creates a commit on top of `parent` applying `changes`, at a cost proportional to the
    /// number of changed files and the size of the folders they are in (blobs + the rewritten
    /// trees, written as one pack), not to the repository size.
    /// Later changes to the same path win; deleting a missing file is a no-op; deleting the last
    /// file of a folder removes the folder. Moves no ref: the result is published by
    /// [`push`](Self::push).
    pub fn commit(
        &mut self,
        parent: Option<Oid>,
        changes: &[FileChange],
        meta: &CommitMeta,
    ) -> Result<Oid, GitError> {
        let commit = self.build(parent, changes, meta, false)?;
        Ok(commit.expect("build always commits when asked to"))
    }

    /// Like [`commit`](Self::commit), but returns None instead of creating an empty commit when
    /// the changes leave the parent's tree as it is.
    pub fn commit_if_changed(
        &mut self,
        parent: Option<Oid>,
        changes: &[FileChange],
        meta: &CommitMeta,
    ) -> Result<Option<Oid>, GitError> {
        self.build(parent, changes, meta, true)
    }

    /// Push `commit` to `refs/heads/<branch>` of the remote, fast-forward only (never a forced
    /// refspec). A non-fast-forward or stale rejection is `Ok(PushOutcome::Rejected)`; any other
    /// refusal is [`GitError::Rejected`]. On success `commit` becomes the new base.
    pub fn push(&mut self, commit: Oid) -> Result<PushOutcome, GitError> {
        if let Some(remote) = local_remote_dir(&self.spec.url)
            && let Some(outcome) = self.push_local(&remote, commit)?
        {
            return Ok(outcome);
        }
        probe(&self.spec.url)?;
        let head = self.head_ref();
        let state = CallState::default();
        let refusal: RefCell<Option<String>> = RefCell::new(None);
        let mut remote = self.repo.remote_anonymous(&self.spec.url).map_err(local)?;
        let mut cbs = callbacks(&self.spec, &state);
        cbs.push_update_reference(|_refname, status| {
            if let Some(status) = status {
                *refusal.borrow_mut() = Some(status.to_owned());
            }
            Ok(())
        });
        let mut opts = PushOptions::new();
        opts.remote_callbacks(cbs);
        // The pack's delta search on every core, as `git push` does (`pack.threads`); libgit2
        // defaults to one thread.
        opts.packbuilder_parallelism(0);
        // No leading '+': the remote must fast-forward or refuse. The source is the commit id
        // itself (libgit2 resolves it like any revision), so no local ref is written per push.
        match remote.push(&[format!("{commit}:{head}")], Some(&mut opts)) {
            Ok(()) => {}
            // libgit2 checks fast-forward itself against the advertised tip (also when that tip
            // is a commit we have never seen).
            Err(e) if e.code() == ErrorCode::NotFastForward => return Ok(PushOutcome::Rejected),
            Err(e) => return Err(self.classify(&e, &state)),
        }
        drop(opts);
        drop(remote);
        if let Some(status) = refusal.take() {
            return if lost_race(&status) {
                Ok(PushOutcome::Rejected)
            } else {
                Err(GitError::Rejected(self.scrub(&status)))
            };
        }
        self.pushed(commit)
    }

    fn pushed(&mut self, commit: Oid) -> Result<PushOutcome, GitError> {
        self.repo
            .reference(&self.tracking_ref(), commit, true, "reverser: pushed")
            .map_err(local)?;
        self.base = Some(commit);
        Ok(PushOutcome::Pushed)
    }

    /// Push to a bare repository on a local path, at a cost proportional to what changed.
    ///
    /// libgit2's own push, on every transport, first walks *every* tree and blob of the remote tip
    /// to find what not to send (`mark_edges_uninteresting`): ~100,000 entries per push in a
    /// 100,000-file repository. Here, for a remote in the file system only, the new objects are
    /// found by comparing the pushed trees with their parents' (unchanged subtrees are skipped by
    /// id) and handed to libgit2's pack builder, which writes them into the remote's
    /// `objects/pack` as one ordinary pack: zlib-compressed and delta-compressed, as `git push`
    /// would send it (the clone's own packs are stored uncompressed, see [`pack`]; they never
    /// reach a remote). Then the branch is moved with a compare-and-swap under git's ref lock, the
    /// protocol `git push` and libgit2 use, so concurrent pushers still cannot lose work. Like
    /// libgit2's local transport, no hooks run.
    ///
    /// Returns None when the remote is something else than a bare repository on disk: the generic
    /// push then handles (and reports) it.
    fn push_local(
        &mut self,
        remote_dir: &Path,
        commit: Oid,
    ) -> Result<Option<PushOutcome>, GitError> {
        let Ok(remote) = Repository::open_bare(remote_dir) else {
            return Ok(None);
        };
        let head = self.head_ref();
        let tip = match remote.find_reference(&head) {
            Ok(reference) => match reference.target() {
                Some(tip) => Some(tip),
                // A symbolic branch ref: leave it to libgit2.
                None => return Ok(None),
            },
            Err(e) if e.code() == ErrorCode::NotFound => None,
            Err(e) => return Err(self.local_push_error(&e)),
        };
        let commits = match tip {
            Some(tip) if tip == commit => return self.pushed(commit).map(Some),
            Some(tip) => match self.linear_history(commit, tip)? {
                Some(commits) => commits,
                None => {
                    // Never seen, or not an ancestor: someone else pushed first.
                    let known = self.repo.odb().map_err(local)?.exists(tip);
                    if !known || !self.repo.graph_descendant_of(commit, tip).map_err(local)? {
                        return Ok(Some(PushOutcome::Rejected));
                    }
                    self.commits_to_send(commit, Some(tip))?
                }
            },
            None => self.commits_to_send(commit, None)?,
        };
        let objects = self.objects_to_send(&commits)?;
        self.write_remote_pack(&objects, &remote_dir.join("objects").join("pack"))?;
        let message = "push: reverser";
        let moved = match tip {
            Some(tip) => remote.reference_matching(&head, commit, true, tip, message),
            None => remote.reference(&head, commit, false, message),
        };
        match moved {
            Ok(_) => self.pushed(commit).map(Some),
            Err(e)
                if matches!(
                    e.code(),
                    ErrorCode::Modified | ErrorCode::Exists | ErrorCode::Locked
                ) =>
            {
                Ok(Some(PushOutcome::Rejected))
            }
            Err(e) => Err(self.local_push_error(&e)),
        }
    }

    fn local_push_error(&self, err: &git2::Error) -> GitError {
        GitError::Other(format!(
            "{}: {}",
            redact_url(&self.spec.url),
            self.scrub(err.message())
        ))
    }

    /// The commits from `commit` back to `tip` (excluded) when that is a short chain of
    /// single-parent commits, the usual case (what one flush built on the last pushed tip);
    /// None otherwise.
    fn linear_history(&self, commit: Oid, tip: Oid) -> Result<Option<Vec<Oid>>, GitError> {
        let mut commits = Vec::new();
        let mut at = commit;
        while commits.len() < 64 {
            commits.push(at);
            let object = self.repo.find_commit(at).map_err(local)?;
            if object.parent_count() != 1 {
                return Ok(None);
            }
            at = object.parent_id(0).map_err(local)?;
            if at == tip {
                return Ok(Some(commits));
            }
        }
        Ok(None)
    }

    /// Commits reachable from `commit` but not from `tip`.
    fn commits_to_send(&self, commit: Oid, tip: Option<Oid>) -> Result<Vec<Oid>, GitError> {
        let mut walk = self.repo.revwalk().map_err(local)?;
        walk.push(commit).map_err(local)?;
        if let Some(tip) = tip {
            walk.hide(tip).map_err(local)?;
        }
        walk.map(|id| id.map_err(local)).collect()
    }

    /// Writes `objects` into the remote's `pack_dir` as one pack built by libgit2 (compressed,
    /// with deltas between similar objects), indexed there.
    fn write_remote_pack(&self, objects: &[Oid], pack_dir: &Path) -> Result<(), GitError> {
        let failed = |why: String| {
            GitError::Other(format!(
                "{}: cannot write a pack: {why}",
                redact_url(&self.spec.url)
            ))
        };
        std::fs::create_dir_all(pack_dir).map_err(|e| failed(e.to_string()))?;
        let mut builder = self
            .repo
            .packbuilder()
            .map_err(|e| failed(e.message().to_owned()))?;
        // The delta search on every core, as `git push` does (`pack.threads`); libgit2 defaults
        // to one thread.
        builder.set_threads(0);
        for &id in objects {
            // Duplicates are ignored by the builder.
            builder
                .insert_object(id, None)
                .map_err(|e| failed(e.message().to_owned()))?;
        }
        // Mode 0: libgit2's default for packs (read-only).
        builder
            .write(pack_dir, 0)
            .map_err(|e| failed(e.message().to_owned()))
    }

    /// The commits with the trees and blobs each adds to its first parent. With `commits` from
    /// [`commits_to_send`](Self::commits_to_send), everything else is reachable from the tip,
    /// which the remote has.
    fn objects_to_send(&mut self, commits: &[Oid]) -> Result<Vec<Oid>, GitError> {
        let mut objects = Vec::new();
        for &id in commits {
            objects.push(id);
            let parent = self
                .repo
                .find_commit(id)
                .map_err(local)?
                .parent_ids()
                .next();
            let trees = self.trees.get_mut();
            let parent_tree = parent
                .map(|p| trees.commit_tree(&self.repo, p))
                .transpose()?;
            let tree = trees.commit_tree(&self.repo, id)?;
            trees.new_objects(&self.repo, tree, parent_tree, &mut objects)?;
        }
        Ok(objects)
    }

    fn head_ref(&self) -> String {
        format!("refs/heads/{}", self.spec.branch)
    }

    fn tracking_ref(&self) -> String {
        format!("refs/remotes/origin/{}", self.spec.branch)
    }

    /// Writes the new blobs, the rewritten trees and the commit as one pack (see [`pack`]), then
    /// merges small packs when the policy says so.
    ///
    /// Measured alternatives, rejected: loose objects (one file each: on the measured ext4 volume,
    /// creating them was ~40 % of the seeding time; they also make every lookup slower), and an
    /// in-memory ODB (mempack) dumped per commit (`git_mempack_dump` inserts each commit
    /// *recursively*, i.e. the whole tree of a 100,000-file repository, and delta-compresses).
    fn build(
        &mut self,
        parent: Option<Oid>,
        changes: &[FileChange],
        meta: &CommitMeta,
        skip_unchanged: bool,
    ) -> Result<Option<Oid>, GitError> {
        // Last write wins.
        let mut latest: BTreeMap<&str, Option<&[u8]>> = BTreeMap::new();
        for change in changes {
            validate_path(&change.path)?;
            latest.insert(&change.path, change.content.as_deref());
        }
        let mut new = NewPack::default();
        let mut updates = Vec::with_capacity(latest.len());
        for (path, content) in latest {
            let blob = content
                .map(|bytes| new.add(ObjectType::Blob, bytes.to_vec()))
                .transpose()
                .map_err(local)?;
            updates.push((path, blob));
        }
        let trees = self.trees.get_mut();
        let parent_tree = parent
            .map(|p| trees.commit_tree(&self.repo, p))
            .transpose()?;
        let tree = trees.update(&self.repo, parent_tree, &updates, &mut new)?;
        let empty = Oid::from_str(EMPTY_TREE).expect("valid id");
        let unchanged = Some(tree) == parent_tree || (parent_tree.is_none() && tree == empty);
        if skip_unchanged && unchanged {
            return Ok(None);
        }
        let author = Signature::now(&meta.author_name, &meta.author_email).map_err(local)?;
        let committer =
            Signature::now(&meta.committer_name, &meta.committer_email).map_err(local)?;
        let mut body = commit_object(tree, parent, &author, &committer, &meta.message);
        if let Some(signer) = self.spec.signing.current() {
            body = super::sign::with_signature_header(&body, &signer.sign(&body)?);
        }
        let commit = new.add(ObjectType::Commit, body).map_err(local)?;
        trees.remember_commit(commit, tree);
        let pack_dir = self.dir.join("objects").join("pack");
        new.write(&pack_dir).map_err(|e| {
            GitError::Other(format!(
                "cannot write a pack in {}: {e}",
                pack_dir.display()
            ))
        })?;
        self.maintain_packs();
        Ok(Some(commit))
    }

    /// Merges small packs (see [`pack::merge_candidates`]); failures only cost performance.
    fn maintain_packs(&mut self) {
        let pack_dir = self.dir.join("objects").join("pack");
        let pack_dir = pack_dir.as_path();
        let candidates = match pack::list_packs(pack_dir) {
            Ok(packs) => {
                self.packs = packs.len();
                if self.merges_paused {
                    return;
                }
                pack::merge_candidates(&packs)
            }
            Err(error) => {
                warn!(dir = %pack_dir.display(), %error, "cannot list packs");
                return;
            }
        };
        if candidates.is_empty() {
            return;
        }
        match pack::merge(&self.repo, pack_dir, &candidates) {
            Ok(()) => self.packs = (self.packs + 1).saturating_sub(candidates.len()),
            Err(error) => {
                warn!(dir = %pack_dir.display(), %error, "merging packs failed; keeping them as they are")
            }
        }
        // libgit2 keeps the old packs open and listed: start from a fresh handle.
        match open_repo(&self.dir) {
            Ok(repo) => self.repo = repo,
            Err(error) => warn!(dir = %self.dir.display(), %error, "cannot reopen the clone"),
        }
    }

    fn scrub(&self, text: &str) -> String {
        let secrets = self
            .spec
            .credentials
            .as_ref()
            .map(|c| c.secrets())
            .unwrap_or_default();
        scrub(text, &secrets)
    }

    /// Turns a failed network operation into the right [`GitError`], preferring what the
    /// callbacks saw over libgit2's generic text.
    fn classify(&self, err: &git2::Error, state: &CallState) -> GitError {
        let url = redact_url(&self.spec.url);
        let msg = format!("{url}: {}", self.scrub(err.message()));
        if state.timed_out.get() {
            return GitError::Unreachable(format!(
                "{url}: did not finish within {} s (--git-operation-timeout-sec)",
                super::operation_timeout().as_secs()
            ));
        }
        if let Some(why) = state.identity_failure.take() {
            return GitError::HostKey(format!("{url}: {why}"));
        }
        // libgit2 loses GIT_ECERTIFICATE on some paths; the SSL class + text still say it.
        let untrusted = err.code() == ErrorCode::Certificate
            || (err.class() == ErrorClass::Ssl && err.message().contains("certificate"));
        if untrusted {
            let why = state.tls_note.take().unwrap_or_else(|| msg.clone());
            return GitError::HostKey(format!("{url}: {}", self.scrub(&why)));
        }
        if let Some(why) = state.auth_failure.take() {
            return GitError::Auth(format!("{url}: {why} ({})", self.scrub(err.message())));
        }
        if err.code() == ErrorCode::Auth {
            return GitError::Auth(msg);
        }
        match err.class() {
            ErrorClass::Net
            | ErrorClass::Os
            | ErrorClass::Ssh
            | ErrorClass::Http
            | ErrorClass::Ssl => GitError::Unreachable(msg),
            _ => GitError::Other(msg),
        }
    }
}

/// The directory of a remote in the local file system: `file:///path` or a plain path. URLs with
/// escapes or a host part go the generic way.
fn local_remote_dir(url: &str) -> Option<PathBuf> {
    if let Some(path) = url.strip_prefix("file://") {
        return (path.starts_with('/') && !path.contains('%')).then(|| PathBuf::from(path));
    }
    (!url.contains("://") && endpoint(url).is_none()).then(|| PathBuf::from(url))
}

/// Opens the bare clone, after removing what an interrupted pack write left behind.
fn open_repo(dir: &Path) -> Result<Repository, GitError> {
    let repo = Repository::open_bare(dir).map_err(local)?;
    pack::remove_temporary_files(&dir.join("objects").join("pack"));
    // Earlier versions layered this file over the configuration to turn off the delta search of
    // pushes (remotes received packs without deltas, several times larger); it is no longer read.
    let _ = std::fs::remove_file(dir.join("reverser.gitconfig"));
    Ok(repo)
}

/// Two process-wide libgit2 checks that cost more than they protect here (the writer is the only
/// libgit2 user in its process):
///
/// - Hash verification on read (`GIT_OPT_ENABLE_STRICT_HASH_VERIFICATION`): libgit2 re-hashes
///   every object it reads. Profiling the push of one file in a 100,000-file repository showed
///   ~45 % of the time in that SHA-1, because libgit2's push walks every tree of the remote tip.
///   git itself does not verify ids on ordinary reads either (only `fsck` and `index-pack` do);
///   objects still carry zlib's Adler-32, fetched packs are verified by the indexer when they
///   arrive, and the writer hashes what it writes.
/// - Strict object creation (`GIT_OPT_ENABLE_STRICT_OBJECT_CREATION`): libgit2 checks that the
///   target of a new reference exists, which for a local remote means loading its whole object
///   database (one index per pack) on every push: ~6 % of the seeding time with a remote of 500
///   packs. The writer only moves references to commits it has just written (or fetched).
fn relax_libgit2_checks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        git2::opts::strict_hash_verification(false);
        git2::opts::strict_object_creation(false);
    });
}

/// The commit object, byte for byte as `git_commit_create` writes it.
fn commit_object(
    tree: Oid,
    parent: Option<Oid>,
    author: &Signature<'_>,
    committer: &Signature<'_>,
    message: &str,
) -> Vec<u8> {
    fn signature(out: &mut Vec<u8>, header: &str, sig: &Signature<'_>) {
        let when = sig.when();
        let offset = when.offset_minutes();
        let sign = if offset < 0 || when.sign() == '-' {
            '-'
        } else {
            '+'
        };
        let offset = offset.unsigned_abs();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(sig.name_bytes());
        out.extend_from_slice(b" <");
        out.extend_from_slice(sig.email_bytes());
        out.extend_from_slice(
            format!(
                "> {} {sign}{:02}{:02}\n",
                when.seconds() as u32,
                offset / 60,
                offset % 60
            )
            .as_bytes(),
        );
    }
    let mut out = Vec::with_capacity(256 + message.len());
    out.extend_from_slice(format!("tree {tree}\n").as_bytes());
    if let Some(parent) = parent {
        out.extend_from_slice(format!("parent {parent}\n").as_bytes());
    }
    signature(&mut out, "author ", author);
    signature(&mut out, "committer ", committer);
    out.push(b'\n');
    out.extend_from_slice(message.as_bytes());
    out
}

/// Errors of purely local operations (no URL, no credentials involved).
fn local(err: git2::Error) -> GitError {
    GitError::Other(err.message().to_owned())
}

/// A per-ref refusal that means "someone else moved the branch": fetch and retry.
fn lost_race(status: &str) -> bool {
    let status = status.to_ascii_lowercase();
    [
        "non-fast-forward",
        "fetch first",
        "stale",
        "lock",
        "already exists",
        "expected",
    ]
    .iter()
    .any(|needle| status.contains(needle))
}

/// Fails fast with [`GitError::Unreachable`] when the remote's TCP endpoint does not accept a
/// connection within the connect timeout (`--git-connect-timeout-sec`). Local remotes are not probed.
fn probe(url: &str) -> Result<(), GitError> {
    let Some(ep) = endpoint(url) else {
        return Ok(());
    };
    let unreachable = |why: String| {
        GitError::Unreachable(format!(
            "{}: cannot connect to {}:{}: {why}",
            redact_url(url),
            ep.host,
            ep.port
        ))
    };
    let addrs = (ep.host.as_str(), ep.port)
        .to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?;
    let mut last = String::from("no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, super::connect_timeout()) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(unreachable(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_objects_are_byte_for_byte_what_libgit2_writes() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path()).unwrap();
        let tree_id = repo.treebuilder(None).unwrap().write().unwrap();
        let tree = repo.find_tree(tree_id).unwrap();
        for offset in [0, 120, -330, -0] {
            let author = Signature::new(
                "Alice Admin",
                "alice@example.com",
                &git2::Time::new(1_700_000_000, offset),
            )
            .unwrap();
            let committer = Signature::new(
                "bot",
                "bot@example.com",
                &git2::Time::new(1_700_000_001, -offset),
            )
            .unwrap();
            let message = "update cm\n\nbody\n\nReverser-Resource: v1/ConfigMap/ns/app\n";
            let root = repo
                .commit_create_buffer(&author, &committer, message, &tree, &[])
                .unwrap();
            assert_eq!(
                commit_object(tree_id, None, &author, &committer, message),
                root.as_ref()
            );
            let parent_id = repo
                .commit(None, &author, &committer, message, &tree, &[])
                .unwrap();
            let parent = repo.find_commit(parent_id).unwrap();
            let child = repo
                .commit_create_buffer(&author, &committer, "second", &tree, &[&parent])
                .unwrap();
            assert_eq!(
                commit_object(tree_id, Some(parent_id), &author, &committer, "second"),
                child.as_ref()
            );
        }
    }

    #[test]
    fn lost_races_are_told_apart_from_policy_refusals() {
        assert!(lost_race("non-fast-forward"));
        assert!(lost_race("failed to lock"));
        assert!(lost_race(
            "cannot lock ref 'refs/heads/main': is at 1 but expected 2"
        ));
        assert!(!lost_race("pre-receive hook declined"));
        assert!(!lost_race("protected branch hook declined"));
    }
}
