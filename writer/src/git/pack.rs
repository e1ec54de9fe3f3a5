//! Pack files written by the writer itself: new objects go to disk as one pack per commit, and small
//! packs are merged so that their number stays bounded.
//!
//! Why not libgit2's own writers (measured, see `benches/seed.rs`):
//! - Loose objects cost one file creation each (plus a directory now and then): on the ext4 volume
//!   measured, creating files was ~40 % of the seeding time (one new inode cost ~1 ms there), and
//!   every later lookup pays for the number of files.
//! - libgit2 can only produce packs through its pack builder, which deflates at the default zlib
//!   level and (unless tricked by configuration) searches for deltas; neither pays off for a clone
//!   whose objects are read back a handful of times and re-compressed by the push anyway.
//!
//! So this module writes standard version-2 packs and indexes whose objects are zlib streams made of
//! *stored* (uncompressed) deflate blocks: valid for every git implementation, nearly free to write
//! and to read, at the price of disk space (the raw size of the content; compressing them at zlib level 1
//! halved the clone but doubled the time of a one-file commit, see the README's Benchmarks). These packs stay in the
//! clone: a push, local or over the network, sends the new objects in a pack built by libgit2,
//! zlib- and delta-compressed like any git client's. Object ids are computed by libgit2 (SHA-1 with collision
//! detection); the pack and index checksums (RustCrypto's `sha1`, SHA-NI where the CPU has it), CRC-32 and Adler-32
//! are computed here.
//!
//! Merging copies entries byte for byte (their CRC-32 comes along from the source index); entries
//! stored as deltas (packs fetched from the remote) are expanded through the object database, so a
//! merged pack never depends on the order of its entries and duplicates can simply be dropped.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use git2::{ObjectType, Oid, Repository};
use sha1::{Digest as _, Sha1};

/// A pack under construction: the objects of one commit.
#[derive(Default)]
pub(crate) struct NewPack {
    objects: Vec<(ObjectType, Oid, Vec<u8>)>,
    ids: HashSet<Oid>,
}

impl NewPack {
    /// Adds an object; returns its id. Adding the same object twice stores it once.
    pub(crate) fn add(&mut self, kind: ObjectType, data: Vec<u8>) -> Result<Oid, git2::Error> {
        let id = Oid::hash_object(kind, &data)?;
        if self.ids.insert(id) {
            self.objects.push((kind, id, data));
        }
        Ok(id)
    }

    /// Writes `pack-<checksum>.pack` and `.idx` into `pack_dir` (the `.idx` last: readers only see a
    /// pack once its index exists); returns the path of the `.pack`.
    pub(crate) fn write(self, pack_dir: &Path) -> std::io::Result<PathBuf> {
        let mut out = PackOut::create(pack_dir, self.objects.len())?;
        for (kind, id, data) in &self.objects {
            out.stored_object(*id, type_code(*kind), data)?;
        }
        out.finish()
    }
}

fn type_code(kind: ObjectType) -> u8 {
    match kind {
        ObjectType::Commit => 1,
        ObjectType::Tree => 2,
        ObjectType::Blob => 3,
        ObjectType::Tag => 4,
        _ => unreachable!("only commits, trees, blobs and tags are stored"),
    }
}

/// Removes what an interrupted pack write left in the clone's `pack_dir` (a process killed while
/// writing): our temporary files, and packs whose index never appeared (readers ignore those).
/// Only called on the writer's own clone, while this process is its only writer.
pub(crate) fn remove_temporary_files(pack_dir: &Path) {
    let Ok(entries) = fs::read_dir(pack_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let orphan_pack = name.starts_with("pack-")
            && path.extension().is_some_and(|e| e == "pack")
            && !path.with_extension("idx").exists();
        if name.starts_with(TMP_PREFIX) || orphan_pack {
            let _ = fs::remove_file(&path);
        }
    }
}

const TMP_PREFIX: &str = "tmp_pack_reverser_";

/// Streams a pack to a temporary file, then writes its index and renames both into place.
struct PackOut {
    dir: PathBuf,
    tmp: PathBuf,
    file: BufWriter<File>,
    sha: Sha1,
    offset: u64,
    count: u32,
    declared: u32,
    entries: Vec<IdxEntry>,
    scratch: Vec<u8>,
    /// Set once the pack and its index are in place; otherwise `Drop` removes the temporary files.
    done: bool,
}

impl Drop for PackOut {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
            let _ = fs::remove_file(self.tmp.with_extension("idx"));
        }
    }
}

#[derive(Clone, Copy)]
struct IdxEntry {
    id: Oid,
    crc: u32,
    offset: u64,
}

impl PackOut {
    fn create(dir: &Path, count: usize) -> std::io::Result<PackOut> {
        let declared = u32::try_from(count)
            .map_err(|_| std::io::Error::other("too many objects for one pack"))?;
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(
            "{TMP_PREFIX}{}_{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        // Readable too: a pack that ends up with fewer objects than announced is read back to
        // recompute its checksum (see `finish_inner`).
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let file = BufWriter::with_capacity(256 * 1024, file);
        let mut out = PackOut {
            dir: dir.to_owned(),
            tmp,
            file,
            sha: Sha1::new(),
            offset: 0,
            count: 0,
            declared,
            entries: Vec::with_capacity(count),
            scratch: Vec::new(),
            done: false,
        };
        let mut header = Vec::with_capacity(12);
        header.extend_from_slice(b"PACK");
        header.extend_from_slice(&2u32.to_be_bytes());
        header.extend_from_slice(&declared.to_be_bytes());
        out.put(&header)?;
        Ok(out)
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.sha.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Appends one object as a non-delta entry whose data is a zlib stream of stored blocks.
    fn stored_object(&mut self, id: Oid, type_code: u8, data: &[u8]) -> std::io::Result<()> {
        let mut entry = std::mem::take(&mut self.scratch);
        entry.clear();
        entry_header(&mut entry, type_code, data.len() as u64);
        zlib_stored(&mut entry, data);
        let crc = crc32(&entry);
        self.raw_entry(id, crc, &entry)?;
        self.scratch = entry;
        Ok(())
    }

    /// Appends an entry copied verbatim (header and zlib data), with its known CRC-32.
    fn raw_entry(&mut self, id: Oid, crc: u32, bytes: &[u8]) -> std::io::Result<()> {
        self.entries.push(IdxEntry {
            id,
            crc,
            offset: self.offset,
        });
        self.count += 1;
        self.put(bytes)
    }

    fn finish(mut self) -> std::io::Result<PathBuf> {
        let result = self.finish_inner();
        self.done = result.is_ok();
        result
    }

    fn finish_inner(&mut self) -> std::io::Result<PathBuf> {
        if self.count != self.declared {
            // Callers announce exactly the distinct objects they write; should one ever write
            // fewer, the header is rewritten, which needs the checksum recomputed from the file.
            self.file.flush()?;
            let file = self.file.get_ref();
            file.write_all_at(&self.count.to_be_bytes(), 8)?;
            self.sha = Sha1::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0u64;
            while at < self.offset {
                let n = (self.offset - at).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], at)?;
                self.sha.update(&buf[..n]);
                at += n as u64;
            }
        }
        let checksum: [u8; 20] = std::mem::replace(&mut self.sha, Sha1::new())
            .finalize()
            .into();
        self.file.write_all(&checksum)?;
        self.file.flush()?;
        let name = hex::encode(checksum);
        let pack = self.dir.join(format!("pack-{name}.pack"));
        let idx = self.dir.join(format!("pack-{name}.idx"));
        let idx_tmp = self.tmp.with_extension("idx");
        self.entries.sort_unstable_by_key(|e| e.id);
        write_idx(&idx_tmp, &self.entries, &checksum)?;
        set_read_only(&self.tmp)?;
        set_read_only(&idx_tmp)?;
        fs::rename(&self.tmp, &pack)?;
        fs::rename(&idx_tmp, &idx)?;
        Ok(pack)
    }
}

fn set_read_only(path: &Path) -> std::io::Result<()> {
    let mut permissions = fs::metadata(path)?.permissions();
    permissions.set_readonly(true);
    fs::set_permissions(path, permissions)
}

/// Pack entry header: type and size, 4 + 7n bits.
fn entry_header(out: &mut Vec<u8>, type_code: u8, mut size: u64) {
    let mut byte = (type_code << 4) | (size & 0x0f) as u8;
    size >>= 4;
    while size > 0 {
        out.push(byte | 0x80);
        byte = (size & 0x7f) as u8;
        size >>= 7;
    }
    out.push(byte);
}

/// A zlib stream of stored deflate blocks (RFC 1950/1951), no compression.
fn zlib_stored(out: &mut Vec<u8>, data: &[u8]) {
    out.reserve(data.len() + 6 + 5 * (data.len() / 0xffff + 1));
    out.extend_from_slice(&[0x78, 0x01]);
    let mut chunks = data.chunks(0xffff).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let len = chunk.len() as u16;
        out.push(u8::from(last));
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&adler32(data).to_be_bytes());
}

fn write_idx(path: &Path, entries: &[IdxEntry], pack_checksum: &[u8; 20]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(8 + 1024 + entries.len() * 28 + 40);
    out.extend_from_slice(&[0xff, b't', b'O', b'c']);
    out.extend_from_slice(&2u32.to_be_bytes());
    let mut fanout = [0u32; 256];
    for e in entries {
        fanout[usize::from(e.id.as_bytes()[0])] += 1;
    }
    let mut total = 0u32;
    for count in fanout {
        total += count;
        out.extend_from_slice(&total.to_be_bytes());
    }
    for e in entries {
        out.extend_from_slice(e.id.as_bytes());
    }
    for e in entries {
        out.extend_from_slice(&e.crc.to_be_bytes());
    }
    let mut large = Vec::new();
    for e in entries {
        let small = if e.offset < 0x8000_0000 {
            e.offset as u32
        } else {
            large.push(e.offset);
            0x8000_0000 | (large.len() as u32 - 1)
        };
        out.extend_from_slice(&small.to_be_bytes());
    }
    for offset in large {
        out.extend_from_slice(&offset.to_be_bytes());
    }
    out.extend_from_slice(pack_checksum);
    let checksum = Sha1::digest(&out);
    out.extend_from_slice(&checksum);
    fs::write(path, out)
}

/// A pack on disk, as listed for merging.
#[derive(Debug, Clone)]
pub(crate) struct PackInfo {
    /// `.../pack-<hex>` without extension.
    pub(crate) stem: PathBuf,
    pub(crate) bytes: u64,
}

/// Packs in `pack_dir` that may be merged: those with an index, without a `.keep` file.
pub(crate) fn list_packs(pack_dir: &Path) -> std::io::Result<Vec<PackInfo>> {
    let mut packs = Vec::new();
    let entries = match fs::read_dir(pack_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(packs),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "idx") {
            continue;
        }
        let stem = path.with_extension("");
        if stem.with_extension("keep").exists() {
            continue;
        }
        if let Ok(meta) = fs::metadata(stem.with_extension("pack")) {
            packs.push(PackInfo {
                stem,
                bytes: meta.len(),
            });
        }
    }
    Ok(packs)
}

/// Size-tiered merge policy: packs are grouped in tiers of `FANOUT`x growing size (below 2 MiB,
/// 16 MiB, 128 MiB); when a tier holds `FANOUT` packs, it is merged (with every smaller pack)
/// into one. Each byte is thus copied about once per tier, and there are at most `FANOUT - 1`
/// packs per tier plus the large ones: ~21 packs, each of which libgit2 keeps a file descriptor
/// open for once it has read from it. A larger fanout copies less (16: ~20 % less while seeding
/// 100,000 objects) but allows twice as many packs and descriptors per clone.
pub(crate) const FANOUT: u64 = 8;
const TIER_BASE: u64 = 256 * 1024;
/// Packs at least this big (128 MiB) are never merged: one per ~this many bytes of new objects.
const LARGE: u64 = TIER_BASE * FANOUT * FANOUT * FANOUT;

fn tier(bytes: u64) -> u32 {
    let mut tier = 0;
    let mut limit = TIER_BASE * FANOUT;
    while bytes >= limit && limit < LARGE {
        tier += 1;
        limit *= FANOUT;
    }
    tier
}

/// The packs the policy merges now, if any.
pub(crate) fn merge_candidates(packs: &[PackInfo]) -> Vec<PackInfo> {
    let small: Vec<&PackInfo> = packs.iter().filter(|p| p.bytes < LARGE).collect();
    let mut per_tier = std::collections::BTreeMap::<u32, usize>::new();
    for p in &small {
        *per_tier.entry(tier(p.bytes)).or_default() += 1;
    }
    let Some((&full, _)) = per_tier.iter().rev().find(|&(_, &n)| n as u64 >= FANOUT) else {
        return Vec::new();
    };
    small
        .into_iter()
        .filter(|p| tier(p.bytes) <= full)
        .cloned()
        .collect()
}

/// Merges `packs` into one new pack in `pack_dir`, then deletes them. `repo` resolves entries stored
/// as deltas. The caller must reopen its repository afterwards (libgit2 keeps the old packs open).
pub(crate) fn merge(repo: &Repository, pack_dir: &Path, packs: &[PackInfo]) -> std::io::Result<()> {
    if packs.len() < 2 {
        return Ok(());
    }
    let mut sources = Vec::new();
    // Objects that recur (a value set back, a folder filled again) sit in several packs: count
    // each once, so the header announces exactly what the merged pack holds.
    let mut distinct: HashSet<Oid> = HashSet::new();
    for pack in packs {
        let index = match Idx::read(&pack.stem.with_extension("idx")) {
            Ok(index) => index,
            // Not a version-2 index we understand: leave that pack alone.
            Err(_) => continue,
        };
        distinct.extend(index.entries.iter().map(|e| e.id));
        sources.push((pack, index));
    }
    let total = distinct.len();
    drop(distinct);
    if sources.len() < 2 {
        return Ok(());
    }
    let odb = repo.odb().map_err(std::io::Error::other)?;
    let mut out = PackOut::create(pack_dir, total)?;
    let mut seen: HashSet<Oid> = HashSet::with_capacity(total);
    let mut buf = Vec::new();
    for (pack, index) in &sources {
        let file = File::open(pack.stem.with_extension("pack"))?;
        let end_of_data = file.metadata()?.len().saturating_sub(20);
        let mut by_offset = index.entries.clone();
        by_offset.sort_unstable_by_key(|e| e.offset);
        for (i, entry) in by_offset.iter().enumerate() {
            if !seen.insert(entry.id) {
                continue;
            }
            let end = by_offset.get(i + 1).map_or(end_of_data, |next| next.offset);
            let len = end
                .checked_sub(entry.offset)
                .ok_or_else(|| std::io::Error::other("corrupt pack index"))?;
            buf.resize(len as usize, 0);
            file.read_exact_at(&mut buf, entry.offset)?;
            let type_code = buf.first().map_or(0, |b| (b >> 4) & 7);
            if (1..=4).contains(&type_code) {
                out.raw_entry(entry.id, entry.crc, &buf)?;
            } else {
                let object = odb.read(entry.id).map_err(std::io::Error::other)?;
                let code = type_code_of(object.kind());
                out.stored_object(entry.id, code, object.data())?;
            }
        }
    }
    out.finish()?;
    for (pack, _) in &sources {
        // Index first: from then on nobody opens the pack.
        for ext in ["idx", "pack", "rev", "bitmap", "mtimes"] {
            let _ = fs::remove_file(pack.stem.with_extension(ext));
        }
    }
    Ok(())
}

fn type_code_of(kind: ObjectType) -> u8 {
    match kind {
        ObjectType::Commit => 1,
        ObjectType::Tree => 2,
        ObjectType::Tag => 4,
        _ => 3,
    }
}

/// A version-2 pack index, read whole.
struct Idx {
    entries: Vec<IdxEntry>,
}

impl Idx {
    fn read(path: &Path) -> std::io::Result<Idx> {
        let data = fs::read(path)?;
        let bad = || std::io::Error::other(format!("unsupported pack index {}", path.display()));
        if data.len() < 8 + 1024 + 40
            || data[..4] != [0xff, b't', b'O', b'c']
            || be32(&data, 4) != 2
        {
            return Err(bad());
        }
        let n = be32(&data, 8 + 255 * 4) as usize;
        let ids = 8 + 1024;
        let crcs = ids + 20 * n;
        let offsets = crcs + 4 * n;
        let large = offsets + 4 * n;
        if data.len() < large + 40 {
            return Err(bad());
        }
        let mut entries = Vec::with_capacity(n);
        for i in 0..n {
            let id = Oid::from_bytes(&data[ids + 20 * i..ids + 20 * (i + 1)])
                .map_err(std::io::Error::other)?;
            let small = be32(&data, offsets + 4 * i);
            let offset = if small & 0x8000_0000 == 0 {
                u64::from(small)
            } else {
                let at = large + 8 * (small & 0x7fff_ffff) as usize;
                let bytes = data.get(at..at + 8).ok_or_else(bad)?;
                u64::from_be_bytes(bytes.try_into().expect("8 bytes"))
            };
            entries.push(IdxEntry {
                id,
                crc: be32(&data, crcs + 4 * i),
                offset,
            });
        }
        Ok(Idx { entries })
    }
}

fn be32(data: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(data[at..at + 4].try_into().expect("4 bytes"))
}

// ---------------------------------------------------------------------------------------------
// Checksums. SHA-1 here only checksums files (pack and index trailers); object ids come from
// libgit2's collision-detecting SHA-1.

fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 bytes is the most that cannot overflow u32 before the modulo.
    for chunk in data.chunks(5552) {
        for &byte in chunk {
            a += u32::from(byte);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

/// CRC-32 (IEEE, as in zlib and pack indexes), slicing by 8 bytes.
const fn crc_tables() -> [[u32; 256]; 8] {
    let mut tables = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        tables[0][i] = c;
        i += 1;
    }
    let mut t = 1;
    while t < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = tables[t - 1][i];
            tables[t][i] = (prev >> 8) ^ tables[0][(prev & 0xff) as usize];
            i += 1;
        }
        t += 1;
    }
    tables
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

fn crc32(data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut c = !0u32;
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let lo = u32::from_le_bytes(chunk[..4].try_into().expect("4 bytes")) ^ c;
        let hi = u32::from_le_bytes(chunk[4..].try_into().expect("4 bytes"));
        c = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &byte in chunks.remainder() {
        c = t[0][((c ^ u32::from(byte)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_and_adler32_match_known_values() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        // Every length around the 8-byte stride.
        let data: Vec<u8> = (0..=255u8).cycle().take(300).collect();
        let bitwise = |d: &[u8]| {
            let mut c = !0u32;
            for &b in d {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        0xedb8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        };
        for len in 0..40 {
            assert_eq!(crc32(&data[..len]), bitwise(&data[..len]), "{len}");
        }
        assert_eq!(crc32(&data), bitwise(&data));
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
        assert_eq!(adler32(b""), 1);
    }

    #[test]
    fn entry_headers_encode_type_and_size() {
        let mut out = Vec::new();
        entry_header(&mut out, 3, 10);
        assert_eq!(out, [0x3a]);
        out.clear();
        entry_header(&mut out, 1, 300);
        // 300 = 0b1_0010_1100: low 4 bits 1100, then 10010.
        assert_eq!(out, [0x80 | 0x10 | 0x0c, 0x12]);
    }

    #[test]
    fn a_pack_with_fewer_objects_than_announced_gets_a_consistent_header() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = PackOut::create(dir.path(), 3).unwrap();
        let data = b"kind: ConfigMap\n";
        let id = Oid::hash_object(ObjectType::Blob, data).unwrap();
        out.stored_object(id, 3, data).unwrap();
        let pack = out.finish().unwrap();
        let bytes = fs::read(&pack).unwrap();
        assert_eq!(be32(&bytes, 8), 1, "object count in the header");
        let (body, trailer) = bytes.split_at(bytes.len() - 20);
        assert_eq!(Sha1::digest(body).as_slice(), trailer);
        let index = Idx::read(&pack.with_extension("idx")).unwrap();
        assert_eq!(index.entries.len(), 1);
        assert_eq!(index.entries[0].id, id);
    }

    #[test]
    fn tiers_grow_by_the_fanout() {
        assert_eq!(tier(0), 0);
        assert_eq!(tier(TIER_BASE * FANOUT - 1), 0);
        assert_eq!(tier(TIER_BASE * FANOUT), 1);
        let packs: Vec<PackInfo> = (0..FANOUT)
            .map(|i| PackInfo {
                stem: PathBuf::from(format!("p{i}")),
                bytes: 1000,
            })
            .collect();
        assert_eq!(merge_candidates(&packs[..FANOUT as usize - 1]).len(), 0);
        assert_eq!(merge_candidates(&packs).len(), FANOUT as usize);
        let mut with_large = packs.clone();
        with_large.push(PackInfo {
            stem: PathBuf::from("large"),
            bytes: LARGE,
        });
        assert_eq!(merge_candidates(&with_large).len(), FANOUT as usize);
    }
}
