//! `FS_IOC_FIEMAP`: where a file's data lies on disk, so that a comparison can tell two files
//! share an extent (a reflink) without reading it.
//!
//! Not btrfs-specific (ext4 and XFS answer it too), but it is an ioctl with a kernel struct, so
//! it lives here with the others (`include/uapi/linux/fiemap.h`). On btrfs the "physical"
//! address is btrfs's logical address, which is what two reflinked files have in common.

use std::os::fd::{AsRawFd, BorrowedFd};

/// The extent's data is not (yet) at a known place: delayed allocation, or unknown.
pub const EXTENT_UNKNOWN: u32 = 0x0002;
pub const EXTENT_DELALLOC: u32 = 0x0004;
/// Compressed (btrfs) or otherwise encoded: the physical address is that of the whole encoded
/// extent, so two files can name the same address for different parts of it.
pub const EXTENT_ENCODED: u32 = 0x0008;
pub const EXTENT_DATA_ENCRYPTED: u32 = 0x0080;
pub const EXTENT_NOT_ALIGNED: u32 = 0x0100;
pub const EXTENT_DATA_INLINE: u32 = 0x0200;
pub const EXTENT_DATA_TAIL: u32 = 0x0400;
/// Allocated but never written (reads as zeros).
pub const EXTENT_UNWRITTEN: u32 = 0x0800;
const EXTENT_LAST: u32 = 0x0001;
/// Write dirty data back first, so delayed allocations get their place.
const FLAG_SYNC: u32 = 0x0001;

/// Flags under which equal physical addresses do not prove equal bytes.
pub const NOT_PLAIN: u32 = EXTENT_UNKNOWN
    | EXTENT_DELALLOC
    | EXTENT_ENCODED
    | EXTENT_DATA_ENCRYPTED
    | EXTENT_NOT_ALIGNED
    | EXTENT_DATA_INLINE
    | EXTENT_DATA_TAIL
    | EXTENT_UNWRITTEN;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct FiemapHeader {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
}

const BATCH: usize = 256;

/// The header and room for `BATCH` extents, as the kernel fills them in.
#[repr(C)]
struct Fiemap {
    header: FiemapHeader,
    extents: [FiemapExtent; BATCH],
}

const _: () = assert!(std::mem::size_of::<FiemapHeader>() == 32);
const _: () = assert!(std::mem::size_of::<FiemapExtent>() == 56);

nix::ioctl_readwrite!(fs_ioc_fiemap, b'f', 11, FiemapHeader);

/// One extent of a file: `length` bytes at file offset `logical` are at `physical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

/// The extents of the first `size` bytes of an open file, in file order (holes are simply not
/// listed). Dirty data is written back first (`FIEMAP_FLAG_SYNC`).
pub fn extents(fd: BorrowedFd<'_>, size: u64) -> nix::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut map = Box::new(Fiemap {
        header: FiemapHeader {
            start: 0,
            length: 0,
            flags: 0,
            mapped_extents: 0,
            extent_count: 0,
            reserved: 0,
        },
        extents: [FiemapExtent::default(); BATCH],
    });
    let mut start = 0;
    while start < size {
        map.header = FiemapHeader {
            start,
            length: size - start,
            flags: if out.is_empty() { FLAG_SYNC } else { 0 },
            mapped_extents: 0,
            extent_count: BATCH as u32,
            reserved: 0,
        };
        let ptr = std::ptr::addr_of_mut!(*map).cast::<FiemapHeader>();
        // SAFETY: `map` is a fiemap header followed by room for `extent_count` extents, which
        // is all the kernel writes; the pointer covers the whole allocation.
        unsafe { fs_ioc_fiemap(fd.as_raw_fd(), ptr) }?;
        let mapped = (map.header.mapped_extents as usize).min(BATCH);
        if mapped == 0 {
            break;
        }
        for e in &map.extents[..mapped] {
            out.push(Extent {
                logical: e.logical,
                physical: e.physical,
                length: e.length,
                flags: e.flags,
            });
        }
        let last = map.extents[mapped - 1];
        if last.flags & EXTENT_LAST != 0 || last.logical + last.length <= start {
            break;
        }
        start = last.logical + last.length;
    }
    Ok(out)
}
