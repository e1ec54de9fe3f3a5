//! `--git-mapped-pack-limit-mib` takes effect: libgit2 keeps at most that much of the clone's packs memory-mapped,
//! however much a push reads. Without the limit (libgit2's default is 8 GiB) every pack a push reads stays mapped, and
//! its pages count in the writer's resident memory.
//!
//! This file holds one test on purpose: the limit is process-wide and set once, and nextest runs each test binary's
//! tests in their own processes, but `cargo test` would share one between tests of the same file. With the limit
//! raised to libgit2's default, the same push leaves 81 MB of mappings of this clone's 66 MB of packs in place
//! and the assertion fails.

use std::path::Path;

use reverser_writer::git::{
    self, Clone, CommitMeta, FileChange, MappedPackLimit, NetworkTimeouts, PushOutcome, RepoSpec,
};
use testkit::BareRepo;

const LIMIT: usize = 8 << 20;
const FILE_BYTES: usize = 160 << 10;
const FILES_PER_COMMIT: usize = 50;
const COMMITS: usize = 8;

/// Incompressible bytes (xorshift), so the clone's packs are as large as their content.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Bytes of the memory mappings of `.pack` files under `dir`, from `/proc/self/maps`.
fn mapped_pack_bytes(dir: &Path) -> usize {
    let dir = dir.canonicalize().unwrap();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let path = fields.get(5)?;
            if !(path.starts_with(dir.to_str()?) && path.ends_with(".pack")) {
                return None;
            }
            let (start, end) = fields[0].split_once('-')?;
            Some(usize::from_str_radix(end, 16).ok()? - usize::from_str_radix(start, 16).ok()?)
        })
        .sum()
}

fn pack_bytes_on_disk(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("objects/pack"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .map(|p| p.metadata().unwrap().len())
        .sum()
}

#[test]
fn a_push_that_reads_every_object_keeps_at_most_the_limit_of_packs_mapped() {
    let limit = MappedPackLimit { total: LIMIT };
    git::set_process_options(
        NetworkTimeouts {
            connect: std::time::Duration::from_secs(10),
            io: std::time::Duration::from_secs(20),
            operation: std::time::Duration::from_secs(300),
        },
        limit,
    )
    .unwrap();

    let remote = BareRepo::new();
    let dir = tempfile::tempdir().unwrap();
    let clone_dir = dir.path().join("clone");
    let mut clone =
        Clone::open_or_init(&clone_dir, RepoSpec::new(remote.file_url(), "main")).unwrap();
    clone.fetch().unwrap();
    let mut tip = clone.base();
    for commit in 0..COMMITS {
        let changes: Vec<_> = (0..FILES_PER_COMMIT)
            .map(|i| {
                let n = commit * FILES_PER_COMMIT + i;
                FileChange::write(format!("data/file-{n:04}.bin"), noise(n as u64, FILE_BYTES))
            })
            .collect();
        let meta = CommitMeta {
            author_name: "test".into(),
            author_email: "test@example.com".into(),
            committer_name: "test".into(),
            committer_email: "test@example.com".into(),
            message: format!("batch {commit}"),
        };
        tip = Some(clone.commit(tip, &changes, &meta).unwrap());
    }
    // One push of everything: libgit2's pack builder reads every object of the clone's packs.
    assert_eq!(clone.push(tip.unwrap()).unwrap(), PushOutcome::Pushed);
    assert_eq!(remote.ls_tree("main").len(), COMMITS * FILES_PER_COMMIT);

    let on_disk = pack_bytes_on_disk(&clone_dir);
    assert!(
        on_disk > 4 * LIMIT as u64,
        "the clone's packs ({on_disk} B) must be well above the limit for this test to mean anything"
    );
    let mapped = mapped_pack_bytes(&clone_dir);
    eprintln!(
        "clone packs {on_disk} B on disk, {mapped} B mapped after the push (limit {LIMIT} B, window {} B)",
        limit.window()
    );
    // libgit2 unmaps least recently used windows before mapping a new one above the limit; the window in use is the
    // only excess it allows.
    assert!(
        mapped <= LIMIT + limit.window(),
        "{mapped} B of packs mapped after the push, above the {LIMIT} B limit plus one {} B window",
        limit.window()
    );
    drop(clone);
}
