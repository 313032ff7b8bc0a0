//! The portable engine: walk the live tree through the descriptor layer ([`crate::fs`]), compare each entry with the same path
//! in the blank (when there is one), and keep what the rules do not leave out.
//!
//! Every directory is opened beneath the top one component at a time, never following a
//! symlink, and each descriptor is checked to be the inode that was inspected, so a symlink
//! planted in the tree is reported, never followed. The walk stays on the device it started on, with one
//! exception: a subvolume nested inside the tree (a container's or snapper's subvolume below
//! `/`) leaves with the root when `rollback` moves it away, and `prune` deletes it with the old
//! root, so the walk descends into it and reports all of it as new. What is mounted there from
//! elsewhere (another filesystem, a subvolume that is not this tree's child) is skipped: it
//! survives the boot. btrfs's empty-subvolume placeholders (inode 2) hold nothing.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use anyhow::{Context, Result};
use nix::sys::stat::FileStat;

use super::rules::Rules;
use super::{FoundList, Kind, Meta, Status};
use crate::btrfs;
use crate::fs;

/// A directory still to read: its path (from the tree's top), whether the blank holds the
/// same directory there, and the device it was listed on (None: whatever it is when opened).
/// Paths, not open fds, so that a wide tree cannot exhaust descriptors; each is opened again
/// from the top, one component at a time, with O_NOFOLLOW.
type Task = (Vec<u8>, bool, Option<u64>);

struct Queue {
    tasks: Vec<Task>,
    busy: usize,
}

pub struct Walk<'a> {
    rules: &'a Rules,
    on_btrfs: bool,
    visited: AtomicU64,
    progress: Option<indicatif::ProgressBar>,
}

impl<'a> Walk<'a> {
    /// A walk of the tree whose top is open at `top` (the device is taken from it).
    pub fn new(
        rules: &'a Rules,
        top: &OwnedFd,
        progress: Option<indicatif::ProgressBar>,
    ) -> Result<Walk<'a>> {
        Ok(Walk {
            rules,
            on_btrfs: btrfs::is_btrfs(top.as_fd())?,
            visited: AtomicU64::new(0),
            progress,
        })
    }

    /// Everything below `start` (a directory path from the top of `live`, empty for the top
    /// itself), compared with the same places in `blank` when `start_in_blank`. Directories are
    /// read by a few threads: the work is one `lstat` per entry, which the kernel serves in
    /// parallel.
    pub fn run(
        &self,
        live: &OwnedFd,
        blank: Option<&OwnedFd>,
        start: Vec<u8>,
        start_in_blank: bool,
    ) -> Result<FoundList> {
        let queue = Mutex::new(Queue {
            tasks: vec![(start, start_in_blank && blank.is_some(), None)],
            busy: 0,
        });
        let wake = Condvar::new();
        let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
        let results: Vec<FoundList> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut found = FoundList::default();
                        loop {
                            let task = {
                                let mut q = queue.lock().unwrap();
                                loop {
                                    if let Some(task) = q.tasks.pop() {
                                        q.busy += 1;
                                        break Some(task);
                                    }
                                    if q.busy == 0 {
                                        break None;
                                    }
                                    q = wake.wait(q).unwrap();
                                }
                            };
                            let Some(task) = task else {
                                wake.notify_all();
                                break;
                            };
                            let mut subdirs = Vec::new();
                            if failure.lock().unwrap().is_none() {
                                if let Err(e) =
                                    self.read_dir(live, blank, &task, &mut found, &mut subdirs)
                                {
                                    failure.lock().unwrap().get_or_insert(e);
                                }
                            }
                            let mut q = queue.lock().unwrap();
                            q.tasks.append(&mut subdirs);
                            q.busy -= 1;
                            drop(q);
                            wake.notify_all();
                        }
                        // Sorted on this thread, so that the final sort only merges.
                        found.sort_from(0);
                        found
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        if let Some(e) = failure.into_inner().unwrap() {
            return Err(e);
        }
        if let Some(bar) = &self.progress {
            bar.set_position(self.visited.load(Ordering::Relaxed));
        }
        let mut found = FoundList::default();
        for mut part in results {
            found.append(&mut part);
        }
        found.sort_from(0);
        Ok(found)
    }

    fn read_dir(
        &self,
        live_top: &OwnedFd,
        blank_top: Option<&OwnedFd>,
        (path, in_blank, expected_device): &Task,
        found: &mut FoundList,
        subdirs: &mut Vec<Task>,
    ) -> Result<()> {
        let (path, in_blank, expected_device) = (path.as_slice(), *in_blank, *expected_device);
        let live = match open_beneath(live_top, path) {
            Ok(fd) => fd,
            // Gone or replaced since it was listed: the tree is live.
            Err(
                nix::errno::Errno::ENOENT
                | nix::errno::Errno::ENOTDIR
                | nix::errno::Errno::ELOOP
                | fs::CHANGED,
            ) => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("opening {}", super::escape(path))),
        };
        // Opened again by path: if something was mounted there since it was listed, stop.
        let Ok(dir_st) = fs::fstat(live.as_fd()) else {
            return Ok(());
        };
        if expected_device.is_some_and(|device| device != dir_st.st_dev) {
            return Ok(());
        }
        let device = dir_st.st_dev;
        let blank = match blank_top {
            Some(top) if in_blank => open_beneath(top, path).ok(),
            _ => None,
        };
        let names = fs::list_names(live.as_fd())
            .with_context(|| format!("reading {}", super::escape(path)))?;
        if names.is_empty() {
            return Ok(());
        }
        let visited = self
            .visited
            .fetch_add(names.len() as u64, Ordering::Relaxed);
        if let Some(bar) = &self.progress {
            if visited / 8192 != (visited + names.len() as u64) / 8192 {
                bar.set_position(visited);
            }
        }
        for name in names.iter() {
            let st = match fs::lstat_at(live.as_fd(), name) {
                Ok(Some(st)) => st,
                Ok(None) => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("inspecting {}", super::escape(&join(path, name.as_bytes())))
                    })
                }
            };
            let kind = Kind::from_mode(st.st_mode);
            // A nested subvolume has a device of its own; anything else on another device is
            // mounted there and survives the boot.
            let nested = kind == Kind::Directory
                && st.st_dev != device
                && self.on_btrfs
                && st.st_ino == btrfs::FIRST_FREE_OBJECTID
                && nested_subvolume_here(live.as_fd(), dir_st.st_ino, name, &st)?;
            if kind == Kind::Directory
                && !nested
                && (st.st_dev != device || (self.on_btrfs && st.st_ino == 2))
            {
                continue;
            }
            let full = join(path, name.as_bytes());
            let target = if kind == Kind::Symlink {
                fs::read_link_at(live.as_fd(), name)
                    .ok()
                    .map(OsString::into_encoded_bytes)
            } else {
                None
            };
            if self
                .rules
                .check(&full, kind == Kind::Directory, target.as_deref())
                .is_some()
            {
                continue;
            }
            let live_meta = Meta::from_stat(&st);
            // A nested subvolume's inode numbers are its own: nothing in the blank matches them.
            let in_blank = blank
                .as_ref()
                .filter(|_| !nested)
                .and_then(|b| fs::lstat_at(b.as_fd(), name).ok().flatten())
                .filter(|b| b.st_ino == st.st_ino && Kind::from_mode(b.st_mode) == kind);
            let status = match &in_blank {
                None => Some(Status::New),
                Some(b) => {
                    let blank_meta = Meta::from_stat(b);
                    let same = live_meta.same_as(&blank_meta)
                        && (!live_meta.needs_attribute_check(&blank_meta)
                            || super::same_dir_attributes(
                                live.as_fd(),
                                blank.as_ref().expect("in the blank").as_fd(),
                                name,
                            ));
                    (!same).then_some(Status::Modified)
                }
            };
            if kind == Kind::Directory {
                subdirs.push((full.clone(), in_blank.is_some(), Some(st.st_dev)));
            }
            if let Some(status) = status {
                found.push(&full, kind, status, live_meta.reported_size());
            }
        }
        Ok(())
    }
}

/// Is the subvolume top `name` (inspected as `st`), inside the directory `dir` (inode
/// `dir_ino`), the subvolume nested at this very place in the tree `dir` belongs to? A subvolume
/// mounted here from elsewhere is not: it belongs to another parent, or hangs elsewhere in this
/// one.
fn nested_subvolume_here(
    dir: BorrowedFd<'_>,
    dir_ino: u64,
    name: &OsStr,
    st: &FileStat,
) -> Result<bool> {
    let Ok(child) = fs::open_verified(dir, name, st) else {
        // Gone (or replaced) since it was listed.
        return Ok(false);
    };
    // Another filesystem (btrfs or not) whose top happens to be inode 256 is a mount.
    let same_filesystem =
        crate::btrfs::fsid(child.as_fd()).is_some_and(|fsid| crate::btrfs::fsid(dir) == Some(fsid));
    let Ok(child) = btrfs::subvol_info(child.as_fd()) else {
        return Ok(false);
    };
    let parent = btrfs::subvol_info(dir)?;
    Ok(same_filesystem && child.parent_id == parent.id && child.dirid == dir_ino)
}

pub fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut path = Vec::with_capacity(dir.len() + 1 + name.len());
    path.extend_from_slice(dir);
    path.push(b'/');
    path.extend_from_slice(name);
    path
}

/// Open a directory below `top` by its path (`/a/b`): the descriptor layer's walk beneath,
/// never following a symlink, each component verified.
pub fn open_beneath(top: &OwnedFd, path: &[u8]) -> nix::Result<OwnedFd> {
    fs::open_dir_at_path(top.as_fd(), path)
}

/// The target of the symlink at `path` below `top`, never following a symlink on the way.
pub fn readlink_beneath(top: &OwnedFd, path: &[u8]) -> Option<Vec<u8>> {
    fs::read_link_at_path(top.as_fd(), path).ok()
}

/// `lstat` of a path below `top`, never following a symlink on the way.
pub fn stat_beneath(top: &OwnedFd, path: &[u8]) -> Option<FileStat> {
    fs::lstat_at_path(top.as_fd(), path).ok().flatten()
}
