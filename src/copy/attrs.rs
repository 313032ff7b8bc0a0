//! Everything of a copy but its content and its place in the tree: inode flags, xattrs (ACLs
//! and capabilities among them), owner, mode and times, applied in the order that never widens
//! access (see the module comment of `copy`).

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::fcntl::AtFlags;
use nix::libc;
use nix::sys::stat::{FchmodatFlags, FileStat, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

use crate::btrfs::file::{inode_flags, set_inode_flags};
use crate::failpoint;

const FS_IMMUTABLE_FL: libc::c_long = 0x0000_0010;
const FS_APPEND_FL: libc::c_long = 0x0000_0020;
/// Flags that stop us writing to the copy, so they go on last.
pub(super) const LOCKING_FLAGS: libc::c_long = FS_IMMUTABLE_FL | FS_APPEND_FL;
/// Flags btrfs only accepts on an empty file (No_COW) or that change how content is stored.
const FS_NOCOW_FL: libc::c_long = 0x0080_0000;
const FS_COMPR_FL: libc::c_long = 0x0000_0004;
const FS_NOCOMP_FL: libc::c_long = 0x0000_0400;
pub(super) const EARLY_FLAGS: libc::c_long = FS_NOCOW_FL | FS_COMPR_FL | FS_NOCOMP_FL;
/// The `chattr` flags a user sets and a copy should carry: s u c S i a d A m j D T C P. Flags
/// a filesystem manages itself (ext4's extents 'e', inline data, encryption, verity, casefold)
/// describe how the source stores the file and are left to the destination.
pub(super) const COPYABLE_FLAGS: libc::c_long = 0x1
    | 0x2
    | FS_COMPR_FL
    | 0x8
    | FS_IMMUTABLE_FL
    | FS_APPEND_FL
    | 0x40
    | 0x80
    | FS_NOCOMP_FL
    | 0x4000
    | 0x1_0000
    | 0x2_0000
    | FS_NOCOW_FL
    | 0x2000_0000;
/// Of those, the ones every Linux filesystem with flags supports (i a d A S D); a destination
/// that refuses the rest still gets these, immutable and append-only above all.
const CORE_FLAGS: libc::c_long = FS_IMMUTABLE_FL | FS_APPEND_FL | 0x40 | 0x80 | 0x8 | 0x1_0000;

/// A path through `/proc/self/fd` that names `name` inside `dir` for the path-based xattr calls
/// (`l*xattr`, which do not follow the final symlink). Only used for symlinks, fifos and device
/// nodes, which cannot be opened for `f*xattr` without side effects.
pub(super) fn proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name)
}

/// A borrowed descriptor, for the `xattr` crate's `f*xattr` calls (it implements them for
/// anything with a raw fd).
struct XattrFd<'a>(BorrowedFd<'a>);

impl AsRawFd for XattrFd<'_> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl xattr::FileExt for XattrFd<'_> {}

/// Where xattrs are read from or written to.
pub enum XattrSource<'a> {
    Fd(BorrowedFd<'a>),
    Path(PathBuf),
}

impl XattrSource<'_> {
    fn list(&self) -> std::io::Result<xattr::XAttrs> {
        match self {
            XattrSource::Fd(fd) => xattr::FileExt::list_xattr(&XattrFd(*fd)),
            XattrSource::Path(path) => xattr::list(path),
        }
    }

    fn get(&self, name: &OsStr) -> std::io::Result<Option<Vec<u8>>> {
        match self {
            XattrSource::Fd(fd) => xattr::FileExt::get_xattr(&XattrFd(*fd), name),
            XattrSource::Path(path) => xattr::get(path, name),
        }
    }

    fn set(&self, name: &OsStr, value: &[u8]) -> Result<()> {
        match self {
            XattrSource::Fd(fd) => xattr::FileExt::set_xattr(&XattrFd(*fd), name, value),
            XattrSource::Path(path) => xattr::set(path, name, value),
        }
        .with_context(|| format!("setting xattr {name:?}"))
    }

    fn remove(&self, name: &str) -> std::io::Result<()> {
        match self {
            XattrSource::Fd(fd) => xattr::FileExt::remove_xattr(&XattrFd(*fd), name),
            XattrSource::Path(path) => xattr::remove(path, name),
        }
    }
}

/// The xattrs that hold POSIX ACLs: the access ACL, and a directory's default ACL (inherited by
/// what is created inside it).
const ACL_XATTRS: [&str; 2] = ["system.posix_acl_access", "system.posix_acl_default"];

/// Remove the ACLs a new file or directory inherited from the default ACL of the directory it
/// was created in. The copy gets exactly its source's ACLs later, and until then nothing but
/// its (owner-only) mode bits decides who may open it. A filesystem without ACLs has none.
pub fn remove_inherited_acls(target: &XattrSource<'_>) -> Result<()> {
    for name in ACL_XATTRS {
        match target.remove(name) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENODATA | libc::ENOTSUP | libc::EINVAL)
                ) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing the inherited {name}"));
            }
        }
    }
    Ok(())
}

/// Every xattr of the source, capabilities last (see the module comment for why). None on a
/// filesystem without xattrs.
pub fn read_xattrs_sorted(source: &XattrSource<'_>) -> Result<Vec<(OsString, Vec<u8>)>> {
    let names = match source.list() {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e).context("listing xattrs"),
    };
    let mut out = Vec::new();
    for name in names {
        // Gone between the listing and now: nothing to copy.
        if let Some(value) = source
            .get(&name)
            .with_context(|| format!("reading xattr {name:?}"))?
        {
            out.push((name, value));
        }
    }
    // ACLs first (they decide access: see `set_xattrs`), file capabilities last.
    out.sort_by_key(|(name, _)| {
        (
            name.as_bytes() == b"security.capability",
            !is_acl(name),
            name.clone(),
        )
    });
    Ok(out)
}

/// Xattrs of `name` in `dir` (any file type), for comparisons.
pub(super) fn xattrs_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Vec<(OsString, Vec<u8>)>> {
    read_xattrs_sorted(&XattrSource::Path(proc_path(dir, name)))
}

/// The `chattr` flags of an open regular file or directory (0 where unsupported).
pub(super) fn get_flags(fd: BorrowedFd<'_>) -> libc::c_long {
    inode_flags(fd).unwrap_or(0)
}

pub(super) fn set_flags(fd: BorrowedFd<'_>, flags: libc::c_long) -> nix::Result<()> {
    set_inode_flags(fd, flags)
}

pub(super) fn flags_error(flags: libc::c_long) -> String {
    format!("setting inode flags {flags:#x} (chattr)")
}

/// Take the immutable and append-only flags off an open file or directory of a tree about to be
/// deleted (they forbid deleting it or what is inside).
pub(super) fn clear_locking_flags(fd: BorrowedFd<'_>) {
    let flags = get_flags(fd);
    if flags & LOCKING_FLAGS != 0 {
        let _ = set_flags(fd, flags & !LOCKING_FLAGS);
    }
}

/// Every xattr of `source` onto `target` (a copy that has its final owner but still its
/// owner-only creation mode), ACLs first. The mode comes after: setting an access ACL sets the
/// group-class and other mode bits from the ACL (the group class to its mask), and `chmod` sets
/// the mask from the group bits, so mode-then-ACL would for a moment give the owning group the
/// mask's access even where the ACL denies it. ACL-then-mode never grants anything the source
/// does not: the ACL is the source's, and the mode (the source's, with its set-id bits) agrees
/// with it.
fn set_xattrs(source: &XattrSource<'_>, target: &XattrSource<'_>) -> Result<()> {
    for (name, value) in read_xattrs_sorted(source)? {
        target.set(&name, &value)?;
        if is_acl(&name) {
            failpoint::hit("copy-acl-set");
        }
    }
    failpoint::hit("copy-xattrs-set");
    Ok(())
}

fn is_acl(name: &OsStr) -> bool {
    ACL_XATTRS
        .iter()
        .any(|acl| name.as_bytes() == acl.as_bytes())
}

fn owner(st: &FileStat) -> (Option<Uid>, Option<Gid>) {
    (
        Some(Uid::from_raw(st.st_uid)),
        Some(Gid::from_raw(st.st_gid)),
    )
}

/// The permission bits, set-id and sticky bits included.
fn mode(st: &FileStat) -> Mode {
    Mode::from_bits_truncate(st.st_mode & 0o7777)
}

fn times(st: &FileStat) -> (TimeSpec, TimeSpec) {
    (
        TimeSpec::new(st.st_atime, st.st_atime_nsec),
        TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
    )
}

/// Owner, mode, xattrs, times and flags of an open regular file or directory, in the order that
/// keeps each of them (see the module comment). True when the destination refused some flags.
pub(super) fn finish_fd(
    src: BorrowedFd<'_>,
    st: &FileStat,
    dst: BorrowedFd<'_>,
    flags: libc::c_long,
) -> Result<bool> {
    let (uid, gid) = owner(st);
    nix::unistd::fchown(dst, uid, gid).context("setting the owner")?;
    failpoint::hit("copy-owner-set");
    set_xattrs(&XattrSource::Fd(src), &XattrSource::Fd(dst))?;
    nix::sys::stat::fchmod(dst, mode(st)).context("setting the mode")?;
    failpoint::hit("copy-mode-set");
    let (atime, mtime) = times(st);
    nix::sys::stat::futimens(dst, &atime, &mtime).context("setting the times")?;
    let late = flags & !EARLY_FLAGS;
    if late == 0 {
        return Ok(false);
    }
    // Keep the flags the destination manages (ext4's extents) and the early ones it accepted.
    let current = get_flags(dst);
    if set_flags(dst, current | late).is_ok() {
        return Ok(false);
    }
    let core = current | (late & CORE_FLAGS);
    set_flags(dst, core).with_context(|| flags_error(core))?;
    Ok(late & !CORE_FLAGS != 0)
}

/// The same for a symlink, fifo or device node, addressed by name in its (private, owner-only)
/// parent directory.
pub(super) fn finish_at(
    src_dir: BorrowedFd<'_>,
    src_name: &OsStr,
    st: &FileStat,
    dst_dir: BorrowedFd<'_>,
    dst_name: &OsStr,
    chmod: bool,
) -> Result<()> {
    let (uid, gid) = owner(st);
    nix::unistd::fchownat(dst_dir, dst_name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)
        .context("setting the owner")?;
    failpoint::hit("copy-owner-set");
    set_xattrs(
        &XattrSource::Path(proc_path(src_dir, src_name)),
        &XattrSource::Path(proc_path(dst_dir, dst_name)),
    )?;
    if chmod {
        // Not a symlink (mknodat just created it), so following cannot lead anywhere.
        nix::sys::stat::fchmodat(dst_dir, dst_name, mode(st), FchmodatFlags::FollowSymlink)
            .context("setting the mode")?;
        failpoint::hit("copy-mode-set");
    }
    let (atime, mtime) = times(st);
    nix::sys::stat::utimensat(
        dst_dir,
        dst_name,
        &atime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .context("setting the times")?;
    Ok(())
}
