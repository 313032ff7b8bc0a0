//! The descriptor layer: every walk of a tree rasa did not create goes through here.
//!
//! What is inspected is what is opened: a name is first looked at with `fstatat(...,
//! AT_SYMLINK_NOFOLLOW)`, then opened relative to its already-open parent with `O_NOFOLLOW`
//! (and `O_NONBLOCK | O_NOCTTY` for anything but a directory, so a FIFO or a terminal swapped in
//! never blocks or becomes our controlling terminal), and the descriptor's device and inode are
//! compared with what was inspected. A name swapped for another file, a FIFO or a symlink in
//! between is therefore never read as if it were the inspected one.
//!
//! Everything returns `nix::Result`; a descriptor that is not the inspected inode is
//! [`CHANGED`]. Callers add their context (which path, what for) once.

pub mod cursor;
pub mod names;
pub mod trees;
pub mod walk;

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

pub use cursor::Cursor;
pub use names::{list_names, lstat_at_path, open_dir_at_path, read_link_at_path};
pub use trees::Error as WalkError;
pub use trees::{Failed, Here, Trees, Visit, Visitor};
pub use walk::{measure, Measure, MountRoots};

/// The error of [`open_verified`] when the name no longer refers to the inspected inode: it was
/// replaced (renamed over, swapped for a FIFO) between inspection and open.
pub const CHANGED: Errno = Errno::ESTALE;

/// The type of a file, from its mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Directory,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl Kind {
    pub fn of(st: &FileStat) -> Kind {
        match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFDIR => Kind::Directory,
            SFlag::S_IFLNK => Kind::Symlink,
            SFlag::S_IFIFO => Kind::Fifo,
            SFlag::S_IFSOCK => Kind::Socket,
            SFlag::S_IFCHR => Kind::CharDevice,
            SFlag::S_IFBLK => Kind::BlockDevice,
            _ => Kind::File,
        }
    }

    /// "a directory", "a symlink", ... for messages.
    pub fn described(self) -> &'static str {
        match self {
            Kind::Directory => "a directory",
            Kind::File => "a regular file",
            Kind::Symlink => "a symlink",
            Kind::Fifo => "a fifo",
            Kind::Socket => "a socket",
            Kind::CharDevice | Kind::BlockDevice => "a device node",
        }
    }
}

/// Device and inode: what identifies a file while it exists.
pub fn identity(st: &FileStat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

/// `fstatat` without following a final symlink; `None` when the name does not exist.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<Option<FileStat>> {
    match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn fstat(fd: BorrowedFd<'_>) -> nix::Result<FileStat> {
    nix::sys::stat::fstat(fd)
}

/// Open `dir/name`, which was inspected as `inspected`, never following a symlink and never
/// blocking, and check that the descriptor is that inode ([`CHANGED`] if not). A regular file
/// gets its blocking mode back once verified, for plain reads.
pub fn open_verified(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    inspected: &FileStat,
) -> nix::Result<OwnedFd> {
    let kind = Kind::of(inspected);
    let base = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
    let flags = match kind {
        Kind::Directory => base | OFlag::O_DIRECTORY,
        Kind::File => base | OFlag::O_NONBLOCK | OFlag::O_NOATIME,
        _ => base | OFlag::O_NONBLOCK,
    };
    let fd = match nix::fcntl::openat(dir, name, flags, Mode::empty()) {
        // O_NOATIME needs the file's owner (or CAP_FOWNER); without it, open plainly.
        Err(Errno::EPERM) if kind == Kind::File => {
            nix::fcntl::openat(dir, name, flags & !OFlag::O_NOATIME, Mode::empty())?
        }
        // A symlink swapped in (O_NOFOLLOW) or a non-directory (O_DIRECTORY): not what we saw.
        Err(Errno::ELOOP | Errno::ENOTDIR) => return Err(CHANGED),
        other => other?,
    };
    let st = fstat(fd.as_fd())?;
    if identity(&st) != identity(inspected) || Kind::of(&st) != kind {
        return Err(CHANGED);
    }
    if kind == Kind::File {
        // Only O_NONBLOCK goes: O_NOATIME stays, so inspecting never changes what it reads.
        let status =
            OFlag::from_bits_truncate(nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?);
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(status & !OFlag::O_NONBLOCK),
        )?;
    }
    Ok(fd)
}

/// Inspect and open a directory below `dir`; `None` when it does not exist, ENOTDIR when the
/// name is something else (a symlink included).
pub fn open_dir(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<Option<(OwnedFd, FileStat)>> {
    let Some(st) = lstat_at(dir, name)? else {
        return Ok(None);
    };
    if Kind::of(&st) != Kind::Directory {
        return Err(Errno::ENOTDIR);
    }
    Ok(Some((open_verified(dir, name, &st)?, st)))
}

pub fn read_link_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OsString> {
    nix::fcntl::readlinkat(dir, name)
}

/// The names in an open directory, without `.` and `..`, in the filesystem's order.
pub fn list(dir: BorrowedFd<'_>) -> nix::Result<Vec<OsString>> {
    Ok(list_names(dir)?.iter().map(OsStr::to_os_string).collect())
}

/// Where opening a relative path beneath a directory ended.
#[derive(Debug)]
pub enum Beneath {
    /// Every component is a real directory; the last one is open (the start itself for an
    /// empty path).
    Dir(OwnedFd, FileStat),
    /// Component `at` does not exist.
    Missing { at: usize },
    /// Component `at` is a symlink (with this target): reported, never followed.
    Symlink { at: usize, target: OsString },
    /// Component `at` is not a directory.
    NotDirectory { at: usize, kind: Kind },
}

/// Open the directory `start/parts[0]/parts[1]/...` component by component, never following a
/// symlink and verifying each inode, and say where and why it stopped if it did. A component
/// that changes while being opened is [`CHANGED`].
pub fn open_dir_beneath(start: BorrowedFd<'_>, parts: &[OsString]) -> nix::Result<Beneath> {
    let mut current = nix::unistd::dup(start)?;
    let mut current_st = fstat(current.as_fd())?;
    for (at, part) in parts.iter().enumerate() {
        if part.is_empty() || part == "." || part == ".." || part.as_encoded_bytes().contains(&b'/')
        {
            return Err(Errno::EINVAL);
        }
        let Some(st) = lstat_at(current.as_fd(), part)? else {
            return Ok(Beneath::Missing { at });
        };
        match Kind::of(&st) {
            Kind::Directory => {}
            Kind::Symlink => {
                let target = read_link_at(current.as_fd(), part)?;
                return Ok(Beneath::Symlink { at, target });
            }
            kind => return Ok(Beneath::NotDirectory { at, kind }),
        }
        current = open_verified(current.as_fd(), part, &st)?;
        current_st = st;
    }
    Ok(Beneath::Dir(current, current_st))
}

/// Read the regular file at `path` as the system under `root` sees it: symlinks (the NixOS
/// profile links, absolute ones included) are resolved inside `root`, as if it were `/`, never
/// on the machine running rasa; a FIFO or device there is refused without blocking. `None`
/// when it does not exist.
pub fn read_in_root(root: BorrowedFd<'_>, path: &std::path::Path) -> nix::Result<Option<Vec<u8>>> {
    use nix::fcntl::{OpenHow, ResolveFlag};
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let relative = path.strip_prefix("/").unwrap_or(path);
    let fd = match nix::fcntl::openat2(root, relative, how) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(None),
        Err(e) => return Err(e),
    };
    if Kind::of(&fstat(fd.as_fd())?) != Kind::File {
        return Err(Errno::EINVAL);
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut bytes)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EIO as i32)))?;
    Ok(Some(bytes))
}

/// The components of an absolute, normalized path (`/a/b` -> `["a", "b"]`); `/` is empty.
pub fn components(path: &OsStr) -> Vec<OsString> {
    path.as_encoded_bytes()
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .map(|c| OsString::from_vec(c.to_vec()))
        .collect()
}

/// The components as a path again, for messages.
pub fn joined(parts: &[OsString]) -> String {
    let mut s = String::new();
    for p in parts {
        s.push('/');
        s.push_str(&p.to_string_lossy());
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn dir_fd(path: &std::path::Path) -> OwnedFd {
        std::fs::File::open(path).unwrap().into()
    }

    #[test]
    fn a_fifo_swapped_in_after_inspection_never_blocks_and_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("log"), b"data").unwrap();
        let dir = dir_fd(tmp.path());
        let inspected = lstat_at(dir.as_fd(), OsStr::new("log")).unwrap().unwrap();
        std::fs::remove_file(tmp.path().join("log")).unwrap();
        nix::unistd::mkfifo(&tmp.path().join("log"), Mode::from_bits_truncate(0o600)).unwrap();
        let started = Instant::now();
        let result = open_verified(dir.as_fd(), OsStr::new("log"), &inspected);
        assert_eq!(result.unwrap_err(), CHANGED);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_fifo_inspected_as_such_opens_without_a_writer() {
        let tmp = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&tmp.path().join("f"), Mode::from_bits_truncate(0o600)).unwrap();
        let dir = dir_fd(tmp.path());
        let st = lstat_at(dir.as_fd(), OsStr::new("f")).unwrap().unwrap();
        open_verified(dir.as_fd(), OsStr::new("f"), &st).unwrap();
    }

    #[test]
    fn a_file_replaced_by_another_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a"), b"1").unwrap();
        std::fs::write(tmp.path().join("b"), b"2").unwrap();
        let dir = dir_fd(tmp.path());
        let inspected = lstat_at(dir.as_fd(), OsStr::new("a")).unwrap().unwrap();
        std::fs::rename(tmp.path().join("b"), tmp.path().join("a")).unwrap();
        assert_eq!(
            open_verified(dir.as_fd(), OsStr::new("a"), &inspected).unwrap_err(),
            CHANGED
        );
    }

    #[test]
    fn a_symlinked_component_is_reported_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("data/alice")).unwrap();
        std::fs::create_dir(tmp.path().join("home")).unwrap();
        std::os::unix::fs::symlink("/data/alice", tmp.path().join("home/alice")).unwrap();
        let dir = dir_fd(tmp.path());
        match open_dir_beneath(dir.as_fd(), &components(OsStr::new("/home/alice/x"))).unwrap() {
            Beneath::Symlink { at: 1, target } => assert_eq!(target, "/data/alice"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            open_dir_beneath(dir.as_fd(), &components(OsStr::new("/data/bob"))).unwrap(),
            Beneath::Missing { at: 1 }
        ));
        assert!(matches!(
            open_dir_beneath(dir.as_fd(), &components(OsStr::new("/data/alice"))).unwrap(),
            Beneath::Dir(..)
        ));
    }
}
