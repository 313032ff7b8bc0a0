//! The btrfs engine: ask the filesystem which inodes changed since the blank, instead of
//! looking at every file.
//!
//! The marker is the transaction where the root and the blank parted (see [`marker`]). Every
//! inode item written after it is a candidate; an inode created after it is new, an older one
//! is compared with what the blank holds at the same path (mode, owner, size, mtime, ctime),
//! so an atime-only update is not reported and a renamed file is reported under its new name.
//! A renamed directory takes its unchanged contents to paths the blank does not have: its
//! subtree is handed to the walk, which reports them exactly as the walk engine would.
//!
//! Subvolumes nested in the tree have trees of their own, which the search above does not
//! read; `rollback` moves them away with the root all the same. They are found by id in the
//! root tree (their ROOT_REFs), and each is handed to the walk, everything in it new.
//!
//! A directory whose ctime moved is also compared by its extended attributes (ACLs), which
//! its inode item does not hold, and its `chattr` flags.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{Context, Result};

use super::rules::{under, Rules};
use super::walk::{join, open_beneath, stat_beneath, Walk};
use super::{FoundList, Kind, Meta, Status};
use crate::btrfs::find_new::{self, DirPaths};
use crate::btrfs::tree;
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
    progress: Option<&indicatif::ProgressBar>,
) -> Result<FoundList> {
    let after = blank.as_ref().map_or(0, |b| b.marker);
    // btrfs keeps recent inode updates in memory (delayed inodes) until a commit; the tree
    // search sees only committed items, so commit first. Cheap when nothing is pending.
    nix::unistd::syncfs(fs).context("syncing the filesystem before reading its trees")?;
    // Most of a diff's time is the kernel copying tree items out, one by one, and that scales
    // with cores: a few threads take ranges of inode numbers from a shared list. Many ranges
    // per thread keep them all busy when one range holds more changes than another, and keep
    // what a thread holds at once (a range's items, then its paths) a small part of the whole.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
    let ranges = find_new::changed_ranges(fs, tree_id, after, 64 * threads as u64)?;
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    // Each range's paths go into one shared list as soon as it is resolved, so memory holds
    // the result once (not once per thread and again merged); each thread reuses its buffers
    // from one range to the next: fresh memory costs a page fault per 4 KiB.
    let shared = Mutex::new(FoundList::default());
    let per_thread: Vec<Result<Resolved>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.min(ranges.len()))
            .map(|_| {
                scope.spawn(|| -> Result<Resolved> {
                    let mut resolver = Resolver::new(fs, tree, tree_id, blank.as_ref(), rules);
                    let mut changed = find_new::Changed::default();
                    let mut resolved = Resolved::default();
                    while let Some(&range) = ranges.get(next.fetch_add(1, Ordering::Relaxed)) {
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        let result =
                            find_new::changed_inodes(fs, tree_id, after, range, &mut changed)
                                .and_then(|()| resolver.resolve(&changed, &mut resolved));
                        shared.lock().unwrap().append(&mut resolved.found);
                        if let Some(bar) = progress {
                            bar.inc(changed.inodes.len() as u64);
                        }
                        if result.is_err() {
                            failed.store(true, Ordering::Relaxed);
                            result?;
                        }
                    }
                    Ok(resolved)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut moved: Vec<Vec<u8>> = Vec::new();
    for result in per_thread {
        moved.append(&mut result?.moved);
    }
    let mut found = shared.into_inner().unwrap();
    // Nested subvolumes: reported, and walked, as a whole.
    let mut dirs = DirPaths::new(fs, tree_id);
    let mut excluded_dirs = HashMap::new();
    for child in tree::child_subvolumes(fs, tree_id)? {
        let Some(parent) = dirs.get(child.dirid)? else {
            continue;
        };
        let parent = parent.to_vec();
        if dir_excluded(rules, &mut excluded_dirs, &parent) {
            continue;
        }
        let path = join(&parent, &child.name);
        if rules.check(&path, true, None).is_some() {
            continue;
        }
        found.push(&path, Kind::Directory, Status::New, 0);
        moved.push(path);
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
    found.sort_dedup();
    Ok(found)
}

/// What changed inodes come to: the paths to report (in sorted runs, one per range), and the
/// directories that were moved away from where the blank has them (to be walked).
#[derive(Default)]
struct Resolved {
    found: FoundList,
    moved: Vec<Vec<u8>>,
}

/// Turns changed inodes into reported paths; one per thread, each remembering the directories
/// it has resolved.
struct Resolver<'a> {
    dirs: DirPaths<'a>,
    tree: &'a OwnedFd,
    blank: Option<&'a Blank<'a>>,
    rules: &'a Rules,
    excluded_dirs: HashMap<Vec<u8>, bool>,
    /// Per parent inode: its path, or None when it (or a directory above it) is left out.
    parents: HashMap<u64, Option<Vec<u8>>>,
}

impl<'a> Resolver<'a> {
    fn new(
        fs: BorrowedFd<'a>,
        tree: &'a OwnedFd,
        tree_id: u64,
        blank: Option<&'a Blank<'a>>,
        rules: &'a Rules,
    ) -> Self {
        Resolver {
            dirs: DirPaths::new(fs, tree_id),
            tree,
            blank,
            rules,
            excluded_dirs: HashMap::new(),
            parents: HashMap::new(),
        }
    }

    fn resolve(&mut self, changed: &find_new::Changed, out: &mut Resolved) -> Result<()> {
        let after = self.blank.map_or(0, |b| b.marker);
        let Resolved { found, moved } = out;
        let mut last_parent: Option<u64> = None;
        let mut parent_path: Option<Vec<u8>> = None;
        for inode in &changed.inodes {
            let kind = Kind::from_mode(inode.item.mode);
            let is_dir = kind == Kind::Directory;
            let created_after = self.blank.is_none() || inode.item.generation > after;
            let meta = Meta::from_item(inode.ino, &inode.item);
            let symlink_target = changed.symlink_target(inode);
            for (parent_ino, name) in changed.names(inode) {
                // Most names sit in the same directory as the one before them.
                if last_parent != Some(parent_ino) && !self.parents.contains_key(&parent_ino) {
                    // None: the directory went away while we looked, and so did this name.
                    let resolved = self
                        .dirs
                        .get(parent_ino)?
                        .map(<[u8]>::to_vec)
                        .filter(|p| !dir_excluded(self.rules, &mut self.excluded_dirs, p));
                    self.parents.insert(parent_ino, resolved);
                }
                if last_parent != Some(parent_ino) {
                    last_parent = Some(parent_ino);
                    parent_path = self.parents[&parent_ino].clone();
                }
                let Some(parent) = &parent_path else {
                    continue;
                };
                let path = join(parent, name);
                if self.rules.check(&path, is_dir, symlink_target).is_some() {
                    continue;
                }
                let status = match (self.blank, created_after) {
                    (Some(blank), false) => match stat_beneath(blank.fd, &path)
                        .filter(|st| st.st_ino == inode.ino && Kind::from_mode(st.st_mode) == kind)
                    {
                        Some(st)
                            if meta.same_as(&Meta::from_stat(&st))
                                && (!meta.needs_attribute_check(&Meta::from_stat(&st))
                                    || same_attributes(self.tree, blank.fd, parent, name)) =>
                        {
                            None
                        }
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
                    found.push(&path, kind, status, meta.reported_size());
                }
            }
        }
        Ok(())
    }
}

/// Whether the directory `name` in `parent` has the same extended attributes and `chattr`
/// flags in the live tree and in the blank; what cannot be opened counts as different.
fn same_attributes(tree: &OwnedFd, blank: &OwnedFd, parent: &[u8], name: &[u8]) -> bool {
    let (Ok(live_dir), Ok(blank_dir)) = (open_beneath(tree, parent), open_beneath(blank, parent))
    else {
        return false;
    };
    super::same_dir_attributes(
        live_dir.as_fd(),
        blank_dir.as_fd(),
        std::os::unix::ffi::OsStrExt::from_bytes(name),
    )
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
