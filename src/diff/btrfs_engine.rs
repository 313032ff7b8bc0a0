//! The btrfs engine: ask the filesystem which inodes changed since the blank, instead of
//! looking at every file.
//!
//! The marker is the transaction where the root and the blank parted (see [`marker`]). Every
//! inode item written after it is a candidate; an inode created after it is new, an older one
//! is compared with what the blank holds at the same path (mode, owner, size, mtime, ctime),
//! so an atime-only update is not reported and a renamed file is reported under its new name.
//! A renamed directory takes its unchanged contents to paths the blank does not have: its
//! subtree is handed to the walk, which reports them exactly as the walk engine would.

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};

use anyhow::{Context, Result};

use super::rules::{under, Rules};
use super::walk::{join, stat_beneath, Walk};
use super::{Found, Kind, Meta, Status};
use crate::btrfs::find_new::{self, DirPaths};
use crate::btrfs::SubvolInfo;

/// The transaction after which a change in `tree` is a change relative to `blank`: the blank's
/// generation, lowered to the moment the two were split when one is a snapshot of the other
/// (so that a blank written to after the split cannot hide changes). `None` when neither is
/// a snapshot of the other: then their inode numbers say nothing about each other.
pub fn marker(tree: &SubvolInfo, blank: &SubvolInfo) -> Option<u64> {
    if tree.parent_uuid == blank.uuid {
        Some(blank.generation.min(tree.otransid))
    } else if blank.parent_uuid == tree.uuid {
        Some(blank.generation.min(blank.otransid))
    } else {
        None
    }
}

pub struct Blank<'a> {
    pub fd: &'a OwnedFd,
    pub marker: u64,
}

pub fn run(
    fs: BorrowedFd<'_>,
    tree: &OwnedFd,
    tree_id: u64,
    blank: Option<Blank<'_>>,
    rules: &Rules,
) -> Result<Vec<Found>> {
    let after = blank.as_ref().map_or(0, |b| b.marker);
    // btrfs keeps recent inode updates in memory (delayed inodes) until a commit; the tree
    // search sees only committed items, so commit first. Cheap when nothing is pending.
    nix::unistd::syncfs(fs).context("syncing the filesystem before reading its trees")?;
    let changed = find_new::changed_inodes(fs, tree_id, after)?;
    let mut dirs = DirPaths::new(fs, tree_id);
    let mut excluded_dirs: HashMap<Vec<u8>, bool> = HashMap::new();
    // Per parent inode: its path, or None when it (or a directory above it) is left out.
    let mut parents: HashMap<u64, Option<Vec<u8>>> = HashMap::new();
    let mut found = Vec::new();
    let mut moved: Vec<Vec<u8>> = Vec::new();
    for inode in &changed {
        let kind = Kind::from_mode(inode.item.mode);
        let is_dir = kind == Kind::Directory;
        let created_after = blank.is_none() || inode.item.generation > after;
        let meta = Meta::from_item(inode.ino, &inode.item);
        for name in &inode.names {
            if !parents.contains_key(&name.parent) {
                let resolved = match dirs.get(name.parent) {
                    Ok(parent) => Some(parent.to_vec())
                        .filter(|p| !dir_excluded(rules, &mut excluded_dirs, p)),
                    // The directory went away while we looked: so did this name.
                    Err(_) => None,
                };
                parents.insert(name.parent, resolved);
            }
            let Some(parent) = &parents[&name.parent] else {
                continue;
            };
            let path = join(parent, &name.name);
            if rules
                .check(&path, is_dir, inode.symlink_target.as_deref())
                .is_some()
            {
                continue;
            }
            let status = match (&blank, created_after) {
                (Some(blank), false) => match stat_beneath(blank.fd, &path)
                    .filter(|st| st.st_ino == inode.ino && Kind::from_mode(st.st_mode) == kind)
                {
                    Some(st) if meta.same_as(&Meta::from_stat(&st)) => None,
                    Some(_) => Some(Status::Modified),
                    None => {
                        if is_dir {
                            moved.push(path.clone());
                        }
                        Some(Status::New)
                    }
                },
                _ => Some(Status::New),
            };
            if let Some(status) = status {
                found.push(Found {
                    path,
                    kind,
                    status,
                    size: meta.reported_size(),
                });
            }
        }
    }
    moved.sort();
    let mut walked: Vec<Vec<u8>> = Vec::new();
    for path in moved {
        if walked.iter().any(|w| under(&path, w)) {
            continue;
        }
        let walk = Walk::new(rules, tree, None)?;
        found.append(&mut walk.run(tree, None, path.clone(), false)?);
        walked.push(path);
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found.dedup_by(|a, b| a.path == b.path);
    Ok(found)
}

/// Whether a directory, or one above it, is left out; remembered per directory.
fn dir_excluded(rules: &Rules, memo: &mut HashMap<Vec<u8>, bool>, dir: &[u8]) -> bool {
    if dir.is_empty() {
        return false;
    }
    if let Some(&known) = memo.get(dir) {
        return known;
    }
    let parent = &dir[..dir.iter().rposition(|&b| b == b'/').unwrap_or(0)];
    let excluded = dir_excluded(rules, memo, parent) || rules.check(dir, true, None).is_some();
    memo.insert(dir.to_vec(), excluded);
    excluded
}
