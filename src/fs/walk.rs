//! An iterative walk of one tree that stays on its filesystem.
//!
//! It is [`super::trees::Trees`] over one tree: one descriptor however deep, and a tree moved
//! under the walk is [`super::CHANGED`], never a walk of somewhere else.
//!
//! Mount points below the walked entry are reported and not descended into: a mount point is
//! the root of a mount in `/proc/self/mountinfo` (a bind mount of the same filesystem included)
//! or a directory on another device that is not a btrfs subvolume of the same filesystem
//! (subvolumes are part of the tree and are walked).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::sys::stat::FileStat;

use super::trees::{Error, Here, Step, Trees, Visit, Visitor};
use super::{identity, list, open_verified, Kind};

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

/// A pre-order walk of `parent/name` (any type), as an iterator of events: [`Trees`] over one
/// tree.
pub struct Walk {
    trees: Trees<1, ()>,
    events: Events,
    done: bool,
}

/// What [`Walk`] does with each name: report it, and go into directories but mount points.
struct Events {
    device: u64,
    mounts: MountRoots,
    /// The event of the last name visited, until `next` hands it out.
    pending: Option<WalkEvent>,
}

impl Visitor<1> for Events {
    type Frame = ();
    type Stop = std::convert::Infallible;
    type Error = nix::Error;

    fn visit(&mut self, here: Here<'_, 1>) -> nix::Result<Visit<1, (), Self::Stop>> {
        let st = here.st;
        if here.top {
            self.device = st.st_dev;
        }
        let mount_point = !here.top && self.mounts.is_mount_point(&st, self.device);
        self.pending = Some(WalkEvent {
            rel: here.at.to_path_buf(),
            stat: st,
            mount_point,
        });
        if Kind::of(&st) != Kind::Directory || mount_point {
            return Ok(Visit::Next);
        }
        let fd = open_verified(here.dirs[0], here.names[0], &st)?;
        let names = list(fd.as_fd())?;
        Ok(Visit::Enter([fd], names, ()))
    }
}

impl Walk {
    pub fn new(parent: BorrowedFd<'_>, name: &OsStr, mounts: MountRoots) -> nix::Result<Walk> {
        Ok(Walk {
            trees: Trees::new([parent], [name], Path::new(name))?,
            events: Events {
                device: 0,
                mounts,
                pending: None,
            },
            done: false,
        })
    }
}

impl Iterator for Walk {
    /// An error carries the path it happened at (from the walked entry), once.
    type Item = Result<WalkEvent, (PathBuf, nix::Error)>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            match self.trees.step(&mut self.events) {
                Ok(Step::Going) => {}
                Ok(Step::Done) => self.done = true,
                Ok(Step::Stopped(never)) => match never {},
                Err(Error::Walk(_, e) | Error::Visitor(e)) => {
                    self.done = true;
                    return Some(Err((self.trees.at().to_path_buf(), e)));
                }
            }
            if let Some(event) = self.events.pending.take() {
                return Some(Ok(event));
            }
        }
        None
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
    use crate::fs::CHANGED;
    use nix::sys::stat::Mode;
    use std::os::fd::OwnedFd;

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
