//! A position deep in a tree held with one descriptor.
//!
//! A walk that keeps every directory above it open needs one descriptor per level, and a
//! 2,000-level tree runs out of them (EMFILE under the usual soft limit of 1024). A [`Cursor`]
//! keeps only the deepest directory open, and the identity (device and inode) of each one above
//! it. Going back up opens `..` and checks that it is the directory that was left: a tree moved
//! under the walk is [`super::CHANGED`], never a walk of somewhere else.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::{fstat, identity, CHANGED};

pub struct Cursor {
    current: OwnedFd,
    /// The identity of each directory from the first one to the current one.
    ids: Vec<(u64, u64)>,
}

impl Cursor {
    /// Start at the open directory `dir`.
    pub fn new(dir: OwnedFd) -> nix::Result<Cursor> {
        let id = identity(&fstat(dir.as_fd())?);
        Ok(Cursor {
            current: dir,
            ids: vec![id],
        })
    }

    /// The directory the cursor is at.
    pub fn dir(&self) -> BorrowedFd<'_> {
        self.current.as_fd()
    }

    /// Go down into `child`, a directory opened (and verified) inside the current one; the
    /// current one is closed.
    pub fn enter(&mut self, child: OwnedFd) -> nix::Result<()> {
        self.ids.push(identity(&fstat(child.as_fd())?));
        self.current = child;
        Ok(())
    }

    /// Go back up one level: open `..` and check it is the directory the cursor came from.
    /// At the first directory it stays there.
    pub fn leave(&mut self) -> nix::Result<()> {
        if self.ids.len() < 2 {
            return Ok(());
        }
        let up = nix::fcntl::openat(
            self.current.as_fd(),
            "..",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        if identity(&fstat(up.as_fd())?) != self.ids[self.ids.len() - 2] {
            return Err(CHANGED);
        }
        self.ids.pop();
        self.current = up;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn going_up_a_directory_that_was_moved_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a/b")).unwrap();
        std::fs::create_dir(tmp.path().join("elsewhere")).unwrap();
        let top: OwnedFd = std::fs::File::open(tmp.path().join("a")).unwrap().into();
        let mut cursor = Cursor::new(top).unwrap();
        let (b, _) = crate::fs::open_dir(cursor.dir(), OsStr::new("b"))
            .unwrap()
            .unwrap();
        cursor.enter(b).unwrap();
        std::fs::rename(tmp.path().join("a/b"), tmp.path().join("elsewhere/b")).unwrap();
        assert_eq!(cursor.leave().unwrap_err(), CHANGED);
        std::fs::rename(tmp.path().join("elsewhere/b"), tmp.path().join("a/b")).unwrap();
        cursor.leave().unwrap();
        let top = std::fs::metadata(tmp.path().join("a")).unwrap();
        let here = fstat(cursor.dir()).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(here.st_ino, top.ino());
    }
}
