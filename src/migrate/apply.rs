//! Executing a plan. Every entry is copied into a temporary name beside its final place
//! (`.<name>.rasa-migrate`, inside the storage root, so on the same filesystem) and renamed
//! into place only once complete and synced: after a crash the final name either does not
//! exist or holds a whole copy, and the rerun deletes the leftover temporary copy and starts
//! that entry again.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::plan::{fs_error, hostile_in_storage, open_storage_root, Method, Plan, PlannedEntry};
use super::record::{self, Action, RecordEntry, RecordRun};
use crate::copy::{self, Copier};
use crate::failpoint;
use crate::fs::{self, Beneath, Kind, MountRoots};
use crate::manifest::EntryKind;

pub fn apply(plan: &mut Plan, live: BorrowedFd<'_>, live_root: &Path) -> Result<()> {
    let total: u64 = plan
        .entries
        .iter()
        .filter(|e| e.will_copy())
        .map(|e| e.bytes)
        .sum();
    let bar = crate::log::copy_progress(total);
    // Mounts are read again: one made since the plan is not copied either.
    let mounts = MountRoots::below(live_root);
    for planned in plan.entries.iter_mut() {
        let result = if planned.will_copy() {
            bar.set_message(planned.path.clone());
            copy_entry(planned, live, live_root, &mounts, &|n| bar.inc(n))
        } else if planned.action == Action::CreateEmpty {
            create_empty(planned, live, live_root)
        } else {
            continue;
        };
        if let Err(e) = result {
            bar.abandon();
            return Err(e.context(format!(
                "migrating {} (entries before it are complete; rerun to finish)",
                planned.path
            )));
        }
    }
    bar.finish_and_clear();
    // A neededForBoot entry covered by a directory entry exists in storage once that entry is
    // copied, unless it existed nowhere: then it is created empty, as on its own.
    for planned in plan.entries.iter_mut() {
        if planned.action == Action::Covered && planned.needed_for_boot {
            let (_, storage_parent, name) = open_both_sides(planned, live, live_root)?;
            if fs::lstat_at(storage_parent.as_fd(), &name)?.is_none() {
                create_empty(planned, live, live_root).with_context(|| {
                    format!("creating {} (needed for boot)", planned.storage_path)
                })?;
            }
        }
    }
    Ok(())
}

/// The live parent of an entry and the storage directory that will hold its copy (created as
/// needed), as they are now.
fn open_both_sides(
    planned: &PlannedEntry,
    live: BorrowedFd<'_>,
    live_root: &Path,
) -> Result<(Option<OwnedFd>, OwnedFd, OsString)> {
    let parts = fs::components(OsStr::new(&planned.path));
    let (name, parents) = parts.split_last().expect("validated: not /");
    let live_parent =
        match fs::open_dir_beneath(live, parents).map_err(|e| fs_error(&planned.path, e))? {
            Beneath::Dir(fd, _) => Some(fd),
            Beneath::Missing { .. } => None,
            _ => anyhow::bail!("{} changed since the plan was made", planned.path),
        };
    let storage_root = open_storage_root(live, live_root, &planned.storage_root)?;
    let storage_parent = ensure_parents(storage_root.as_fd(), live, parents, planned)?;
    Ok((live_parent, storage_parent, name.clone()))
}

fn copy_entry(
    planned: &mut PlannedEntry,
    live: BorrowedFd<'_>,
    live_root: &Path,
    mounts: &MountRoots,
    progress: &dyn Fn(u64),
) -> Result<()> {
    let (live_parent, storage_parent, name) = open_both_sides(planned, live, live_root)?;
    let Some(live_parent) = live_parent else {
        anyhow::bail!("{} changed since the plan was made", planned.path);
    };
    let temp = temp_name(&name);
    // A leftover from an interrupted run: ours by its name, and never complete.
    copy::remove_tree(storage_parent.as_fd(), &temp)
        .with_context(|| format!("removing the leftover {}", Path::new(&temp).display()))?;
    let reflink = planned.method == Some(Method::Reflink);
    let after_file = || failpoint::hit("migrate-copied-file");
    let device = fs::lstat_at(live_parent.as_fd(), &name)
        .map_err(|e| fs_error(&planned.path, e))?
        .map_or(0, |st| st.st_dev);
    let left_out = |st: &nix::libc::stat| mounts.is_mount_point(st, device);
    let mut copier = Copier::new(reflink, progress, &after_file).leaving_out(&left_out);
    copier.copy(live_parent.as_fd(), &name, storage_parent.as_fd(), &temp)?;
    copy::sync_filesystem(storage_parent.as_fd())?;
    if planned.action == Action::Conflict {
        let backup = backup_name(&name);
        rename_noreplace(storage_parent.as_fd(), &name, &backup)?;
        planned.backup = Some(format!(
            "{}/{}",
            Path::new(&planned.storage_path)
                .parent()
                .unwrap_or(Path::new("/"))
                .display(),
            Path::new(&backup).display()
        ));
    }
    rename_noreplace(storage_parent.as_fd(), &temp, &name)?;
    copy::sync_filesystem(storage_parent.as_fd())?;
    failpoint::hit("migrate-renamed-entry");
    planned.result = Some(copier.stats);
    Ok(())
}

/// A `neededForBoot` entry that exists nowhere: an empty directory (or file) in storage with
/// the manifest's owner and mode, so the initrd has something to mount.
fn create_empty(planned: &mut PlannedEntry, live: BorrowedFd<'_>, live_root: &Path) -> Result<()> {
    let (_, storage_parent, name) = open_both_sides(planned, live, live_root)?;
    let owner = planned.owner;
    match planned.kind {
        EntryKind::Directory => {
            make_dir(
                storage_parent.as_fd(),
                &name,
                owner.uid,
                owner.gid,
                owner.mode,
            )?;
        }
        EntryKind::File => {
            // The manifest's mode is its parent's; the file itself stays private to its owner.
            let fd = nix::fcntl::openat(
                storage_parent.as_fd(),
                name.as_os_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .with_context(|| format!("creating {}", planned.storage_path))?;
            nix::unistd::fchown(&fd, Some(owner.uid.into()), Some(owner.gid.into()))
                .context("fchown")?;
        }
    }
    copy::sync_filesystem(storage_parent.as_fd())?;
    Ok(())
}

fn temp_name(name: &OsStr) -> OsString {
    temp_name_for(name, "migrate")
}

/// `.<name>.rasa-<command>`: the temporary name beside `name` that a command copies into before
/// renaming; ours by its name, so a rerun of that command removes a leftover one.
pub fn temp_name_for(name: &OsStr, command: &str) -> OsString {
    let mut t = OsString::from(".");
    t.push(name);
    t.push(format!(".rasa-{command}"));
    t
}

pub fn backup_name(name: &OsStr) -> OsString {
    let mut b = name.to_os_string();
    b.push(format!(".rasa-backup-{}", crate::old_roots::now()));
    b
}

pub fn rename_noreplace(dir: BorrowedFd<'_>, from: &OsStr, to: &OsStr) -> Result<()> {
    nix::fcntl::renameat2(
        dir,
        from,
        dir,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .with_context(|| {
        format!(
            "renaming {} to {}",
            Path::new(from).display(),
            Path::new(to).display()
        )
    })
}

/// Open (creating what is missing) the storage directories above an entry. A missing directory
/// gets the owner and mode of its live counterpart, as impermanence does; the direct parent of
/// a file entry gets the manifest's user, group and mode (impermanence's `parentDirectory`).
fn ensure_parents(
    storage_root: BorrowedFd<'_>,
    live: BorrowedFd<'_>,
    parents: &[OsString],
    planned: &PlannedEntry,
) -> Result<OwnedFd> {
    let mut current = nix::unistd::dup(storage_root)?;
    let mut live_dir = Some(nix::unistd::dup(live)?);
    for (i, part) in parents.iter().enumerate() {
        let live_st = match &live_dir {
            Some(d) => fs::lstat_at(d.as_fd(), part)?,
            None => None,
        };
        live_dir = match (&live_dir, &live_st) {
            (Some(d), Some(st)) if Kind::of(st) == Kind::Directory => {
                Some(fs::open_verified(d.as_fd(), part, st)?)
            }
            _ => None,
        };
        let shown = || format!("{}{}", planned.storage_root, fs::joined(&parents[..=i]));
        match fs::lstat_at(current.as_fd(), part)? {
            Some(st) if Kind::of(&st) == Kind::Directory => {}
            Some(st) => {
                return Err(hostile_in_storage(
                    &planned.storage_root,
                    &shown(),
                    Kind::of(&st).described(),
                ))
            }
            None => {
                let is_entry_parent = i + 1 == parents.len() && planned.kind == EntryKind::File;
                let (uid, gid, mode) = if is_entry_parent {
                    (planned.owner.uid, planned.owner.gid, planned.owner.mode)
                } else if let Some(st) = &live_st {
                    (st.st_uid, st.st_gid, st.st_mode & 0o7777)
                } else {
                    (0, 0, 0o755)
                };
                make_dir(current.as_fd(), part, uid, gid, mode)?;
            }
        }
        current = match fs::open_dir(current.as_fd(), part).map_err(|e| fs_error(&shown(), e))? {
            Some((fd, _)) => fd,
            None => anyhow::bail!("{} vanished while it was being created", shown()),
        };
    }
    Ok(current)
}

/// Create a directory owner-only, then give it its owner, then its mode.
pub fn make_dir(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32, mode: u32) -> Result<()> {
    nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(mode & 0o700))
        .with_context(|| format!("creating {}", Path::new(name).display()))?;
    let Some((fd, _)) = fs::open_dir(dir, name)? else {
        anyhow::bail!(
            "{} vanished while it was being created",
            Path::new(name).display()
        );
    };
    // A default ACL on the storage directory would otherwise hand the new directory access
    // the live one never granted.
    copy::remove_inherited_acls(&copy::XattrSource::Fd(fd.as_fd()))?;
    nix::unistd::fchown(&fd, Some(uid.into()), Some(gid.into())).context("fchown")?;
    nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(mode)).context("fchmod")?;
    Ok(())
}

/// Append this run to `<storageRoot>/.rasa/migrations.json` of every storage root it used.
pub fn write_records(
    manifest_path: &Path,
    plan: &Plan,
    live: BorrowedFd<'_>,
    live_root: &Path,
) -> Result<()> {
    let mut roots: Vec<&str> = Vec::new();
    for e in &plan.entries {
        if !roots.contains(&e.storage_root.as_str()) {
            roots.push(&e.storage_root);
        }
    }
    for root in roots {
        let root_fd = open_storage_root(live, live_root, root)?;
        let run = RecordRun {
            finished_at: crate::old_roots::now(),
            manifest: manifest_path.display().to_string(),
            entries: plan
                .entries
                .iter()
                .filter(|e| e.storage_root == root)
                .map(|e| RecordEntry {
                    path: e.path.clone(),
                    action: if e.will_copy() {
                        Action::Copy
                    } else {
                        e.action
                    },
                    bytes: if e.will_copy() { e.bytes } else { 0 },
                    backup: e.backup.clone(),
                })
                .collect(),
        };
        record::append(root_fd.as_fd(), root, run)?;
    }
    Ok(())
}
