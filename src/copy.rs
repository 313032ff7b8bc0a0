//! A faithful copy of one tree, done on file descriptors.
//!
//! Why by hand and not `cp -a` or a crate: the copy must never follow a symlink out of the tree
//! (every name is opened with `openat` and `O_NOFOLLOW` relative to its already-open parent),
//! and it must never make content readable by anyone it was not readable by, not even for a
//! moment. Each file is therefore created with at most its owner bits (the owner at creation
//! being root), and whatever ACL it inherited from the default ACL of the directory it was
//! created in is removed at once, before any content (with group-class bits of 0 the kernel masks
//! an inherited ACL to nothing meanwhile). It is then filled, handed to its final owner with
//! `fchown`, given its source's xattrs with the ACLs first, and only then its final mode (see
//! `set_xattrs` for why ACL before mode); a directory stays owner-only until everything inside
//! it is done. `fchown` is done before the xattrs and the mode because the kernel clears file
//! capabilities and set-user-ID bits on a change of owner, and capabilities are the last xattr
//! because writing content clears them too (`chmod` does not).
//!
//! Preserved: type, owner, group, mode (with set-id and sticky bits), atime and mtime, every
//! xattr (file capabilities, POSIX ACLs including default ACLs), hard links inside the copied
//! tree, holes in sparse files, the inode flags of `chattr` (No_COW is set while the file is
//! still empty, which is the only time btrfs accepts it; immutable and append-only last),
//! symlinks as links, fifos and device nodes. Sockets are skipped and reported: a socket is
//! only meaningful while its server runs and is recreated by it.
//!
//! A regular file that changes while it is copied (its size, mtime or ctime moved between an
//! `fstat` before and one after its content) is emptied and copied again, a few times, then
//! reported as an error: a copy is always one version the file really had, never the start of
//! one and the end (or a zero tail) of another.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::fcntl::OFlag;
use nix::libc;
use nix::sys::stat::Mode;

use crate::failpoint;

mod compare;
pub use compare::same_content;

const FS_IMMUTABLE_FL: libc::c_long = 0x0000_0010;
const FS_APPEND_FL: libc::c_long = 0x0000_0020;
/// Flags that stop us writing to the copy, so they go on last.
const LOCKING_FLAGS: libc::c_long = FS_IMMUTABLE_FL | FS_APPEND_FL;
/// Flags btrfs only accepts on an empty file (No_COW) or that change how content is stored.
const FS_NOCOW_FL: libc::c_long = 0x0080_0000;
const FS_COMPR_FL: libc::c_long = 0x0000_0004;
const FS_NOCOMP_FL: libc::c_long = 0x0000_0400;
const EARLY_FLAGS: libc::c_long = FS_NOCOW_FL | FS_COMPR_FL | FS_NOCOMP_FL;
/// The `chattr` flags a user sets and a copy should carry: s u c S i a d A m j D T C P. Flags
/// a filesystem manages itself (ext4's extents 'e', inline data, encryption, verity, casefold)
/// describe how the source stores the file and are left to the destination.
const COPYABLE_FLAGS: libc::c_long = 0x1
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

/// The path a copy error happened at, added once (see `copy_inner`).
#[derive(Debug)]
struct CopyingAt(String);

impl std::fmt::Display for CopyingAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn changed_while_copied(e: nix::Error) -> anyhow::Error {
    if e == crate::fs::CHANGED {
        anyhow::anyhow!(
            "it was replaced while being copied (it is not the file rasa inspected); rerun when \
             it is quiet"
        )
    } else {
        anyhow::Error::new(e).context("opening")
    }
}

fn cstr(name: &OsStr) -> CString {
    // Names read from a directory or a path never contain NUL.
    CString::new(name.as_bytes()).expect("file names contain no NUL")
}

fn check(ret: libc::c_int, what: impl FnOnce() -> String) -> Result<libc::c_int> {
    if ret < 0 {
        Err(std::io::Error::last_os_error()).with_context(what)
    } else {
        Ok(ret)
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `fstatat` without following a final symlink; `None` when the name does not exist.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Option<libc::stat>> {
    let name_c = cstr(name);
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, NUL-terminated name, st is a valid out pointer.
    let ret = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name_c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret < 0 {
        if errno() == libc::ENOENT {
            return Ok(None);
        }
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("inspecting {}", Path::new(name).display()));
    }
    Ok(Some(st))
}

pub fn open_at(dir: BorrowedFd<'_>, name: &OsStr, flags: libc::c_int) -> Result<OwnedFd> {
    let name_c = cstr(name);
    // SAFETY: valid fd and NUL-terminated name; the returned fd is owned by us.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name_c.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    check(fd, || format!("opening {}", Path::new(name).display()))?;
    // SAFETY: fd is a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open a directory below `dir`, refusing a symlink in place of it.
pub fn open_dir(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd> {
    open_at(dir, name, libc::O_RDONLY | libc::O_DIRECTORY)
}

pub fn is_type(st: &libc::stat, kind: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == kind
}

/// The names in a directory, without `.` and `..`, in the order the filesystem gives them.
pub fn read_dir_names(dir: BorrowedFd<'_>) -> Result<Vec<OsString>> {
    // A new descriptor on the same directory, so that the listing has an offset of its own.
    let mut stream = nix::dir::Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .context("opening a directory to list it")?;
    let mut names = Vec::new();
    for entry in stream.iter() {
        let entry = entry.context("listing a directory")?;
        let bytes = entry.file_name().to_bytes();
        if bytes != b"." && bytes != b".." {
            names.push(OsString::from_vec(bytes.to_vec()));
        }
    }
    Ok(names)
}

/// A path through `/proc/self/fd` that names `name` inside `dir` for the path-based xattr calls
/// (`l*xattr`, which do not follow the final symlink). Only used for symlinks, fifos and device
/// nodes, which cannot be opened for `f*xattr` without side effects.
fn proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
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
pub fn xattrs_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Vec<(OsString, Vec<u8>)>> {
    read_xattrs_sorted(&XattrSource::Path(proc_path(dir, name)))
}

/// The `chattr` flags of an open regular file or directory (0 where unsupported).
pub fn get_flags(fd: BorrowedFd<'_>) -> libc::c_long {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes an int (despite its declared long) to the pointer.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    if ret < 0 {
        0
    } else {
        libc::c_long::from(flags)
    }
}

fn set_flags(fd: BorrowedFd<'_>, flags: libc::c_long) -> Result<()> {
    let value = flags as libc::c_int;
    // SAFETY: FS_IOC_SETFLAGS reads an int from the pointer.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_SETFLAGS, &value) };
    check(ret, || format!("setting inode flags {flags:#x} (chattr)")).map(|_| ())
}

/// The btrfs filesystem UUID of an open file, or `None` when it is not on btrfs. Subvolumes of
/// one filesystem have different `st_dev`s but share this UUID, and FICLONE works between them.
pub fn btrfs_fsid(fd: BorrowedFd<'_>) -> Option<[u8; 16]> {
    #[repr(C)]
    struct FsInfoArgs {
        max_id: u64,
        num_devices: u64,
        fsid: [u8; 16],
        rest: [u8; 1024 - 32],
    }
    nix::ioctl_read!(btrfs_fs_info, 0x94, 31, FsInfoArgs);
    let mut args: FsInfoArgs = unsafe { std::mem::zeroed() };
    // SAFETY: the struct has the kernel's 1024-byte layout.
    unsafe { btrfs_fs_info(fd.as_raw_fd(), &mut args) }
        .ok()
        .map(|_| args.fsid)
}

#[derive(Debug, Default, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub special_files: u64,
    pub hard_links: u64,
    pub bytes: u64,
    pub reflinked_files: u64,
    pub byte_copied_files: u64,
    /// Sockets left out, relative to the copied entry.
    pub skipped_sockets: Vec<String>,
    /// Mount points left out (the copy stays on the entry's filesystem).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mount_points_left_out: Vec<String>,
    /// Files whose btrfs-only `chattr` flags (No_COW, compression) the destination filesystem
    /// does not support, relative to the copied entry.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flags_not_kept: Vec<String>,
    /// Files that changed while they were copied and were copied again (each stored as one
    /// version it really had), relative to the copied entry.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub copied_again: Vec<String>,
}

/// How many times a file that changes while it is copied is copied again before the copy
/// gives up on it.
const COPY_TRIES: u32 = 3;

/// Whether two `fstat`s of one open file saw the same version of it. The change time moves on
/// every write, truncation and attribute change and cannot be set back (unlike the modification
/// time, which `copytruncate` and `touch` can restore); the size catches a change within one
/// tick of the coarse clock that stamps it.
fn same_version(before: &libc::stat, after: &libc::stat) -> bool {
    (
        before.st_size,
        before.st_ctime,
        before.st_ctime_nsec,
        before.st_mtime,
        before.st_mtime_nsec,
    ) == (
        after.st_size,
        after.st_ctime,
        after.st_ctime_nsec,
        after.st_mtime,
        after.st_mtime_nsec,
    )
}

/// One copy of one tree, with the hard-link map for that tree.
pub struct Copier<'p> {
    /// Try FICLONE first (source and destination on the same btrfs).
    pub reflink: bool,
    links: HashMap<(u64, u64), PathBuf>,
    /// The entry's own name and its temporary name, to report paths as the user knows them.
    names: (OsString, OsString),
    pub stats: Stats,
    progress: &'p dyn Fn(u64),
    /// Called after each regular file is complete (crash-injection point for tests).
    after_file: &'p dyn Fn(),
    /// Directories below the copied entry that are left out: mount points (see fs::walk).
    left_out: Option<&'p dyn Fn(&libc::stat) -> bool>,
    buffer: Vec<u8>,
}

impl<'p> Copier<'p> {
    pub fn new(reflink: bool, progress: &'p dyn Fn(u64), after_file: &'p dyn Fn()) -> Self {
        Copier {
            reflink,
            links: HashMap::new(),
            names: Default::default(),
            stats: Stats::default(),
            progress,
            after_file,
            left_out: None,
            buffer: Vec::new(),
        }
    }

    /// Leave out (and list in the stats) the directories below the entry for which
    /// `is_mount_point` holds, so the copy stays on the entry's filesystem.
    pub fn leaving_out(mut self, is_mount_point: &'p dyn Fn(&libc::stat) -> bool) -> Self {
        self.left_out = Some(is_mount_point);
        self
    }

    /// Copy `src_dir/src_name` (of any type) to `dst_dir/dst_name`, which must not exist.
    /// `dst_root` and `rel` locate the copy inside the destination tree, for hard links.
    pub fn copy(
        &mut self,
        src_dir: BorrowedFd<'_>,
        src_name: &OsStr,
        dst_dir: BorrowedFd<'_>,
        dst_name: &OsStr,
    ) -> Result<()> {
        self.links.clear();
        self.names = (src_name.to_os_string(), dst_name.to_os_string());
        self.copy_inner(
            src_dir,
            src_name,
            dst_dir,
            dst_name,
            dst_dir,
            PathBuf::from(dst_name),
        )
    }

    fn copy_inner(
        &mut self,
        src_dir: BorrowedFd<'_>,
        src_name: &OsStr,
        dst_dir: BorrowedFd<'_>,
        dst_name: &OsStr,
        dst_root: BorrowedFd<'_>,
        rel: PathBuf,
    ) -> Result<()> {
        let Some(st) = lstat_at(src_dir, src_name)? else {
            // Vanished since the directory was read: nothing to copy.
            return Ok(());
        };
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFDIR
            && rel.as_os_str() != self.names.1
            && self
                .left_out
                .is_some_and(|is_mount_point| is_mount_point(&st))
        {
            let shown = self.shown(&rel);
            self.stats.mount_points_left_out.push(shown);
            return Ok(());
        }
        if kind != libc::S_IFDIR && st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key) {
                let first_c = cstr(first.as_os_str());
                let name_c = cstr(dst_name);
                // SAFETY: valid fds and NUL-terminated names; flags 0 never follows symlinks.
                check(
                    unsafe {
                        libc::linkat(
                            dst_root.as_raw_fd(),
                            first_c.as_ptr(),
                            dst_dir.as_raw_fd(),
                            name_c.as_ptr(),
                            0,
                        )
                    },
                    || format!("hard-linking {}", rel.display()),
                )?;
                self.stats.hard_links += 1;
                return Ok(());
            }
            self.links.insert(key, rel.clone());
        }
        let result = match kind {
            libc::S_IFDIR => {
                self.copy_dir(src_dir, src_name, &st, dst_dir, dst_name, dst_root, &rel)
            }
            libc::S_IFREG => self.copy_file(src_dir, src_name, &st, dst_dir, dst_name, &rel),
            libc::S_IFLNK => self.copy_symlink(src_dir, src_name, &st, dst_dir, dst_name),
            libc::S_IFIFO | libc::S_IFCHR | libc::S_IFBLK => {
                self.copy_special(src_dir, src_name, &st, dst_dir, dst_name)
            }
            libc::S_IFSOCK => {
                self.links.remove(&(st.st_dev, st.st_ino));
                let shown = self.shown(&rel);
                self.stats.skipped_sockets.push(shown);
                Ok(())
            }
            _ => Err(anyhow::anyhow!("unknown file type {:o}", kind)),
        };
        // The innermost path names the file, as the user knows it; the levels above it add
        // nothing (a 2,000-level tree would repeat the path 2,000 times).
        result.map_err(|e| {
            if e.downcast_ref::<CopyingAt>().is_some() {
                e
            } else {
                e.context(CopyingAt(format!("copying {}", self.shown(&rel))))
            }
        })
    }

    fn shown(&self, rel: &Path) -> String {
        let rest = rel.strip_prefix(&self.names.1).unwrap_or(rel);
        let shown = Path::new(&self.names.0);
        // The entry itself (a file entry): its name, without the trailing slash `join("")` adds.
        if rest.as_os_str().is_empty() {
            shown.to_path_buf()
        } else {
            shown.join(rest)
        }
        .to_string_lossy()
        .into_owned()
    }

    /// Set the flags btrfs wants on an empty file; a destination that has no such flags (ext4
    /// has no No_COW) gets the copy without them, and the report says so.
    fn set_early_flags(
        &mut self,
        dst: BorrowedFd<'_>,
        flags: libc::c_long,
        rel: &Path,
    ) -> Result<()> {
        if flags & EARLY_FLAGS == 0 {
            return Ok(());
        }
        match set_flags(dst, flags & EARLY_FLAGS) {
            Ok(()) => Ok(()),
            Err(_) if matches!(errno(), libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL) => {
                let shown = self.shown(rel);
                self.stats.flags_not_kept.push(shown);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn copy_dir(
        &mut self,
        src_dir: BorrowedFd<'_>,
        src_name: &OsStr,
        st: &libc::stat,
        dst_dir: BorrowedFd<'_>,
        dst_name: &OsStr,
        dst_root: BorrowedFd<'_>,
        rel: &Path,
    ) -> Result<()> {
        let src = crate::fs::open_verified(src_dir, src_name, st).map_err(changed_while_copied)?;
        let name_c = cstr(dst_name);
        // Owner-only (and the owner is us) until every child is in place.
        let initial = st.st_mode & 0o700;
        // SAFETY: valid fd and name.
        check(
            unsafe { libc::mkdirat(dst_dir.as_raw_fd(), name_c.as_ptr(), initial) },
            || "creating the directory".into(),
        )?;
        let dst = open_dir(dst_dir, dst_name)?;
        failpoint::hit("copy-created");
        // Before anything is created inside: the children must not inherit the storage's
        // default ACL either.
        remove_inherited_acls(&XattrSource::Fd(dst.as_fd()))?;
        let flags = get_flags(src.as_fd()) & COPYABLE_FLAGS;
        // Inherited by the children created below, as on the source.
        self.set_early_flags(dst.as_fd(), flags, rel)?;
        self.stats.directories += 1;
        for name in read_dir_names(src.as_fd())? {
            self.copy_inner(
                src.as_fd(),
                &name,
                dst.as_fd(),
                &name,
                dst_root,
                rel.join(&name),
            )?;
        }
        if finish_fd(src.as_fd(), st, dst.as_fd(), flags)? {
            let shown = self.shown(rel);
            self.stats.flags_not_kept.push(shown);
        }
        Ok(())
    }

    fn copy_file(
        &mut self,
        src_dir: BorrowedFd<'_>,
        src_name: &OsStr,
        st: &libc::stat,
        dst_dir: BorrowedFd<'_>,
        dst_name: &OsStr,
        rel: &Path,
    ) -> Result<()> {
        crate::failpoint::hit("copy-before-opening-file");
        // What was inspected, or nothing: a FIFO or another file swapped in since is refused
        // without blocking.
        let src = crate::fs::open_verified(src_dir, src_name, st).map_err(changed_while_copied)?;
        let name_c = cstr(dst_name);
        // SAFETY: valid fd and name; O_EXCL never opens an existing file or follows a symlink.
        let fd = unsafe {
            libc::openat(
                dst_dir.as_raw_fd(),
                name_c.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                (st.st_mode & 0o700) as libc::c_uint,
            )
        };
        check(fd, || "creating the file".into())?;
        // SAFETY: fresh descriptor.
        let dst = unsafe { OwnedFd::from_raw_fd(fd) };
        failpoint::hit("copy-created");
        remove_inherited_acls(&XattrSource::Fd(dst.as_fd()))?;
        let flags = get_flags(src.as_fd()) & COPYABLE_FLAGS;
        self.set_early_flags(dst.as_fd(), flags, rel)?;
        let mut tries = 1;
        let (version, cloned) = loop {
            let before = nix::sys::stat::fstat(&src).context("inspecting the file")?;
            let cloned = self.copy_content(src.as_fd(), dst.as_fd(), before.st_size as u64)?;
            let after = nix::sys::stat::fstat(&src).context("inspecting the file")?;
            if same_version(&before, &after) {
                break (after, cloned);
            }
            if tries == COPY_TRIES {
                bail!(
                    "it changed while it was copied, {COPY_TRIES} times in a row (a log being \
                     written or rotated?); nothing was stored for it: stop what writes to it \
                     (or leave it out of the manifest) and rerun"
                );
            }
            if tries == 1 {
                let shown = self.shown(rel);
                self.stats.copied_again.push(shown);
            }
            tries += 1;
            // Start again from nothing: never a mix of two versions.
            nix::unistd::ftruncate(&dst, 0).context("emptying the copy to start again")?;
        };
        let size = version.st_size as u64;
        if cloned {
            self.stats.reflinked_files += 1;
        } else if size > 0 {
            self.stats.byte_copied_files += 1;
        }
        self.stats.files += 1;
        self.stats.bytes += size;
        (self.progress)(size);
        // The owner, mode and times of the version whose content was copied.
        if finish_fd(src.as_fd(), &version, dst.as_fd(), flags)? {
            let shown = self.shown(rel);
            self.stats.flags_not_kept.push(shown);
        }
        (self.after_file)();
        Ok(())
    }

    /// The first `size` bytes of `src` into the empty `dst`: a reflink when allowed and
    /// possible (true), else a byte copy that keeps holes.
    fn copy_content(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        size: u64,
    ) -> Result<bool> {
        if self.reflink && size > 0 {
            // SAFETY: both fds valid; FICLONE takes the source fd as its argument.
            if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0 {
                return Ok(true);
            }
        }
        copy_data(src, dst, size, &mut self.buffer)?;
        Ok(false)
    }

    fn copy_symlink(
        &mut self,
        src_dir: BorrowedFd<'_>,
        src_name: &OsStr,
        st: &libc::stat,
        dst_dir: BorrowedFd<'_>,
        dst_name: &OsStr,
    ) -> Result<()> {
        let target = read_link_at(src_dir, src_name)?;
        let target_c = cstr(&target);
        let name_c = cstr(dst_name);
        // SAFETY: valid fd and strings.
        check(
            unsafe { libc::symlinkat(target_c.as_ptr(), dst_dir.as_raw_fd(), name_c.as_ptr()) },
            || "creating the symlink".into(),
        )?;
        self.stats.symlinks += 1;
        finish_at(src_dir, src_name, st, dst_dir, dst_name, false)
    }

    fn copy_special(
        &mut self,
        src_dir: BorrowedFd<'_>,
        src_name: &OsStr,
        st: &libc::stat,
        dst_dir: BorrowedFd<'_>,
        dst_name: &OsStr,
    ) -> Result<()> {
        let name_c = cstr(dst_name);
        let mode = (st.st_mode & libc::S_IFMT) | (st.st_mode & 0o700);
        // SAFETY: valid fd and name.
        check(
            unsafe { libc::mknodat(dst_dir.as_raw_fd(), name_c.as_ptr(), mode, st.st_rdev) },
            || "creating the special file".into(),
        )?;
        failpoint::hit("copy-created");
        remove_inherited_acls(&XattrSource::Path(proc_path(dst_dir, dst_name)))?;
        self.stats.special_files += 1;
        finish_at(src_dir, src_name, st, dst_dir, dst_name, true)
    }
}

pub fn read_link_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OsString> {
    let name_c = cstr(name);
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buf valid for its length.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name_c.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("reading symlink {}", Path::new(name).display()));
    }
    buf.truncate(n as usize);
    Ok(OsString::from_vec(buf))
}

/// Copy `size` bytes, recreating holes: only the ranges SEEK_DATA reports are written, and the
/// final length is set with ftruncate so a trailing hole stays a hole.
fn copy_data(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    size: u64,
    buffer: &mut Vec<u8>,
) -> Result<()> {
    let mut offset: i64 = 0;
    let size = size as i64;
    while offset < size {
        // SAFETY: plain lseek on a valid fd.
        let data = unsafe { libc::lseek(src.as_raw_fd(), offset, libc::SEEK_DATA) };
        let (start, end) = if data < 0 {
            match errno() {
                libc::ENXIO => break,
                // No hole support: all of it is data.
                libc::EINVAL => (offset, size),
                _ => return Err(std::io::Error::last_os_error()).context("SEEK_DATA"),
            }
        } else {
            let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
            (data, if hole < 0 { size } else { hole.min(size) })
        };
        copy_range(src, dst, start, end, buffer)?;
        failpoint::hit("copy-data-extent");
        offset = end;
    }
    // SAFETY: valid fd.
    check(unsafe { libc::ftruncate(dst.as_raw_fd(), size) }, || {
        "setting the file length".into()
    })?;
    Ok(())
}

fn copy_range(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    start: i64,
    end: i64,
    buffer: &mut Vec<u8>,
) -> Result<()> {
    use nix::errno::Errno;
    let mut pos = start;
    let mut kernel_copy = true;
    while pos < end {
        let want = (end - pos) as usize;
        if kernel_copy {
            let (mut in_off, mut out_off) = (pos, pos);
            match nix::fcntl::copy_file_range(
                src,
                Some(&mut in_off),
                dst,
                Some(&mut out_off),
                want.min(1 << 30),
            ) {
                Ok(0) => {
                    // The file shrank while we copied: the caller sees it changed and starts again.
                    return Ok(());
                }
                Ok(n) => {
                    pos += n as i64;
                    continue;
                }
                Err(
                    Errno::EXDEV | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EBADF,
                ) => {
                    kernel_copy = false;
                }
                Err(e) => return Err(e).context("copy_file_range"),
            }
        }
        if buffer.is_empty() {
            buffer.resize(1 << 20, 0);
        }
        let chunk = want.min(buffer.len());
        let n = nix::sys::uio::pread(src, &mut buffer[..chunk], pos).context("reading")?;
        if n == 0 {
            return Ok(());
        }
        let mut written = 0usize;
        while written < n {
            written += nix::sys::uio::pwrite(dst, &buffer[written..n], pos + written as i64)
                .context("writing")?;
        }
        pos += n as i64;
    }
    Ok(())
}

fn timespecs(st: &libc::stat) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ]
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

/// Owner, mode, xattrs, times and flags of an open regular file or directory, in the order that
/// keeps each of them (see the module comment). True when the destination refused some flags.
fn finish_fd(
    src: BorrowedFd<'_>,
    st: &libc::stat,
    dst: BorrowedFd<'_>,
    flags: libc::c_long,
) -> Result<bool> {
    let raw = dst.as_raw_fd();
    // SAFETY: valid fds throughout.
    check(unsafe { libc::fchown(raw, st.st_uid, st.st_gid) }, || {
        "setting the owner".into()
    })?;
    failpoint::hit("copy-owner-set");
    set_xattrs(&XattrSource::Fd(src), &XattrSource::Fd(dst))?;
    check(unsafe { libc::fchmod(raw, st.st_mode & 0o7777) }, || {
        "setting the mode".into()
    })?;
    failpoint::hit("copy-mode-set");
    let times = timespecs(st);
    check(unsafe { libc::futimens(raw, times.as_ptr()) }, || {
        "setting the times".into()
    })?;
    let late = flags & !EARLY_FLAGS;
    if late == 0 {
        return Ok(false);
    }
    // Keep the flags the destination manages (ext4's extents) and the early ones it accepted.
    let current = get_flags(dst);
    if set_flags(dst, current | late).is_ok() {
        return Ok(false);
    }
    set_flags(dst, current | (late & CORE_FLAGS))?;
    Ok(late & !CORE_FLAGS != 0)
}

/// The same for a symlink, fifo or device node, addressed by name in its (private, owner-only)
/// parent directory.
fn finish_at(
    src_dir: BorrowedFd<'_>,
    src_name: &OsStr,
    st: &libc::stat,
    dst_dir: BorrowedFd<'_>,
    dst_name: &OsStr,
    chmod: bool,
) -> Result<()> {
    let name_c = cstr(dst_name);
    let raw = dst_dir.as_raw_fd();
    // SAFETY: valid fd and name throughout.
    check(
        unsafe {
            libc::fchownat(
                raw,
                name_c.as_ptr(),
                st.st_uid,
                st.st_gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        },
        || "setting the owner".into(),
    )?;
    failpoint::hit("copy-owner-set");
    set_xattrs(
        &XattrSource::Path(proc_path(src_dir, src_name)),
        &XattrSource::Path(proc_path(dst_dir, dst_name)),
    )?;
    if chmod {
        // Not a symlink (mknodat just created it), so fchmodat cannot follow anything.
        check(
            unsafe { libc::fchmodat(raw, name_c.as_ptr(), st.st_mode & 0o7777, 0) },
            || "setting the mode".into(),
        )?;
        failpoint::hit("copy-mode-set");
    }
    let times = timespecs(st);
    check(
        unsafe {
            libc::utimensat(
                raw,
                name_c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        },
        || "setting the times".into(),
    )?;
    Ok(())
}

/// Delete a tree this program created (a temporary copy), never following a symlink.
pub fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    let Some(st) = lstat_at(dir, name)? else {
        return Ok(());
    };
    let name_c = cstr(name);
    if is_type(&st, libc::S_IFDIR) {
        let sub = open_dir(dir, name)?;
        // Immutable or append-only children cannot be deleted; clear those flags first.
        clear_locking_flags(sub.as_fd());
        for child in read_dir_names(sub.as_fd())? {
            remove_tree(sub.as_fd(), &child)?;
        }
        check(
            unsafe { libc::unlinkat(dir.as_raw_fd(), name_c.as_ptr(), libc::AT_REMOVEDIR) },
            || format!("removing {}", Path::new(name).display()),
        )?;
    } else {
        if is_type(&st, libc::S_IFREG) {
            if let Ok(fd) = open_at(dir, name, libc::O_RDONLY | libc::O_NONBLOCK) {
                clear_locking_flags(fd.as_fd());
            }
        }
        check(
            unsafe { libc::unlinkat(dir.as_raw_fd(), name_c.as_ptr(), 0) },
            || format!("removing {}", Path::new(name).display()),
        )?;
    }
    Ok(())
}

fn clear_locking_flags(fd: BorrowedFd<'_>) {
    let flags = get_flags(fd);
    if flags & LOCKING_FLAGS != 0 {
        let _ = set_flags(fd, flags & !LOCKING_FLAGS);
    }
}

/// The first difference between two trees, or `None` when they are the same in everything the
/// copy preserves (type, owner, mode, mtime, size, content, link target, device number, xattrs,
/// names). Sockets are ignored on both sides because the copy skips them.
pub fn first_difference(
    a_dir: BorrowedFd<'_>,
    a_name: &OsStr,
    b_dir: BorrowedFd<'_>,
    b_name: &OsStr,
    rel: &Path,
    left_out: &dyn Fn(&libc::stat) -> bool,
) -> Result<Option<String>> {
    let (Some(a), Some(b)) = (lstat_at(a_dir, a_name)?, lstat_at(b_dir, b_name)?) else {
        return Ok(Some(format!("{} exists on one side only", rel.display())));
    };
    let at = |what: &str| Ok(Some(format!("{}: {what} differs", show(rel))));
    if a.st_mode != b.st_mode {
        return at("type or mode");
    }
    if (a.st_uid, a.st_gid) != (b.st_uid, b.st_gid) {
        return at("owner");
    }
    let kind = a.st_mode & libc::S_IFMT;
    if kind != libc::S_IFDIR && (a.st_mtime, a.st_mtime_nsec) != (b.st_mtime, b.st_mtime_nsec) {
        return at("modification time");
    }
    if kind == libc::S_IFREG && a.st_size != b.st_size {
        return at("size");
    }
    if (kind == libc::S_IFCHR || kind == libc::S_IFBLK) && a.st_rdev != b.st_rdev {
        return at("device number");
    }
    if kind == libc::S_IFLNK && read_link_at(a_dir, a_name)? != read_link_at(b_dir, b_name)? {
        return at("symlink target");
    }
    if kind != libc::S_IFSOCK && xattrs_at(a_dir, a_name)? != xattrs_at(b_dir, b_name)? {
        return at("extended attributes (xattrs, ACLs, capabilities)");
    }
    if kind == libc::S_IFREG {
        let fa = crate::fs::open_verified(a_dir, a_name, &a).map_err(changed_while_copied)?;
        let fb = crate::fs::open_verified(b_dir, b_name, &b).map_err(changed_while_copied)?;
        if !same_content(fa.as_fd(), fb.as_fd())? {
            return at("content");
        }
    }
    if kind == libc::S_IFDIR {
        let da = open_dir(a_dir, a_name)?;
        let db = open_dir(b_dir, b_name)?;
        // Sockets and, on the live side, mount points are not copied, so not compared.
        let kept_names = |dir: BorrowedFd<'_>,
                          names: Vec<OsString>,
                          left_out: &dyn Fn(&libc::stat) -> bool|
         -> Result<Vec<OsString>> {
            let mut kept = Vec::new();
            for n in names {
                match lstat_at(dir, &n)? {
                    Some(st) if is_type(&st, libc::S_IFSOCK) || left_out(&st) => {}
                    Some(_) => kept.push(n),
                    None => {}
                }
            }
            kept.sort();
            Ok(kept)
        };
        let na = kept_names(da.as_fd(), read_dir_names(da.as_fd())?, left_out)?;
        let nb = kept_names(db.as_fd(), read_dir_names(db.as_fd())?, &|_| false)?;
        if na != nb {
            return at("list of names inside");
        }
        for n in &na {
            if let Some(d) = first_difference(da.as_fd(), n, db.as_fd(), n, &rel.join(n), left_out)?
            {
                return Ok(Some(d));
            }
        }
    }
    Ok(None)
}

fn show(rel: &Path) -> String {
    format!("{:?}", rel.as_os_str())
        .trim_matches('"')
        .to_owned()
}

/// `syncfs` on the filesystem of `fd`, so a rename that publishes a copy never lands on disk
/// before the copy's content does.
pub fn sync_filesystem(fd: BorrowedFd<'_>) -> Result<()> {
    check(unsafe { libc::syncfs(fd.as_raw_fd()) }, || "syncfs".into()).map(|_| ())
}
