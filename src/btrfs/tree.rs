//! TREE_SEARCH_V2 and INO_LOOKUP: reading btrfs metadata trees directly.
//!
//! Both need CAP_SYS_ADMIN. rasa uses them where it must not depend on paths: to find the
//! child subvolumes of a subvolume by id (pruning), and to walk the items of a subvolume's tree
//! (diff).

use std::os::fd::{AsRawFd, BorrowedFd};

use anyhow::{Context, Result};

pub const ROOT_TREE_OBJECTID: u64 = 1;
pub const ROOT_REF_KEY: u32 = 156;
pub const INODE_ITEM_KEY: u32 = 1;
pub const INODE_REF_KEY: u32 = 12;
pub const DIR_ITEM_KEY: u32 = 84;
pub const DIR_INDEX_KEY: u32 = 96;
pub const EXTENT_DATA_KEY: u32 = 108;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SearchKey {
    pub tree_id: u64,
    pub min_objectid: u64,
    pub max_objectid: u64,
    pub min_offset: u64,
    pub max_offset: u64,
    pub min_transid: u64,
    pub max_transid: u64,
    pub min_type: u32,
    pub max_type: u32,
    pub nr_items: u32,
    unused: u32,
    unused1: u64,
    unused2: u64,
    unused3: u64,
    unused4: u64,
}

#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

const _: () = assert!(std::mem::size_of::<SearchKey>() == 104);
const _: () = assert!(std::mem::size_of::<InoLookupArgs>() == 4096);

mod ioctl {
    use super::*;
    nix::ioctl_readwrite!(tree_search_v2, 0x94, 17, SearchArgsV2Header);
    nix::ioctl_readwrite!(ino_lookup, 0x94, 18, InoLookupArgs);
}

impl SearchKey {
    /// Every item of `tree_id` with `min <= (objectid, type, offset) <= max`, any transid.
    pub fn range(tree_id: u64, min: (u64, u32, u64), max: (u64, u32, u64)) -> Self {
        SearchKey {
            tree_id,
            min_objectid: min.0,
            min_type: min.1,
            min_offset: min.2,
            max_objectid: max.0,
            max_type: max.1,
            max_offset: max.2,
            min_transid: 0,
            max_transid: u64::MAX,
            ..Default::default()
        }
    }
}

#[repr(C)]
struct SearchArgsV2Header {
    key: SearchKey,
    buf_size: u64,
}

const _: () = assert!(std::mem::size_of::<SearchArgsV2Header>() == 112);

/// One item, borrowed from the search buffer.
pub struct ItemRef<'a> {
    pub objectid: u64,
    pub item_type: u32,
    pub offset: u64,
    pub data: &'a [u8],
}

/// Visit every item in the key range, in key order; `visit` returns false to stop early.
///
/// The kernel fills a buffer of `buf_len` bytes (at least 4 KiB) per call; the next call
/// continues from the key after the last one returned (the usual btrfs-progs loop, with the
/// (objectid, type, offset) carry). Each item is lent from the buffer, not copied: the diff of
/// a large tree reads hundreds of thousands of them. Note that TREE_SEARCH's min/max type and
/// offset bound the whole key lexicographically, not each field separately, so callers filter
/// types themselves where the range spans objects.
pub fn search(
    fs: BorrowedFd<'_>,
    key: SearchKey,
    buf_len: usize,
    mut visit: impl FnMut(&ItemRef<'_>) -> bool,
) -> Result<()> {
    let header_len = std::mem::size_of::<SearchArgsV2Header>();
    // u64 storage keeps the header aligned.
    let buf_len = buf_len.max(4096);
    let mut storage = vec![0u64; (header_len + buf_len).div_ceil(8)];
    let base = storage.as_mut_ptr() as *mut u8;
    let mut next = key;
    loop {
        next.nr_items = u32::MAX;
        // SAFETY: `storage` starts with a properly aligned header followed by buf_len
        // bytes, which is what buf_size tells the kernel it may write.
        let header = unsafe { &mut *(base as *mut SearchArgsV2Header) };
        header.key = next;
        header.buf_size = buf_len as u64;
        unsafe { ioctl::tree_search_v2(fs.as_raw_fd(), header) }
            .context("btrfs tree search (v2)")?;
        let found = header.key.nr_items;
        if found == 0 {
            return Ok(());
        }
        // SAFETY: the buffer part of `storage`, initialised (zeroed, then written by the kernel).
        let buf = unsafe { std::slice::from_raw_parts(base.add(header_len) as *const u8, buf_len) };
        let mut pos = 0usize;
        let mut last = (0u64, 0u32, 0u64);
        for _ in 0..found {
            let h = &buf[pos..pos + 32];
            let objectid = u64::from_ne_bytes(h[8..16].try_into().unwrap());
            let offset = u64::from_ne_bytes(h[16..24].try_into().unwrap());
            let item_type = u32::from_ne_bytes(h[24..28].try_into().unwrap());
            let len = u32::from_ne_bytes(h[28..32].try_into().unwrap()) as usize;
            pos += 32;
            let item = ItemRef {
                objectid,
                item_type,
                offset,
                data: &buf[pos..pos + len],
            };
            pos += len;
            last = (objectid, item_type, offset);
            if !visit(&item) {
                return Ok(());
            }
        }
        if !next.continue_after(last) {
            return Ok(());
        }
    }
}
impl SearchKey {
    /// Move the lower bound just past `last`, the last key a search returned; false when
    /// nothing can follow it within the upper bound.
    pub fn continue_after(&mut self, last: (u64, u32, u64)) -> bool {
        let (mut objectid, mut item_type, mut offset) = last;
        if offset < u64::MAX {
            offset += 1;
        } else if item_type < u32::MAX {
            item_type += 1;
            offset = 0;
        } else if objectid < u64::MAX {
            objectid += 1;
            item_type = 0;
            offset = 0;
        } else {
            return false;
        }
        if (objectid, item_type, offset) > (self.max_objectid, self.max_type, self.max_offset) {
            return false;
        }
        self.min_objectid = objectid;
        self.min_type = item_type;
        self.min_offset = offset;
        true
    }
}

/// A child subvolume, from a ROOT_REF item of its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildRef {
    pub id: u64,
    /// Inode number, inside the parent subvolume, of the directory that holds the child.
    pub dirid: u64,
    pub name: Vec<u8>,
}

/// The direct child subvolumes of subvolume `parent_id`, found by id in the root tree: no path
/// is involved, so a directory renamed or replaced by a symlink cannot redirect the search.
pub fn child_subvolumes(fs: BorrowedFd<'_>, parent_id: u64) -> Result<Vec<ChildRef>> {
    let key = SearchKey::range(
        ROOT_TREE_OBJECTID,
        (parent_id, ROOT_REF_KEY, 0),
        (parent_id, ROOT_REF_KEY, u64::MAX),
    );
    let mut children = Vec::new();
    search(fs, key, 4096, |item| {
        if item.objectid == parent_id && item.item_type == ROOT_REF_KEY && item.data.len() >= 18 {
            // struct btrfs_root_ref { __le64 dirid; __le64 sequence; __le16 name_len; } name
            let dirid = u64::from_le_bytes(item.data[0..8].try_into().unwrap());
            let name_len = u16::from_le_bytes(item.data[16..18].try_into().unwrap()) as usize;
            let name = item.data[18..(18 + name_len).min(item.data.len())].to_vec();
            children.push(ChildRef {
                id: item.offset,
                dirid,
                name,
            });
        }
        true
    })?;
    Ok(children)
}

/// Every subvolume below `top_id`, children after their descendants (the order deletion needs).
pub fn descendants_depth_first(fs: BorrowedFd<'_>, top_id: u64) -> Result<Vec<u64>> {
    let mut order = Vec::new();
    // An explicit stack: nesting depth is up to the user (or Docker), not to our call stack.
    let mut stack = vec![(top_id, false)];
    while let Some((id, expanded)) = stack.pop() {
        if expanded {
            if id != top_id {
                order.push(id);
            }
            continue;
        }
        stack.push((id, true));
        for child in child_subvolumes(fs, id)? {
            stack.push((child.id, false));
        }
    }
    Ok(order)
}

/// The path of directory inode `dirid` inside subvolume `tree_id`, relative to the subvolume's
/// top and ending in '/', or empty for the top itself.
pub fn ino_lookup(fs: BorrowedFd<'_>, tree_id: u64, dirid: u64) -> Result<Vec<u8>> {
    // SAFETY: all-zero is a valid InoLookupArgs.
    let mut args: Box<InoLookupArgs> = unsafe { Box::new(std::mem::zeroed()) };
    args.treeid = tree_id;
    args.objectid = dirid;
    // SAFETY: args is valid; the kernel writes a NUL-terminated path into `name`.
    unsafe { ioctl::ino_lookup(fs.as_raw_fd(), &mut *args) }.context("btrfs inode lookup")?;
    let end = args
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(args.name.len());
    Ok(args.name[..end].to_vec())
}
