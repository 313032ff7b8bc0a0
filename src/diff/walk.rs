//! The portable engine: walk the live tree with `openat`, compare each entry with the same path
//! in the blank (when there is one), and keep what the rules do not leave out.
//!
//! Every directory is opened relative to its parent with O_NOFOLLOW, so a symlink planted in
//! the tree is reported, never followed. The walk stays on the device it started on and skips
//! subvolume tops (inode 256) and btrfs's empty-subvolume placeholders (inode 2): those are
//! other filesystems or other subvolumes, which the next boot does not erase with this root.

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};

use anyhow::{Context, Result};
use nix::dir::Dir;
use nix::fcntl::{readlinkat, AtFlags};
use nix::sys::stat::{fstat, fstatat, FileStat};

use super::rules::Rules;
use super::{Found, Kind, Meta, Status};
use crate::btrfs;

struct Frame {
    dir: Dir,
    blank: Option<OwnedFd>,
    path: Vec<u8>,
    /// Subdirectories still to visit, with whether the blank holds the same directory there.
    subdirs: Vec<(CString, bool)>,
}

pub struct Walk<'a> {
    rules: &'a Rules,
    device: u64,
    on_btrfs: bool,
    pub found: Vec<Found>,
    pub visited: u64,
    progress: Option<indicatif::ProgressBar>,
}

impl<'a> Walk<'a> {
    /// A walk of the tree whose top is open at `top` (the device is taken from it).
    pub fn new(
        rules: &'a Rules,
        top: &OwnedFd,
        progress: Option<indicatif::ProgressBar>,
    ) -> Result<Walk<'a>> {
        let st = fstat(top.as_fd()).context("inspecting the tree to walk")?;
        Ok(Walk {
            rules,
            device: st.st_dev,
            on_btrfs: btrfs::is_btrfs(top.as_fd())?,
            found: Vec::new(),
            visited: 0,
            progress,
        })
    }

    /// Visit everything below the directory open at `live` (whose path is `path`, empty for the
    /// top), comparing with the directory open at `blank`.
    pub fn run(&mut self, live: OwnedFd, blank: Option<OwnedFd>, path: Vec<u8>) -> Result<()> {
        let mut stack = vec![self.read_dir(live, blank, path)?];
        while let Some(frame) = stack.last_mut() {
            let Some((name, in_blank)) = frame.subdirs.pop() else {
                stack.pop();
                continue;
            };
            let live =
                match btrfs::open_dir_at(frame.dir.as_fd(), name.as_c_str().to_bytes().as_ref_os())
                {
                    Ok(fd) => fd,
                    // Gone or replaced since it was listed: the tree is live.
                    Err(
                        nix::errno::Errno::ENOENT
                        | nix::errno::Errno::ENOTDIR
                        | nix::errno::Errno::ELOOP,
                    ) => continue,
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!(
                                "opening {}",
                                super::escape(&join(&frame.path, name.to_bytes()))
                            )
                        })
                    }
                };
            let blank = match (&frame.blank, in_blank) {
                (Some(blank), true) => {
                    btrfs::open_dir_at(blank.as_fd(), name.as_c_str().to_bytes().as_ref_os()).ok()
                }
                _ => None,
            };
            let path = join(&frame.path, name.to_bytes());
            let next = self.read_dir(live, blank, path)?;
            stack.push(next);
        }
        if let Some(bar) = &self.progress {
            bar.set_position(self.visited);
        }
        Ok(())
    }

    fn read_dir(&mut self, live: OwnedFd, blank: Option<OwnedFd>, path: Vec<u8>) -> Result<Frame> {
        let mut dir =
            Dir::from_fd(live).with_context(|| format!("reading {}", super::escape(&path)))?;
        let mut names: Vec<CString> = Vec::new();
        for entry in dir.iter() {
            let entry = entry.with_context(|| format!("reading {}", super::escape(&path)))?;
            let name = entry.file_name();
            if name != c"." && name != c".." {
                names.push(name.to_owned());
            }
        }
        let mut subdirs = Vec::new();
        for name in names {
            self.visited += 1;
            if self.visited % 8192 == 0 {
                if let Some(bar) = &self.progress {
                    bar.set_position(self.visited);
                }
            }
            let st = match fstatat(dir.as_fd(), name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(nix::errno::Errno::ENOENT) => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "inspecting {}",
                            super::escape(&join(&path, name.to_bytes()))
                        )
                    })
                }
            };
            let kind = Kind::from_mode(st.st_mode);
            if kind == Kind::Directory
                && (st.st_dev != self.device
                    || (self.on_btrfs
                        && (st.st_ino == btrfs::FIRST_FREE_OBJECTID || st.st_ino == 2)))
            {
                continue;
            }
            let full = join(&path, name.to_bytes());
            let target = if kind == Kind::Symlink {
                readlinkat(dir.as_fd(), name.as_c_str())
                    .ok()
                    .map(|t| t.as_encoded_bytes().to_vec())
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
            let in_blank = blank
                .as_ref()
                .and_then(|b| {
                    fstatat(b.as_fd(), name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW).ok()
                })
                .filter(|b| b.st_ino == st.st_ino && Kind::from_mode(b.st_mode) == kind);
            let status = match &in_blank {
                None => Some(Status::New),
                Some(b) if live_meta.same_as(&Meta::from_stat(b)) => None,
                Some(_) => Some(Status::Modified),
            };
            if kind == Kind::Directory {
                subdirs.push((name, in_blank.is_some()));
            }
            if let Some(status) = status {
                self.found.push(Found {
                    path: full,
                    kind,
                    status,
                    size: live_meta.reported_size(),
                });
            }
        }
        // Popped from the end: reverse so directories are visited in listing order.
        subdirs.reverse();
        Ok(Frame {
            dir,
            blank,
            path,
            subdirs,
        })
    }
}

pub fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut path = Vec::with_capacity(dir.len() + 1 + name.len());
    path.extend_from_slice(dir);
    path.push(b'/');
    path.extend_from_slice(name);
    path
}

trait AsOsStr {
    fn as_ref_os(&self) -> &std::ffi::OsStr;
}

impl AsOsStr for [u8] {
    fn as_ref_os(&self) -> &std::ffi::OsStr {
        std::os::unix::ffi::OsStrExt::from_bytes(self)
    }
}

/// Open a directory below `top` by its path (`/a/b`), one component at a time, never
/// following a symlink.
pub fn open_beneath(top: &OwnedFd, path: &[u8]) -> nix::Result<OwnedFd> {
    let mut current = nix::unistd::dup(top.as_fd())?;
    for component in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
        current = btrfs::open_dir_at(current.as_fd(), component.as_ref_os())?;
    }
    Ok(current)
}

/// `lstat` of a path below `top`, never following a symlink on the way.
pub fn stat_beneath(top: &OwnedFd, path: &[u8]) -> Option<FileStat> {
    let split = path.iter().rposition(|&b| b == b'/')?;
    let parent = open_beneath(top, &path[..split]).ok()?;
    let name = CString::new(&path[split + 1..]).ok()?;
    fstatat(
        parent.as_fd(),
        name.as_c_str(),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .ok()
}
