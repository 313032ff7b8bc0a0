//! Listing a directory without one allocation per name, and reaching a path below an open
//! directory by its bytes: what a walk over a million entries needs from this layer.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode};

use super::{components, lstat_at, open_dir_beneath, read_link_at, Beneath};

/// The names of one directory, packed in one buffer (one allocation per directory rather than
/// one per entry), without `.` and `..`, in the filesystem's order.
#[derive(Debug, Default)]
pub struct Names {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Names {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &OsStr> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| OsStr::from_bytes(&self.bytes[start..end]))
    }
}

/// The names in an open directory, read through a descriptor of its own (so the listing has an
/// offset of its own).
pub fn list_names(dir: BorrowedFd<'_>) -> nix::Result<Names> {
    let mut stream = nix::dir::Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Names::default();
    for entry in stream.iter() {
        let entry = entry?;
        let bytes = entry.file_name().to_bytes();
        if bytes != b"." && bytes != b".." {
            names.bytes.extend_from_slice(bytes);
            names.ends.push(names.bytes.len());
        }
    }
    Ok(names)
}

/// Open the directory at `path` (`/a/b`, relative to `start` whatever its leading slash) with
/// [`open_dir_beneath`]: never following a symlink, every component verified. Where it stops
/// is an errno: ENOENT (missing), ELOOP (a symlink), ENOTDIR (something else).
pub fn open_dir_at_path(start: BorrowedFd<'_>, path: &[u8]) -> nix::Result<OwnedFd> {
    match open_dir_beneath(start, &components(OsStr::from_bytes(path)))? {
        Beneath::Dir(fd, _) => Ok(fd),
        Beneath::Missing { .. } => Err(Errno::ENOENT),
        Beneath::Symlink { .. } => Err(Errno::ELOOP),
        Beneath::NotDirectory { .. } => Err(Errno::ENOTDIR),
    }
}

/// The directory holding `path` (opened as [`open_dir_at_path`] does) and the last name.
fn parent_of<'p>(start: BorrowedFd<'_>, path: &'p [u8]) -> nix::Result<(OwnedFd, &'p OsStr)> {
    let split = path.iter().rposition(|&b| b == b'/').unwrap_or(0);
    let name = path[split..].strip_prefix(b"/").unwrap_or(&path[split..]);
    if name.is_empty() {
        return Err(Errno::EINVAL);
    }
    Ok((
        open_dir_at_path(start, &path[..split])?,
        OsStr::from_bytes(name),
    ))
}

/// `lstat` of `path` below `start`, never following a symlink on the way; `None` when it, or
/// a directory on the way, does not exist (or is not a directory).
pub fn lstat_at_path(start: BorrowedFd<'_>, path: &[u8]) -> nix::Result<Option<FileStat>> {
    match parent_of(start, path) {
        Ok((parent, name)) => lstat_at(parent.as_fd(), name),
        Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The target of the symlink at `path` below `start`, never following a symlink on the way.
pub fn read_link_at_path(start: BorrowedFd<'_>, path: &[u8]) -> nix::Result<Vec<u8>> {
    let (parent, name) = parent_of(start, path)?;
    Ok(read_link_at(parent.as_fd(), name)?.into_encoded_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_reaches_by_path_without_following() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a/b")).unwrap();
        std::fs::write(tmp.path().join("a/b/f"), b"x").unwrap();
        std::os::unix::fs::symlink("b", tmp.path().join("a/l")).unwrap();
        let top: OwnedFd = std::fs::File::open(tmp.path()).unwrap().into();
        let a = open_dir_at_path(top.as_fd(), b"/a").unwrap();
        let mut names: Vec<_> = list_names(a.as_fd())
            .unwrap()
            .iter()
            .map(|n| n.to_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["b", "l"]);
        assert!(lstat_at_path(top.as_fd(), b"/a/b/f").unwrap().is_some());
        assert!(lstat_at_path(top.as_fd(), b"/a/l/f").unwrap().is_none());
        assert_eq!(
            open_dir_at_path(top.as_fd(), b"/a/l").unwrap_err(),
            Errno::ELOOP
        );
        assert_eq!(read_link_at_path(top.as_fd(), b"/a/l").unwrap(), b"b");
    }
}
