//! An iterative walk of one tree that stays on its filesystem.
//!
//! It holds one descriptor (the directory being listed) and a stack of names, not one
//! descriptor per level, so a 2,000-level tree walks within any file limit and without deep
//! recursion. Going back up re-opens `..` and checks that it is the directory that was left
//! (device and inode); a tree moved under the walk is [`super::CHANGED`], never a walk of
//! somewhere else.
//!
//! Mount points below the walked entry are reported and not descended into: a mount point is
//! the root of a mount in `/proc/self/mountinfo` (a bind mount of the same filesystem included)
//! or a directory on another device that is not a btrfs subvolume of the same filesystem
//! (subvolumes are part of the tree and are walked).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode};

use super::{fstat, identity, list, lstat_at, open_verified, Kind, CHANGED};

/// The inode number of a btrfs subvolume's root directory.
const BTRFS_SUBVOLUME_ROOT_INO: u64 = 256;

/// The (device, inode) of the root of every mount in this mount namespace.
#[derive(Clone, Debug, Default)]
pub struct MountRoots(HashSet<(u64, u64)>);

impl MountRoots {
    /// The mounts at or below `root` (an absolute path): only those can be inside a tree
    /// walked there, and a hung network mount elsewhere is never looked at.
    pub fn below(root: &Path) -> MountRoots {
        let roots = crate::toplevel::mounts()
            .into_iter()
            .filter(|m| m.mount_point.starts_with(root))
            .filter_map(|m| std::fs::symlink_metadata(&m.mount_point).ok())
            .map(|md| {
                use std::os::unix::fs::MetadataExt;
                (md.dev(), md.ino())
            })
            .collect();
        MountRoots(roots)
    }

    /// Is this directory (inspected below `device`) the root of another mount?
    pub fn is_mount_point(&self, st: &FileStat, device: u64) -> bool {
        Kind::of(st) == Kind::Directory
            && (self.0.contains(&identity(st))
                || (st.st_dev != device && st.st_ino != BTRFS_SUBVOLUME_ROOT_INO))
    }
}

/// One name met by the walk.
#[derive(Debug)]
pub struct WalkEvent {
    /// The path from the walked entry, its own name first.
    pub rel: PathBuf,
    pub stat: FileStat,
    /// A mount point: reported, not descended into.
    pub mount_point: bool,
}

struct Frame {
    /// The directory this frame lists, to verify it when coming back up.
    id: (u64, u64),
    names: std::vec::IntoIter<OsString>,
}

/// A pre-order walk of `parent/name` (any type), as an iterator of events.
pub struct Walk {
    start: Option<(OwnedFd, OsString)>,
    device: u64,
    mounts: MountRoots,
    current: Option<OwnedFd>,
    stack: Vec<Frame>,
    rel: PathBuf,
    done: bool,
}

impl Walk {
    pub fn new(parent: BorrowedFd<'_>, name: &OsStr, mounts: MountRoots) -> nix::Result<Walk> {
        Ok(Walk {
            start: Some((nix::unistd::dup(parent)?, name.to_os_string())),
            device: 0,
            mounts,
            current: None,
            stack: Vec::new(),
            rel: PathBuf::new(),
            done: false,
        })
    }

    fn enter(&mut self, fd: OwnedFd, st: &FileStat, name: &OsStr) -> nix::Result<()> {
        let names = list(fd.as_fd())?;
        self.stack.push(Frame {
            id: identity(st),
            names: names.into_iter(),
        });
        self.current = Some(fd);
        self.rel.push(name);
        Ok(())
    }

    /// Back up one level: re-open `..` and check it is the directory we came from.
    fn leave(&mut self) -> nix::Result<()> {
        self.stack.pop();
        let Some(parent) = self.stack.last() else {
            self.rel.pop();
            self.current = None;
            return Ok(());
        };
        let here = self.current.take().expect("a frame has its directory open");
        let up = nix::fcntl::openat(
            here.as_fd(),
            "..",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        // An error names the directory being left (still in `rel`).
        if identity(&fstat(up.as_fd())?) != parent.id {
            return Err(CHANGED);
        }
        self.rel.pop();
        self.current = Some(up);
        Ok(())
    }

    fn step(&mut self) -> nix::Result<Option<WalkEvent>> {
        if let Some((parent, name)) = self.start.take() {
            let Some(st) = lstat_at(parent.as_fd(), &name)? else {
                return Ok(None);
            };
            self.device = st.st_dev;
            if Kind::of(&st) == Kind::Directory {
                let fd = open_verified(parent.as_fd(), &name, &st)?;
                self.enter(fd, &st, &name)?;
            }
            return Ok(Some(WalkEvent {
                rel: PathBuf::from(&name),
                stat: st,
                mount_point: false,
            }));
        }
        loop {
            let Some(frame) = self.stack.last_mut() else {
                return Ok(None);
            };
            let Some(name) = frame.names.next() else {
                self.leave()?;
                continue;
            };
            let dir = self
                .current
                .as_ref()
                .expect("a frame has its directory open");
            // Gone since the listing: nothing to see.
            let Some(st) = lstat_at(dir.as_fd(), &name)? else {
                continue;
            };
            let rel = self.rel.join(&name);
            let mount_point = self.mounts.is_mount_point(&st, self.device);
            if Kind::of(&st) == Kind::Directory && !mount_point {
                let fd = open_verified(dir.as_fd(), &name, &st)?;
                self.enter(fd, &st, &name)?;
            }
            return Ok(Some(WalkEvent {
                rel,
                stat: st,
                mount_point,
            }));
        }
    }
}

impl Iterator for Walk {
    /// An error carries the path it happened at (from the walked entry), once.
    type Item = Result<WalkEvent, (PathBuf, nix::Error)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(event)) => Some(Ok(event)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err((self.rel.clone(), e)))
            }
        }
    }
}

/// What measuring a tree found: regular-file bytes, items, and the mount points left out.
#[derive(Debug, Default, Clone)]
pub struct Measure {
    pub bytes: u64,
    pub items: u64,
    pub mount_points: Vec<PathBuf>,
}

/// Walk `parent/name` and add up what a copy of it holds.
pub fn measure(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    mounts: &MountRoots,
) -> Result<Measure, (PathBuf, nix::Error)> {
    let mut out = Measure::default();
    let walk = Walk::new(parent, name, mounts.clone()).map_err(|e| (PathBuf::from(name), e))?;
    for event in walk {
        let event = event?;
        if event.mount_point {
            out.mount_points.push(event.rel);
            continue;
        }
        out.items += 1;
        if Kind::of(&event.stat) == Kind::File {
            out.bytes += event.stat.st_size as u64;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deep_tree_walks_with_few_descriptors() {
        let tmp = tempfile::tempdir().unwrap();
        let root: OwnedFd = std::fs::File::open(tmp.path()).unwrap().into();
        let mut dir = nix::unistd::dup(root.as_fd()).unwrap();
        nix::sys::stat::mkdirat(root.as_fd(), "deep", Mode::from_bits_truncate(0o755)).unwrap();
        dir = super::super::open_dir(dir.as_fd(), OsStr::new("deep"))
            .unwrap()
            .unwrap()
            .0;
        for _ in 0..3000 {
            nix::sys::stat::mkdirat(dir.as_fd(), "d", Mode::from_bits_truncate(0o755)).unwrap();
            dir = super::super::open_dir(dir.as_fd(), OsStr::new("d"))
                .unwrap()
                .unwrap()
                .0;
        }
        drop(dir);
        let m = measure(root.as_fd(), OsStr::new("deep"), &MountRoots::default()).unwrap();
        assert_eq!(m.items, 3001);
        assert!(m.mount_points.is_empty());
    }

    #[test]
    fn a_directory_moved_during_the_walk_stops_it_instead_of_walking_elsewhere() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a/b/c")).unwrap();
        std::fs::create_dir_all(tmp.path().join("a/z")).unwrap();
        std::fs::create_dir(tmp.path().join("elsewhere")).unwrap();
        let root: OwnedFd = std::fs::File::open(tmp.path()).unwrap().into();
        let walk = Walk::new(root.as_fd(), OsStr::new("a"), MountRoots::default()).unwrap();
        let mut outcome = Vec::new();
        for event in walk {
            match event {
                Ok(event) => {
                    if event.rel == Path::new("a/b/c") {
                        std::fs::rename(tmp.path().join("a/b"), tmp.path().join("elsewhere/b"))
                            .unwrap();
                    }
                    outcome.push(Ok(event.rel));
                }
                Err((rel, e)) => outcome.push(Err((rel, e))),
            }
        }
        // Whether z was listed before b or not, the walk never goes on from `elsewhere`.
        assert_eq!(
            outcome.last().unwrap().as_ref().unwrap_err(),
            &(PathBuf::from("a/b"), CHANGED),
            "{outcome:?}"
        );
    }
}
