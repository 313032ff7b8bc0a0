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
//!
//! A tree is copied, compared and removed by the one walk of `fs::Trees`, with one open
//! directory per side however deep it is: a 2,000-level tree needs no more descriptors than a
//! flat one. This module says only what each of them does with a name.
//!
//! Here: the copy and the removal of a tree; `attrs`: flags, xattrs, owner, mode and times; `file`: the
//! content of one file; `compare`: whether two files hold the same bytes; `difference`: the
//! first difference between two trees.

use std::collections::HashMap;
use std::convert::Infallible;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::libc;
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

use crate::failpoint;
use crate::fs::{self, Beneath, Failed, Here, Kind, Trees, Visit, Visitor, WalkError};

mod attrs;
mod compare;
mod difference;
mod file;

use attrs::{
    clear_locking_flags, finish_at, finish_fd, flags_error, get_flags, proc_path, set_flags,
    COPYABLE_FLAGS, EARLY_FLAGS,
};
pub use attrs::{read_xattrs_sorted, remove_inherited_acls, XattrSource};
pub use compare::same_content;
pub use difference::first_difference;

/// The error of a file or directory that is no longer the inode inspected (it was replaced
/// between inspection and open) while being `done` ("copied", "compared", "removed").
fn replaced_while(done: &'static str) -> impl Fn(nix::Error) -> anyhow::Error {
    move |e| {
        if e == fs::CHANGED {
            anyhow::anyhow!(
                "it was replaced while being {done} (it is not the file rasa inspected); rerun \
                 when it is quiet"
            )
        } else {
            anyhow::Error::new(e).context("opening")
        }
    }
}

/// The error of a step of the walk itself (copy, compare, remove): inspecting a name, or going
/// back up a tree and finding another directory than the one it came down from.
fn walk_failed(step: Failed, e: nix::Error) -> anyhow::Error {
    match step {
        Failed::Inspecting => anyhow::Error::new(e).context("inspecting it"),
        Failed::Entering => e.into(),
        Failed::GoingUp if e == fs::CHANGED => anyhow::anyhow!(
            "it was moved while rasa went through it (its parent is no longer the directory \
             rasa came down from); rerun when it is quiet"
        ),
        Failed::GoingUp => anyhow::Error::new(e).context("going back up to the parent directory"),
    }
}

/// Walk `dirs[i]/names[i]` with `visitor` (copy, compare, remove); an error names the path it
/// happened at once, as `shown` words it from the path the walk started at (`at`):
/// "`doing` <path>: ...".
fn walk<const N: usize, V: Visitor<N, Error = anyhow::Error>>(
    dirs: [BorrowedFd<'_>; N],
    names: [&OsStr; N],
    at: &Path,
    visitor: &mut V,
    doing: &str,
    shown: impl Fn(&Path) -> String,
) -> Result<Option<V::Stop>> {
    let trees = Trees::new(dirs, names, at).with_context(|| format!("{doing} {}", shown(at)))?;
    trees.run(visitor).map_err(|(at, e)| {
        let e = match e {
            WalkError::Walk(step, e) => walk_failed(step, e),
            WalkError::Visitor(e) => e,
        };
        e.context(format!("{doing} {}", shown(&at)))
    })
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
fn same_version(before: &FileStat, after: &FileStat) -> bool {
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

/// A hard-linked file already copied: where its first copy is (from the destination directory
/// given to `Copier::copy`) and which inode that copy is.
struct FirstCopy {
    rel: PathBuf,
    identity: (u64, u64),
}

/// Where one name is copied: the source's directory and name, the destination's, and the path
/// from the destination directory given to `Copier::copy`.
type Place<'a> = Here<'a, 2>;

/// One directory being copied: the source as inspected and its flags, to finish the copy with
/// once everything inside is in place.
struct DirFrame {
    st: FileStat,
    flags: libc::c_long,
}

/// One copy of one tree, with the hard-link map for that tree.
pub struct Copier<'p> {
    /// Try FICLONE first (source and destination on the same btrfs).
    pub reflink: bool,
    links: HashMap<(u64, u64), FirstCopy>,
    /// The entry's own name and its temporary name, to report paths as the user knows them.
    names: (OsString, OsString),
    pub stats: Stats,
    progress: &'p dyn Fn(u64),
    /// Called after each regular file is complete (crash-injection point for tests).
    after_file: &'p dyn Fn(),
    /// Directories below the copied entry that are left out: mount points (see fs::walk).
    left_out: Option<&'p dyn Fn(&FileStat) -> bool>,
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
    pub fn leaving_out(mut self, is_mount_point: &'p dyn Fn(&FileStat) -> bool) -> Self {
        self.left_out = Some(is_mount_point);
        self
    }

    /// Copy `src_dir/src_name` (of any type) to `dst_dir/dst_name`, which must not exist. An
    /// error names the path it happened at, once, as the user knows it.
    pub fn copy(
        &mut self,
        src_dir: BorrowedFd<'_>,
        src_name: &OsStr,
        dst_dir: BorrowedFd<'_>,
        dst_name: &OsStr,
    ) -> Result<()> {
        self.links.clear();
        self.names = (src_name.to_os_string(), dst_name.to_os_string());
        let names = self.names.clone();
        let mut copy = CopyVisit {
            copier: self,
            dst_root: dst_dir,
        };
        let (dirs, walked) = ([src_dir, dst_dir], [src_name, dst_name]);
        walk(
            dirs,
            walked,
            dst_name.as_ref(),
            &mut copy,
            "copying",
            |at| shown(&names, at),
        )?;
        Ok(())
    }

    fn shown(&self, rel: &Path) -> String {
        shown(&self.names, rel)
    }

    /// Set the flags btrfs wants on an empty file; a destination that has no such flags (ext4
    /// has no No_COW) gets the copy without them, and the report says so.
    fn set_early_flags(
        &mut self,
        dst: BorrowedFd<'_>,
        flags: libc::c_long,
        rel: &Path,
    ) -> Result<()> {
        let early = flags & EARLY_FLAGS;
        if early == 0 {
            return Ok(());
        }
        match set_flags(dst, early) {
            Ok(()) => Ok(()),
            Err(Errno::EOPNOTSUPP | Errno::ENOTTY | Errno::EINVAL) => {
                let shown = self.shown(rel);
                self.stats.flags_not_kept.push(shown);
                Ok(())
            }
            Err(e) => Err(e).with_context(|| flags_error(early)),
        }
    }

    /// Create the copy of a directory, owner-only (and the owner is us) until everything inside
    /// it is in place, and open both sides; what is inside is copied by the caller's walk.
    fn start_dir(
        &mut self,
        place: Place<'_>,
    ) -> Result<(OwnedFd, OwnedFd, Vec<OsString>, DirFrame)> {
        let st = place.st;
        let ([src_dir, dst_dir], [src_name, dst_name]) = (place.dirs, place.names);
        let src = fs::open_verified(src_dir, src_name, &st).map_err(replaced_while("copied"))?;
        let names = fs::list(src.as_fd()).context("listing the directory")?;
        let initial = Mode::from_bits_truncate(st.st_mode & 0o700);
        nix::sys::stat::mkdirat(dst_dir, dst_name, initial).context("creating the directory")?;
        let Some((dst, _)) =
            fs::open_dir(dst_dir, dst_name).context("opening the new directory")?
        else {
            bail!("the new directory vanished while it was being created");
        };
        failpoint::hit("copy-created");
        // Before anything is created inside: the children must not inherit the storage's
        // default ACL either.
        remove_inherited_acls(&XattrSource::Fd(dst.as_fd()))?;
        let flags = get_flags(src.as_fd()) & COPYABLE_FLAGS;
        // Inherited by the children created below, as on the source.
        self.set_early_flags(dst.as_fd(), flags, place.at)?;
        self.stats.directories += 1;
        Ok((src, dst, names, DirFrame { st, flags }))
    }

    /// Copy anything but a directory; a second name of a hard-linked file becomes a hard link
    /// to its first copy. `dst_root` is the directory `place.at` starts from.
    fn copy_entry(&mut self, place: Place<'_>, dst_root: BorrowedFd<'_>) -> Result<()> {
        let st = &place.st;
        let (dst_dir, dst_name, rel) = (place.dirs[1], place.names[1], place.at);
        let kind = Kind::of(st);
        let linked = st.st_nlink > 1 && kind != Kind::Socket;
        if linked {
            if let Some(first) = self.links.get(&fs::identity(st)) {
                link_again(first, dst_root, dst_dir, dst_name)?;
                self.stats.hard_links += 1;
                return Ok(());
            }
        }
        match kind {
            Kind::File => self.copy_file(place)?,
            Kind::Symlink => self.copy_symlink(place)?,
            Kind::Fifo | Kind::CharDevice | Kind::BlockDevice => self.copy_special(place)?,
            Kind::Socket => {
                let shown = self.shown(rel);
                self.stats.skipped_sockets.push(shown);
            }
            Kind::Directory => unreachable!("directories are copied by the walk"),
        }
        if linked {
            let copy = fs::lstat_at(dst_dir, dst_name)
                .context("inspecting the copy")?
                .context("the copy vanished")?;
            let first = FirstCopy {
                rel: rel.to_path_buf(),
                identity: fs::identity(&copy),
            };
            self.links.insert(fs::identity(st), first);
        }
        Ok(())
    }

    fn copy_file(&mut self, place: Place<'_>) -> Result<()> {
        let st = &place.st;
        let ([src_dir, dst_dir], [src_name, dst_name]) = (place.dirs, place.names);
        let rel = place.at;
        crate::failpoint::hit("copy-before-opening-file");
        // What was inspected, or nothing: a FIFO or another file swapped in since is refused
        // without blocking.
        let src = fs::open_verified(src_dir, src_name, st).map_err(replaced_while("copied"))?;
        // O_EXCL never opens an existing file or follows a symlink.
        let dst = nix::fcntl::openat(
            dst_dir,
            dst_name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(st.st_mode & 0o700),
        )
        .context("creating the file")?;
        failpoint::hit("copy-created");
        remove_inherited_acls(&XattrSource::Fd(dst.as_fd()))?;
        let flags = get_flags(src.as_fd()) & COPYABLE_FLAGS;
        self.set_early_flags(dst.as_fd(), flags, rel)?;
        let mut tries = 1;
        let (version, cloned) = loop {
            let before = fs::fstat(src.as_fd()).context("inspecting the file")?;
            let cloned = file::copy_content(
                src.as_fd(),
                dst.as_fd(),
                before.st_size as u64,
                self.reflink,
                &mut self.buffer,
            )?;
            let after = fs::fstat(src.as_fd()).context("inspecting the file")?;
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

    fn copy_symlink(&mut self, place: Place<'_>) -> Result<()> {
        let st = &place.st;
        let ([src_dir, dst_dir], [src_name, dst_name]) = (place.dirs, place.names);
        let target = fs::read_link_at(src_dir, src_name).context("reading the symlink")?;
        nix::unistd::symlinkat(target.as_os_str(), dst_dir, dst_name)
            .context("creating the symlink")?;
        self.stats.symlinks += 1;
        finish_at(src_dir, src_name, st, dst_dir, dst_name, false)
    }

    fn copy_special(&mut self, place: Place<'_>) -> Result<()> {
        let st = &place.st;
        let ([src_dir, dst_dir], [src_name, dst_name]) = (place.dirs, place.names);
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        let owner_only = Mode::from_bits_truncate(st.st_mode & 0o700);
        nix::sys::stat::mknodat(dst_dir, dst_name, kind, owner_only, st.st_rdev)
            .context("creating the special file")?;
        failpoint::hit("copy-created");
        remove_inherited_acls(&XattrSource::Path(proc_path(dst_dir, dst_name)))?;
        self.stats.special_files += 1;
        finish_at(src_dir, src_name, st, dst_dir, dst_name, true)
    }
}

/// `rel` (a path from the destination directory, starting with the temporary name) as the user
/// knows it: from the entry's own name.
fn shown((entry, temporary): &(OsString, OsString), rel: &Path) -> String {
    let rest = rel.strip_prefix(temporary).unwrap_or(rel);
    let shown = Path::new(entry);
    // The entry itself (a file entry): its name, without the trailing slash `join("")` adds.
    if rest.as_os_str().is_empty() {
        shown.to_path_buf()
    } else {
        shown.join(rest)
    }
    .to_string_lossy()
    .into_owned()
}

/// What the copy does with each name the walk of the source (and, in step, of the copy) meets.
struct CopyVisit<'c, 'p, 'd> {
    copier: &'c mut Copier<'p>,
    /// The destination directory given to `Copier::copy`, where a hard link's first copy is
    /// found from.
    dst_root: BorrowedFd<'d>,
}

impl Visitor<2> for CopyVisit<'_, '_, '_> {
    type Frame = DirFrame;
    type Stop = Infallible;
    type Error = anyhow::Error;

    fn visit(&mut self, here: Here<'_, 2>) -> Result<Visit<2, DirFrame, Infallible>> {
        let copier = &mut *self.copier;
        let st = here.st;
        if Kind::of(&st) != Kind::Directory {
            copier.copy_entry(here, self.dst_root)?;
            return Ok(Visit::Next);
        }
        if !here.top
            && copier
                .left_out
                .is_some_and(|is_mount_point| is_mount_point(&st))
        {
            let shown = copier.shown(here.at);
            copier.stats.mount_points_left_out.push(shown);
            return Ok(Visit::Next);
        }
        let (src, dst, names, frame) = copier.start_dir(here)?;
        Ok(Visit::Enter([src, dst], names, frame))
    }

    /// Everything inside is in place: now the directory's owner, mode and times.
    fn finish(
        &mut self,
        [src, dst]: [BorrowedFd<'_>; 2],
        frame: DirFrame,
        at: &Path,
    ) -> Result<()> {
        if finish_fd(src, &frame.st, dst, frame.flags)? {
            let shown = self.copier.shown(at);
            self.copier.stats.flags_not_kept.push(shown);
        }
        Ok(())
    }
}

/// Make `dst_dir/dst_name` another name of the first copy of a hard-linked file. The first
/// copy's directory is opened component by component from `dst_root` without following
/// anything (the copy's directories may already belong to their users), and the new name must
/// turn out to be that very inode.
fn link_again(
    first: &FirstCopy,
    dst_root: BorrowedFd<'_>,
    dst_dir: BorrowedFd<'_>,
    dst_name: &OsStr,
) -> Result<()> {
    let gone = || {
        anyhow::anyhow!(
            "the first copy of this hard-linked file ({}) is no longer where it was put",
            first.rel.display()
        )
    };
    let parent = first.rel.parent().unwrap_or(Path::new(""));
    let name = first.rel.file_name().ok_or_else(gone)?;
    let parts = fs::components(parent.as_os_str());
    let Beneath::Dir(parent, _) =
        fs::open_dir_beneath(dst_root, &parts).context("opening the first copy's directory")?
    else {
        return Err(gone());
    };
    nix::unistd::linkat(parent.as_fd(), name, dst_dir, dst_name, AtFlags::empty())
        .context("hard-linking to the first copy")?;
    let linked = fs::lstat_at(dst_dir, dst_name).context("inspecting the hard link")?;
    if linked.map(|st| fs::identity(&st)) != Some(first.identity) {
        let _ = nix::unistd::unlinkat(dst_dir, dst_name, UnlinkatFlags::NoRemoveDir);
        return Err(gone());
    }
    Ok(())
}

/// Delete a tree this program created (a temporary copy), never following a symlink, with one
/// open directory however deep it is. An error names the path once.
pub fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    walk(
        [dir],
        [name],
        name.as_ref(),
        &mut Removal,
        "removing",
        |at| at.display().to_string(),
    )?;
    Ok(())
}

/// What the removal does with each name: a directory is emptied by the walk, then removed
/// once the walk has left it.
struct Removal;

impl Visitor<1> for Removal {
    type Frame = ();
    type Stop = Infallible;
    type Error = anyhow::Error;

    fn visit(&mut self, here: Here<'_, 1>) -> Result<Visit<1, (), Infallible>> {
        let ([dir], [name], st) = (here.dirs, here.names, here.st);
        if Kind::of(&st) != Kind::Directory {
            remove_one(dir, name, &st)?;
            return Ok(Visit::Next);
        }
        let (fd, names) = open_to_remove(dir, name, &st)?;
        Ok(Visit::Enter([fd], names, ()))
    }

    fn left(&mut self, [dir]: [BorrowedFd<'_>; 1], [name]: [&OsStr; 1]) -> Result<()> {
        nix::unistd::unlinkat(dir, name, UnlinkatFlags::RemoveDir).context("removing the directory")
    }
}

/// Open a directory to delete what is inside: immutable or append-only directories forbid it,
/// so those flags go first.
fn open_to_remove(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    st: &FileStat,
) -> Result<(OwnedFd, Vec<OsString>)> {
    let fd = fs::open_verified(dir, name, st).map_err(replaced_while("removed"))?;
    clear_locking_flags(fd.as_fd());
    let names = fs::list(fd.as_fd()).context("listing the directory")?;
    Ok((fd, names))
}

fn remove_one(dir: BorrowedFd<'_>, name: &OsStr, st: &FileStat) -> Result<()> {
    if Kind::of(st) == Kind::File {
        if let Ok(fd) = fs::open_verified(dir, name, st) {
            clear_locking_flags(fd.as_fd());
        }
    }
    nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).context("removing it")
}

/// `syncfs` on the filesystem of `fd`, so a rename that publishes a copy never lands on disk
/// before the copy's content does.
pub fn sync_filesystem(fd: BorrowedFd<'_>) -> Result<()> {
    nix::unistd::syncfs(fd).context("syncfs")
}
