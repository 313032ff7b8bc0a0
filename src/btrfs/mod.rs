//! A thin layer over the btrfs ioctls rasa needs, on top of the `nix` crate.
//!
//! Why not a library: `btrfs-uapi` and `libbtrfsutil` both run bindgen at build time (libclang
//! in the build closure, and the C library in the initrd for the latter). rasa needs a dozen
//! ioctls with stable, documented layouts (`include/uapi/linux/btrfs.h`), so it declares them
//! here, checks the struct sizes at compile time, and tests them on real btrfs.
//!
//! Everything works on file descriptors: callers open directories with `openat` and
//! `O_NOFOLLOW`, so no path handed to this module is ever resolved through a symlink.

// The one place of rasa with `unsafe` (see `main.rs`): the ioctl calls, each with its SAFETY.
#![allow(unsafe_code)]

pub mod fiemap;
pub mod file;
pub mod find_new;
pub mod tree;

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use anyhow::{bail, Context, Result};
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstatat, Mode};
use nix::sys::statfs::fstatfs;

/// `statfs.f_type` of btrfs.
pub const SUPER_MAGIC: i64 = 0x9123_683E;
/// Inode number of the top directory of every subvolume.
pub const FIRST_FREE_OBJECTID: u64 = 256;
/// The id of the top-level subvolume (`subvolid=5`).
pub const FS_TREE_OBJECTID: u64 = 5;

const VOL_NAME_MAX: usize = 255;
const PATH_NAME_MAX: usize = 4087;
const SUBVOL_NAME_MAX: usize = 4039;

/// `BTRFS_SUBVOL_RDONLY`, for SNAP_CREATE_V2 and SUBVOL_{GET,SET}FLAGS.
pub const SUBVOL_RDONLY: u64 = 1 << 1;
/// `BTRFS_SUBVOL_SPEC_BY_ID`, for SNAP_DESTROY_V2.
const SUBVOL_SPEC_BY_ID: u64 = 1 << 4;

#[repr(C)]
pub(crate) struct VolArgs {
    fd: i64,
    name: [u8; PATH_NAME_MAX + 1],
}

#[repr(C)]
pub(crate) struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    /// `name[SUBVOL_NAME_MAX + 1]`, or `subvolid` in its first 8 bytes.
    name_or_id: [u8; SUBVOL_NAME_MAX + 1],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IoctlTimespec {
    pub sec: u64,
    pub nsec: u32,
}

#[repr(C)]
pub(crate) struct GetSubvolInfoArgs {
    treeid: u64,
    name: [u8; VOL_NAME_MAX + 1],
    parent_id: u64,
    dirid: u64,
    generation: u64,
    flags: u64,
    uuid: [u8; 16],
    parent_uuid: [u8; 16],
    received_uuid: [u8; 16],
    ctransid: u64,
    otransid: u64,
    stransid: u64,
    rtransid: u64,
    ctime: IoctlTimespec,
    otime: IoctlTimespec,
    stime: IoctlTimespec,
    rtime: IoctlTimespec,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<VolArgs>() == 4096);
const _: () = assert!(std::mem::size_of::<VolArgsV2>() == 4096);
/// `btrfs_ioctl_fs_info_args`: only the filesystem UUID is read.
#[repr(C)]
pub(crate) struct FsInfoArgs {
    max_id: u64,
    num_devices: u64,
    fsid: [u8; 16],
    rest: [u8; 1024 - 32],
}

const _: () = assert!(std::mem::size_of::<GetSubvolInfoArgs>() == 504);
const _: () = assert!(std::mem::size_of::<FsInfoArgs>() == 1024);

mod ioctl {
    use super::*;
    nix::ioctl_write_ptr!(subvol_create, 0x94, 14, VolArgs);
    nix::ioctl_write_ptr!(snap_destroy, 0x94, 15, VolArgs);
    nix::ioctl_write_ptr!(snap_create_v2, 0x94, 23, VolArgsV2);
    nix::ioctl_read!(subvol_getflags, 0x94, 25, u64);
    nix::ioctl_write_ptr!(subvol_setflags, 0x94, 26, u64);
    nix::ioctl_read!(get_subvol_info, 0x94, 60, GetSubvolInfoArgs);
    nix::ioctl_write_ptr!(snap_destroy_v2, 0x94, 63, VolArgsV2);
    nix::ioctl_read!(fs_info, 0x94, 31, FsInfoArgs);
}

fn zeroed<T>() -> Box<T> {
    // SAFETY: only used for the plain-old-data ioctl structs above, for which all-zero is valid.
    unsafe { Box::new(std::mem::zeroed()) }
}

/// A subvolume name as the kernel takes it: one path component, no NUL.
fn copy_name(dest: &mut [u8], name: &OsStr) -> Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes.contains(&b'/')
        || bytes.contains(&0)
        || bytes == b"."
        || bytes == b".."
    {
        bail!("{:?} is not a plain subvolume name", name);
    }
    if bytes.len() >= dest.len().min(VOL_NAME_MAX + 1) {
        bail!(
            "subvolume name {:?} is longer than {VOL_NAME_MAX} bytes",
            name
        );
    }
    dest[..bytes.len()].copy_from_slice(bytes);
    Ok(())
}

/// Create an empty subvolume `name` inside the directory `parent`.
pub fn create_subvolume(parent: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    let mut args = zeroed::<VolArgs>();
    copy_name(&mut args.name, name)?;
    // SAFETY: `args` is a valid, initialised vol_args.
    unsafe { ioctl::subvol_create(parent.as_raw_fd(), &*args) }
        .with_context(|| format!("creating subvolume {:?}", name))?;
    Ok(())
}

/// Snapshot the subvolume open at `source` as `name` inside the directory `parent`.
pub fn snapshot(
    source: BorrowedFd<'_>,
    parent: BorrowedFd<'_>,
    name: &OsStr,
    readonly: bool,
) -> Result<()> {
    let mut args = zeroed::<VolArgsV2>();
    args.fd = source.as_raw_fd() as i64;
    args.flags = if readonly { SUBVOL_RDONLY } else { 0 };
    copy_name(&mut args.name_or_id, name)?;
    // SAFETY: `args` is a valid, initialised vol_args_v2.
    unsafe { ioctl::snap_create_v2(parent.as_raw_fd(), &*args) }
        .with_context(|| format!("snapshotting into {:?}", name))?;
    Ok(())
}

/// Delete the subvolume with id `subvol_id`; `any` is any fd on the same filesystem.
/// The subvolume must have no child subvolumes (ENOTEMPTY otherwise). Needs CAP_SYS_ADMIN and
/// Linux 5.7. Deleting by id means no path is resolved, so nothing outside the intended tree
/// can be reached through a renamed directory or a symlink.
pub fn delete_subvolume_by_id(any: BorrowedFd<'_>, subvol_id: u64) -> Result<()> {
    let mut args = zeroed::<VolArgsV2>();
    args.flags = SUBVOL_SPEC_BY_ID;
    args.name_or_id[..8].copy_from_slice(&subvol_id.to_ne_bytes());
    // SAFETY: `args` is a valid, initialised vol_args_v2.
    unsafe { ioctl::snap_destroy_v2(any.as_raw_fd(), &*args) }
        .with_context(|| format!("deleting subvolume id {subvol_id}"))?;
    Ok(())
}

pub fn is_readonly(subvol: BorrowedFd<'_>) -> Result<bool> {
    let mut flags = 0u64;
    // SAFETY: the kernel writes one u64.
    unsafe { ioctl::subvol_getflags(subvol.as_raw_fd(), &mut flags) }
        .context("reading subvolume flags")?;
    Ok(flags & SUBVOL_RDONLY != 0)
}

pub fn set_readonly(subvol: BorrowedFd<'_>, readonly: bool) -> Result<()> {
    let mut flags = 0u64;
    // SAFETY: the kernel writes one u64.
    unsafe { ioctl::subvol_getflags(subvol.as_raw_fd(), &mut flags) }
        .context("reading subvolume flags")?;
    flags = if readonly {
        flags | SUBVOL_RDONLY
    } else {
        flags & !SUBVOL_RDONLY
    };
    // SAFETY: the kernel reads one u64.
    unsafe { ioctl::subvol_setflags(subvol.as_raw_fd(), &flags) }
        .context("setting subvolume flags")?;
    Ok(())
}

/// What GET_SUBVOL_INFO reports about the subvolume an fd is in.
#[derive(Clone, Debug)]
pub struct SubvolInfo {
    pub id: u64,
    /// The transaction id of the last change to the subvolume's tree.
    pub generation: u64,
    /// The generation at which the subvolume was created.
    pub otransid: u64,

    /// Creation time, seconds since the epoch.
    pub otime: u64,
    pub uuid: [u8; 16],
    pub parent_uuid: [u8; 16],
    /// The subvolume whose tree holds this one's directory entry (5 for the top level).
    pub parent_id: u64,
    /// The inode, inside `parent_id`'s tree, of the directory that holds this subvolume.
    pub dirid: u64,
}

/// Unprivileged (Linux 4.18).
pub fn subvol_info(fd: BorrowedFd<'_>) -> Result<SubvolInfo> {
    let mut args = zeroed::<GetSubvolInfoArgs>();
    // SAFETY: the kernel fills the struct.
    unsafe { ioctl::get_subvol_info(fd.as_raw_fd(), &mut *args) }
        .context("reading subvolume info")?;
    Ok(SubvolInfo {
        id: args.treeid,
        generation: args.generation,
        otransid: args.otransid,
        otime: args.otime.sec,
        uuid: args.uuid,
        parent_uuid: args.parent_uuid,
        parent_id: args.parent_id,
        dirid: args.dirid,
    })
}

/// The btrfs filesystem UUID of an open file, or `None` when it is not on btrfs. Subvolumes of
/// one filesystem have different `st_dev`s but share this UUID, and FICLONE works between them.
pub fn fsid(fd: BorrowedFd<'_>) -> Option<[u8; 16]> {
    let mut args = zeroed::<FsInfoArgs>();
    // SAFETY: the kernel fills the 1024-byte struct.
    unsafe { ioctl::fs_info(fd.as_raw_fd(), &mut *args) }
        .ok()
        .map(|_| args.fsid)
}

pub fn is_btrfs(fd: BorrowedFd<'_>) -> Result<bool> {
    let fs = fstatfs(fd).context("statfs")?;
    Ok(fs.filesystem_type().0 as i64 == SUPER_MAGIC)
}

/// Is `name` inside `parent` the top directory of a subvolume? (Not following symlinks.)
pub fn is_subvolume_at(parent: BorrowedFd<'_>, name: &OsStr) -> Result<bool> {
    match fstatat(parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => {
            Ok(st.st_mode & libc_s_ifmt() == libc_s_ifdir() && st.st_ino == FIRST_FREE_OBJECTID)
        }
        Err(nix::errno::Errno::ENOENT) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("inspecting {:?}", name)),
    }
}

fn libc_s_ifmt() -> u32 {
    nix::libc::S_IFMT
}
fn libc_s_ifdir() -> u32 {
    nix::libc::S_IFDIR
}

/// Open the directory `name` inside `parent` without following a symlink at any point.
pub fn open_dir_at(parent: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Delete the subvolume `name` in `parent` together with every subvolume nested in it, children
/// before parents. Every id comes from the root tree, starting at this subvolume's id, so the
/// walk cannot leave its tree whatever the directories inside look like. Ids in `protected`
/// (the live root, the blank, the persistent subvolume) and the top level abort the whole
/// deletion before anything is deleted. Returns how many subvolumes were deleted.
pub fn delete_subvolume_tree(
    fs: BorrowedFd<'_>,
    parent: BorrowedFd<'_>,
    name: &OsStr,
    protected: &[u64],
    mut after_each: impl FnMut(),
) -> Result<usize> {
    let subvol = open_dir_at(parent, name).with_context(|| format!("opening {:?}", name))?;
    if !is_subvolume_at(parent, name)? {
        bail!("{:?} is not a subvolume", name);
    }
    let info = subvol_info(subvol.as_fd())?;
    drop(subvol);
    let mut ids = tree::descendants_depth_first(fs, info.id)?;
    ids.push(info.id);
    if let Some(bad) = ids
        .iter()
        .find(|id| protected.contains(id) || **id == FS_TREE_OBJECTID)
    {
        bail!(
            "refusing to delete {:?}: it is or contains protected subvolume id {bad}",
            name
        );
    }
    // A child's directory entry lives in its parent, so a read-only parent (a read-only old
    // root, a container image) would make deleting the child fail with EROFS forever.
    make_tree_writable(fs, parent, name, info.id)?;
    for id in &ids {
        delete_subvolume_by_id(fs, *id)?;
        after_each();
    }
    Ok(ids.len())
}

/// Clear the read-only flag of the subvolume `name` in `parent` (id `top_id`) and of every
/// subvolume nested in it that holds others, parents first. Each child is found by id in the root tree, opened
/// beneath its parent without following symlinks, and checked to be that id before its flags
/// are touched.
fn make_tree_writable(
    fs: BorrowedFd<'_>,
    parent: BorrowedFd<'_>,
    name: &OsStr,
    top_id: u64,
) -> Result<()> {
    use nix::fcntl::{openat2, OpenHow, ResolveFlag};
    let open_beneath = |dir: BorrowedFd<'_>, path: &OsStr| {
        openat2(
            dir,
            path,
            OpenHow::new()
                .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                .resolve(
                    ResolveFlag::RESOLVE_BENEATH
                        | ResolveFlag::RESOLVE_NO_SYMLINKS
                        | ResolveFlag::RESOLVE_NO_MAGICLINKS
                        | ResolveFlag::RESOLVE_NO_XDEV,
                ),
        )
    };
    let top = open_dir_at(parent, name).with_context(|| format!("opening {:?}", name))?;
    let mut stack = vec![(top, top_id)];
    while let Some((fd, id)) = stack.pop() {
        if subvol_info(fd.as_fd())?.id != id {
            bail!("subvolume id {id} changed while it was being deleted");
        }
        if is_readonly(fd.as_fd())? {
            set_readonly(fd.as_fd(), false)
                .with_context(|| format!("making subvolume id {id} writable to delete it"))?;
        }
        for child in tree::child_subvolumes(fs, id)? {
            // Only a subvolume that holds others must be writable (a read-only leaf deletes
            // fine), so a leaf is never opened: a path deeper than INO_LOOKUP can return
            // cannot stop its deletion.
            if tree::child_subvolumes(fs, child.id)?.is_empty() {
                continue;
            }
            let mut path = tree::ino_lookup(fs, id, child.dirid)?;
            path.extend_from_slice(&child.name);
            let child_fd =
                open_beneath(fd.as_fd(), OsStr::from_bytes(&path)).with_context(|| {
                    format!("opening nested subvolume id {} to delete it", child.id)
                })?;
            stack.push((child_fd, child.id));
        }
    }
    Ok(())
}
