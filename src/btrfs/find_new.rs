//! The inodes of a subvolume that changed after a given transaction, with their names.
//!
//! `btrfs subvolume find-new` only reports EXTENT_DATA items, so it misses empty files,
//! directories, symlinks, renames and metadata changes, and prints one line per extent. Here
//! the same tree search (leaves written after the marker transaction, via `min_transid`) is
//! used to read INODE_ITEMs instead: an inode item carries the transaction that last wrote it,
//! so every created, written, renamed, linked, chmod-ed or chown-ed inode shows up once.
//! Names come from the INODE_REF / INODE_EXTREF items that follow each inode item in key
//! order; parents are resolved to paths with INO_LOOKUP, once per directory.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;

use anyhow::Result;

use super::tree::{
    self, ItemRef, SearchKey, DIR_INDEX_KEY, DIR_ITEM_KEY, INODE_ITEM_KEY, INODE_REF_KEY,
};

pub const INODE_EXTREF_KEY: u32 = 13;

/// The search buffer for the diff. 4 KiB holds about ten inodes' worth of items, so 100,000
/// new files would cost some 12,000 ioctls. Larger
/// buffers are not better: the kernel faults in the rest of the buffer once per leaf, and a
/// directory's entries fill it before the search can skip them. 8 to 32 KiB measured the same
/// (`cargo xtask bench diff`); 64 KiB and more were slower.
const SEARCH_V2_BUF: usize = 1 << 14;

const EXTENT_DATA_KEY: u32 = tree::EXTENT_DATA_KEY;
/// `sizeof(struct btrfs_inode_item)`.
const INODE_ITEM_SIZE: usize = 160;
/// `offsetof(struct btrfs_file_extent_item, disk_bytenr)`: where inline data starts.
const INLINE_DATA_START: usize = 21;
const FILE_EXTENT_INLINE: u8 = 0;

/// The fields of `struct btrfs_inode_item` that say whether an inode changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InodeItem {
    /// The transaction that created the inode.
    pub generation: u64,
    /// The last transaction that wrote the inode item.
    pub transid: u64,
    pub size: u64,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub ctime: (u64, u32),
    pub mtime: (u64, u32),
}

impl InodeItem {
    pub fn parse(data: &[u8]) -> Option<InodeItem> {
        if data.len() < INODE_ITEM_SIZE {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
        let u32_at = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
        // struct btrfs_timespec { __le64 sec; __le32 nsec; } is packed: 12 bytes.
        let time_at = |at: usize| (u64_at(at), u32_at(at + 8));
        Some(InodeItem {
            generation: u64_at(0),
            transid: u64_at(8),
            size: u64_at(16),
            nlink: u32_at(40),
            uid: u32_at(44),
            gid: u32_at(48),
            mode: u32_at(52),
            ctime: time_at(124),
            mtime: time_at(136),
        })
    }
}

/// One name of an inode: the directory that holds it, and where the name is in
/// [`Changed::bytes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NameAt {
    parent: u64,
    bytes: (usize, usize),
}

#[derive(Clone, Debug)]
pub struct ChangedInode {
    pub ino: u64,
    pub item: InodeItem,
    /// Its names: a range of [`Changed::names`].
    names: (usize, usize),
    /// For a symlink: where its target (stored inline in the tree) is in [`Changed::bytes`].
    symlink_target: Option<(usize, usize)>,
}

/// The changed inodes of one search. Their names and symlink targets live in two shared
/// buffers rather than in a few small allocations per inode: a large diff meets one new inode
/// per file, and allocating and freeing for each showed up as a tenth of its time.
#[derive(Default)]
pub struct Changed {
    pub inodes: Vec<ChangedInode>,
    names: Vec<NameAt>,
    bytes: Vec<u8>,
}

impl Changed {
    /// Each name of `inode`, as (directory inode, name).
    pub fn names<'a>(&'a self, inode: &ChangedInode) -> impl Iterator<Item = (u64, &'a [u8])> {
        self.names[inode.names.0..inode.names.1]
            .iter()
            .map(|n| (n.parent, &self.bytes[n.bytes.0..n.bytes.1]))
    }

    pub fn symlink_target(&self, inode: &ChangedInode) -> Option<&[u8]> {
        inode
            .symlink_target
            .map(|(start, end)| &self.bytes[start..end])
    }

    /// Empty, keeping the memory for the next search.
    pub fn clear(&mut self) {
        self.inodes.clear();
        self.names.clear();
        self.bytes.clear();
    }

    fn add_name(&mut self, parent: u64, name: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(name);
        self.names.push(NameAt {
            parent,
            bytes: (start, self.bytes.len()),
        });
    }

    /// Add the names in an INODE_REF or INODE_EXTREF item; returns the range of
    /// [`Changed::names`] they took.
    fn add_refs(&mut self, item: &ItemRef<'_>) -> (usize, usize) {
        let first = self.names.len();
        let data = item.data;
        match item.item_type {
            // struct btrfs_inode_ref { __le64 index; __le16 name_len; } name, repeated;
            // the parent is the key's offset.
            INODE_REF_KEY => {
                let mut pos = 0;
                while pos + 10 <= data.len() {
                    let len = u16::from_le_bytes([data[pos + 8], data[pos + 9]]) as usize;
                    let start = pos + 10;
                    let Some(name) = data.get(start..start + len) else {
                        break;
                    };
                    self.add_name(item.offset, name);
                    pos = start + len;
                }
            }
            // struct btrfs_inode_extref { __le64 parent; __le64 index; __le16 name_len; }
            // name, repeated (for inodes with more hard links in one directory than fit in
            // one ref).
            INODE_EXTREF_KEY => {
                let mut pos = 0;
                while pos + 18 <= data.len() {
                    let parent = u64::from_le_bytes(data[pos..pos + 8].try_into().unwrap());
                    let len = u16::from_le_bytes([data[pos + 16], data[pos + 17]]) as usize;
                    let start = pos + 18;
                    let Some(name) = data.get(start..start + len) else {
                        break;
                    };
                    self.add_name(parent, name);
                    pos = start + len;
                }
            }
            _ => {}
        }
        (first, self.names.len())
    }

    /// Add a symlink's target from its inline EXTENT_DATA item (btrfs_symlink always writes
    /// an uncompressed inline extent).
    fn add_symlink_target(&mut self, item: &ItemRef<'_>) -> Option<(usize, usize)> {
        let data = item.data;
        if data.len() < INLINE_DATA_START || data[20] != FILE_EXTENT_INLINE || data[16] != 0 {
            return None;
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&data[INLINE_DATA_START..]);
        Some((start, self.bytes.len()))
    }
}

pub fn is_symlink(mode: u32) -> bool {
    mode & nix::libc::S_IFMT == nix::libc::S_IFLNK
}

/// The inode numbers a search for changes covers: after the subvolume's top directory, and
/// below the objectids from -256 up, which are reserved (orphans, free-space cache and such).
const FIRST_INODE: u64 = super::FIRST_FREE_OBJECTID + 1;
const LAST_INODE: u64 = u64::MAX - 256;

/// The first objectid at or after `from` that has an item in a leaf written after `after`.
fn first_changed_from(
    fs: BorrowedFd<'_>,
    tree_id: u64,
    after: u64,
    from: u64,
) -> Result<Option<u64>> {
    let mut key = SearchKey::range(tree_id, (from, 0, 0), (LAST_INODE, u32::MAX, u64::MAX));
    key.min_transid = after.saturating_add(1);
    let mut first = None;
    tree::search(fs, key, 4096, |item| {
        first = Some(item.objectid);
        false
    })?;
    Ok(first)
}

/// Split the inodes that may have changed after `after` into about `parts` ranges of inode
/// numbers, so that several threads can search them at once: the kernel copies every item of
/// a changed leaf to user space one by one, and that copying is most of a diff's time.
/// Equal ranges of numbers are close to equal work because btrfs hands out inode numbers in
/// order of creation, so what changed since the blank is mostly one dense run of numbers.
/// Empty when nothing changed.
pub fn changed_ranges(
    fs: BorrowedFd<'_>,
    tree_id: u64,
    after: u64,
    parts: u64,
) -> Result<Vec<(u64, u64)>> {
    let Some(first) = first_changed_from(fs, tree_id, after, FIRST_INODE)? else {
        return Ok(Vec::new());
    };
    // The last such objectid, by bisection: each probe is one search that stops at the first
    // item, a few microseconds.
    let (mut low, mut high) = (first, LAST_INODE);
    while low < high {
        let middle = low + (high - low).div_ceil(2);
        match first_changed_from(fs, tree_id, after, middle)? {
            Some(found) => low = found,
            None => high = middle - 1,
        }
    }
    let last = low;
    let span = last - first + 1;
    let parts = parts.clamp(1, span);
    let step = span.div_ceil(parts);
    Ok((0..parts)
        .map(|i| first + i * step)
        .take_while(|&start| start <= last)
        .map(|start| (start, start.saturating_add(step - 1).min(last)))
        .collect())
}

/// Every inode numbered within `range` of subvolume `tree_id` whose inode item was written
/// after transaction `after` (unlinked inodes left out), into `changed` (emptied first).
pub fn changed_inodes(
    fs: BorrowedFd<'_>,
    tree_id: u64,
    after: u64,
    range: (u64, u64),
    changed: &mut Changed,
) -> Result<()> {
    let mut key = SearchKey::range(
        tree_id,
        (range.0.max(FIRST_INODE), 0, 0),
        (range.1.min(LAST_INODE), u32::MAX, u64::MAX),
    );
    key.min_transid = after.saturating_add(1);
    changed.clear();
    loop {
        // A directory's entries (DIR_ITEM, DIR_INDEX) come after its inode and refs and are
        // two thirds of a new tree's items, none of them needed here: at the first one, stop
        // and search again from the next inode. The buffer is kept small so that the kernel
        // has not copied much of them by then.
        let mut resume_at = None;
        tree::search(fs, key, SEARCH_V2_BUF, |item| {
            match item.item_type {
                INODE_ITEM_KEY => {
                    if let Some(inode) = InodeItem::parse(item.data) {
                        if inode.transid > after && inode.nlink > 0 {
                            let names_end = changed.names.len();
                            changed.inodes.push(ChangedInode {
                                ino: item.objectid,
                                item: inode,
                                names: (names_end, names_end),
                                symlink_target: None,
                            });
                        }
                    }
                }
                // Refs follow their inode item, so its names stay one contiguous range.
                INODE_REF_KEY | INODE_EXTREF_KEY
                    if changed
                        .inodes
                        .last()
                        .is_some_and(|c| c.ino == item.objectid) =>
                {
                    let (_, end) = changed.add_refs(item);
                    changed.inodes.last_mut().unwrap().names.1 = end;
                }
                DIR_ITEM_KEY | DIR_INDEX_KEY => {
                    resume_at = Some(item.objectid + 1);
                    return false;
                }
                EXTENT_DATA_KEY
                    if item.offset == 0
                        && changed
                            .inodes
                            .last()
                            .is_some_and(|c| c.ino == item.objectid && is_symlink(c.item.mode)) =>
                {
                    let target = changed.add_symlink_target(item);
                    changed.inodes.last_mut().unwrap().symlink_target = target;
                }
                _ => {}
            }
            true
        })?;
        match resume_at {
            Some(next) if next <= key.max_objectid => {
                key.min_objectid = next;
                key.min_type = 0;
                key.min_offset = 0;
            }
            _ => break,
        }
    }
    // An inode whose item changed but whose refs or symlink extent sit in a leaf that did not
    // change (a file written in place, a chmod) still needs them: look them up directly.
    for i in 0..changed.inodes.len() {
        let ChangedInode {
            ino,
            item,
            names,
            symlink_target,
        } = changed.inodes[i].clone();
        if names.0 == names.1 {
            let key = SearchKey::range(
                tree_id,
                (ino, INODE_REF_KEY, 0),
                (ino, INODE_EXTREF_KEY, u64::MAX),
            );
            let first = changed.names.len();
            tree::search(fs, key, 4096, |ref_item| {
                if ref_item.objectid == ino {
                    changed.add_refs(ref_item);
                }
                true
            })?;
            changed.inodes[i].names = (first, changed.names.len());
        }
        if is_symlink(item.mode) && symlink_target.is_none() {
            let key = SearchKey::range(
                tree_id,
                (ino, EXTENT_DATA_KEY, 0),
                (ino, EXTENT_DATA_KEY, 0),
            );
            let mut target = None;
            tree::search(fs, key, 4096, |extent| {
                target = changed.add_symlink_target(extent);
                false
            })?;
            changed.inodes[i].symlink_target = target;
        }
    }
    Ok(())
}

/// Directory paths inside one subvolume, resolved with INO_LOOKUP and remembered.
///
/// INO_LOOKUP answers in a fixed buffer of 4080 bytes and fails with ENAMETOOLONG beyond it;
/// those paths are built instead from each directory's INODE_REF (its parent and its name),
/// up to a directory whose path is known. A directory has exactly one name, so one ref each.
pub struct DirPaths<'fd> {
    fs: BorrowedFd<'fd>,
    tree_id: u64,
    known: HashMap<u64, Vec<u8>>,
}

impl<'fd> DirPaths<'fd> {
    pub fn new(fs: BorrowedFd<'fd>, tree_id: u64) -> Self {
        let mut known = HashMap::new();
        known.insert(super::FIRST_FREE_OBJECTID, Vec::new());
        DirPaths { fs, tree_id, known }
    }

    /// The path of directory `dir` from the subvolume's top: `/a/b`, or empty for the top.
    /// `None` when the directory no longer exists (deleted while the diff ran).
    pub fn get(&mut self, dir: u64) -> Result<Option<&[u8]>> {
        if !self.known.contains_key(&dir) {
            match tree::ino_lookup(self.fs, self.tree_id, dir) {
                Ok(mut path) => {
                    // INO_LOOKUP answers `a/b/`; rasa's paths are `/a/b`.
                    if path.last() == Some(&b'/') {
                        path.pop();
                    }
                    path.insert(0, b'/');
                    self.known.insert(dir, path);
                }
                Err(e) => match errno_of(&e) {
                    Some(nix::errno::Errno::ENAMETOOLONG) => {
                        if !self.resolve_by_refs(dir)? {
                            return Ok(None);
                        }
                    }
                    Some(nix::errno::Errno::ENOENT) => return Ok(None),
                    _ => return Err(e),
                },
            }
        }
        Ok(Some(&self.known[&dir]))
    }

    /// Climb INODE_REFs from `dir` to a directory whose path is known, then remember the path
    /// of every directory on the way. False when a directory on the way is gone.
    fn resolve_by_refs(&mut self, dir: u64) -> Result<bool> {
        let mut climbed: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut current = dir;
        while !self.known.contains_key(&current) {
            let Some((parent, name)) = directory_ref(self.fs, self.tree_id, current)? else {
                return Ok(false);
            };
            // Every step goes one level up a finite tree; a cycle would be a corrupt tree.
            anyhow::ensure!(
                climbed.len() < 1 << 20 && parent != current,
                "directory {dir} of subvolume {} has no path to its top (cycle at {current})",
                self.tree_id
            );
            climbed.push((current, name));
            current = parent;
        }
        for (ino, name) in climbed.into_iter().rev() {
            let mut path = self.known[&current].clone();
            path.push(b'/');
            path.extend_from_slice(&name);
            self.known.insert(ino, path);
            current = ino;
        }
        Ok(true)
    }
}

/// The errno under an error from an ioctl, if that is what it is.
fn errno_of(e: &anyhow::Error) -> Option<nix::errno::Errno> {
    e.chain()
        .find_map(|cause| cause.downcast_ref::<nix::errno::Errno>())
        .copied()
}

/// A directory's parent inode and its name there, from its INODE_REF; `None` when the
/// directory has none (it is gone).
fn directory_ref(fs: BorrowedFd<'_>, tree_id: u64, dir: u64) -> Result<Option<(u64, Vec<u8>)>> {
    let key = SearchKey::range(
        tree_id,
        (dir, INODE_REF_KEY, 0),
        (dir, INODE_REF_KEY, u64::MAX),
    );
    let mut found = None;
    tree::search(fs, key, 4096, |item| {
        if item.objectid == dir && item.item_type == INODE_REF_KEY {
            let mut names = Changed::default();
            names.add_refs(item);
            found = names
                .names
                .first()
                .map(|n| (n.parent, names.bytes[n.bytes.0..n.bytes.1].to_vec()));
        }
        false
    })?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_inode_ref_lists() {
        let mut data = Vec::new();
        for (index, name) in [(2u64, &b"a"[..]), (3, b"\xffbc")] {
            data.extend_from_slice(&index.to_le_bytes());
            data.extend_from_slice(&(name.len() as u16).to_le_bytes());
            data.extend_from_slice(name);
        }
        let item = ItemRef {
            objectid: 300,
            item_type: INODE_REF_KEY,
            offset: 256,
            data: &data,
        };
        let mut changed = Changed::default();
        let range = changed.add_refs(&item);
        let inode = ChangedInode {
            ino: 300,
            item: InodeItem::parse(&[0; INODE_ITEM_SIZE]).unwrap(),
            names: range,
            symlink_target: None,
        };
        assert_eq!(
            changed.names(&inode).collect::<Vec<_>>(),
            vec![(256, &b"a"[..]), (256, &b"\xffbc"[..])]
        );
    }
}
