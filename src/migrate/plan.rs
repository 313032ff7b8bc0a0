//! Inspecting the live root and storage: one [`Decision`] per manifest entry, and nothing
//! changed. The dry run prints the plan; `--apply` executes the same plan.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use super::record::Action;
use super::ConflictPolicy;
use crate::copy;
use crate::error::refuse;
use crate::fs::{self, Beneath, Kind, MountRoots};
use crate::manifest::{Entry, EntryKind, Manifest};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Reflink,
    Copy,
}

/// What to do with one entry, and why.
#[derive(Debug)]
pub enum Decision {
    /// On the live root, not in storage.
    Copy {
        size: fs::Measure,
        method: Method,
    },
    /// The live path is the stored one, or only storage has it.
    AlreadyPersisted(&'static str),
    Identical {
        size: fs::Measure,
    },
    /// Storage holds another version; `difference` is the first one found.
    Conflict {
        size: fs::Measure,
        method: Method,
        difference: String,
    },
    /// Nowhere yet; impermanence creates it at boot.
    Missing,
    /// Nowhere yet, but needed before activation could create it.
    CreateEmpty,
    /// Inside the directory entry `by` of the same storage root, whose copy holds it.
    Covered {
        by: String,
    },
    /// Nothing is lost by leaving it (a socket).
    Skipped(&'static str),
    /// The next boot would lose it and rasa cannot copy it as it is.
    Problem {
        problem: String,
        fix: String,
    },
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedEntry {
    pub path: String,
    pub storage_path: String,
    pub kind: EntryKind,
    pub action: Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For a problem: how to fix it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// For a conflict: what will be (or was) done about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<ConflictPolicy>,
    /// Bytes in regular files to copy (for `copy` and replaced conflicts).
    pub bytes: u64,
    /// Files, directories and links to copy.
    pub items: u64,
    /// Mount points inside the entry, which are not copied (the copy stays on the entry's
    /// filesystem).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// After --apply: what the copy did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<copy::Stats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    #[serde(skip)]
    pub storage_root: String,
    /// The manifest's user, group and mode, resolved.
    #[serde(skip)]
    pub owner: Owner,
    #[serde(skip)]
    pub needed_for_boot: bool,
}

impl PlannedEntry {
    pub fn will_copy(&self) -> bool {
        self.action == Action::Copy
            || (self.action == Action::Conflict
                && self.resolution == Some(ConflictPolicy::ReplaceWithBackup))
    }

    /// Left for the user to decide or fix: exit 4.
    pub fn unresolved(&self) -> bool {
        self.action == Action::Problem
            || (self.action == Action::Conflict && self.resolution == Some(ConflictPolicy::Stop))
    }

    fn new(entry: &Entry, owner: Owner, decision: Decision, policy: ConflictPolicy) -> Self {
        let mut planned = PlannedEntry {
            path: entry.path.clone(),
            storage_path: entry.storage_path().display().to_string(),
            kind: entry.kind,
            action: Action::Copy,
            reason: None,
            fix: None,
            resolution: None,
            bytes: 0,
            items: 0,
            left_out: Vec::new(),
            method: None,
            result: None,
            backup: None,
            storage_root: entry.storage_root.clone(),
            owner,
            needed_for_boot: entry.needed_for_boot,
        };
        let parent = Path::new(&entry.path).parent().unwrap_or(Path::new("/"));
        let mut sized = |size: fs::Measure| {
            planned.bytes = size.bytes;
            planned.items = size.items;
            planned.left_out = size
                .mount_points
                .iter()
                .map(|rel| parent.join(rel).display().to_string())
                .collect();
        };
        match decision {
            Decision::Copy { size, method } => {
                sized(size);
                planned.method = Some(method);
            }
            Decision::AlreadyPersisted(why) => {
                planned.action = Action::AlreadyPersisted;
                planned.reason = Some(why.into());
            }
            Decision::Identical { size } => {
                sized(size);
                planned.action = Action::Identical;
            }
            Decision::Conflict {
                size,
                method,
                difference,
            } => {
                sized(size);
                planned.action = Action::Conflict;
                planned.reason = Some(difference);
                planned.resolution = Some(policy);
                if policy == ConflictPolicy::ReplaceWithBackup {
                    planned.method = Some(method);
                }
            }
            Decision::Missing => {
                planned.action = Action::Missing;
                planned.reason = Some("impermanence creates it empty at boot".into());
            }
            Decision::CreateEmpty => {
                planned.action = Action::CreateEmpty;
                planned.reason = Some(
                    "neededForBoot: the initrd mounts it before activation could create it".into(),
                );
            }
            Decision::Covered { by } => {
                planned.action = Action::Covered;
                planned.reason = Some(format!("inside {by}, which holds it"));
            }
            Decision::Skipped(why) => {
                planned.action = Action::Skipped;
                planned.reason = Some(why.into());
            }
            Decision::Problem { problem, fix } => {
                planned.action = Action::Problem;
                planned.reason = Some(problem);
                planned.fix = Some(fix);
            }
        }
        planned
    }
}

/// The plan: one planned entry per manifest entry, in manifest order.
pub struct Plan {
    pub entries: Vec<PlannedEntry>,
}

/// What every decision looks at.
struct Inspection<'a> {
    live: BorrowedFd<'a>,
    live_root: &'a Path,
    /// Mount points by path (to recognise a bind mount from storage) and by inode (to stay on
    /// the entry's filesystem).
    mount_points: Vec<PathBuf>,
    mount_roots: MountRoots,
}

pub fn plan(
    manifest: &Manifest,
    live: BorrowedFd<'_>,
    live_root: &Path,
    policy: ConflictPolicy,
) -> Result<Plan> {
    // Refuse bad users and groups before looking at anything else, so nothing is half done.
    let mut owners = Vec::new();
    for entry in &manifest.entries {
        owners.push(resolve_owner(entry)?);
    }
    refuse_storage_roots_inside_entries(manifest)?;
    let inspection = Inspection {
        live,
        live_root,
        mount_points: crate::toplevel::mounts()
            .into_iter()
            .map(|m| m.mount_point)
            .collect(),
        mount_roots: MountRoots::below(live_root),
    };
    let mut entries = Vec::new();
    for (entry, owner) in manifest.entries.iter().zip(owners) {
        let decision = match covering_entry(manifest, entry) {
            Some(outer) => Decision::Covered {
                by: outer.path.clone(),
            },
            None => decide(entry, &inspection)?,
        };
        entries.push(PlannedEntry::new(entry, owner, decision, policy));
    }
    Ok(Plan { entries })
}

/// The directory entry of the same storage root that holds `entry`, if any: its copy is the
/// copy of `entry` too, so `entry` is planned once, as part of it.
fn covering_entry<'m>(manifest: &'m Manifest, entry: &Entry) -> Option<&'m Entry> {
    manifest.entries.iter().find(|outer| {
        outer.kind == EntryKind::Directory
            && outer.storage_root == entry.storage_root
            && outer.path != entry.path
            && Path::new(&entry.path).starts_with(&outer.path)
    })
}

/// A storage root at or below an entry's storage path would be copied over, or renamed away
/// by `--on-conflict replace-with-backup`, with everything stored in it; one at or below an
/// entry's live path would be copied into itself. (Migrate's guard at its destructive step;
/// the manifest rules refuse the same layouts for every command.)
fn refuse_storage_roots_inside_entries(manifest: &Manifest) -> Result<()> {
    for entry in &manifest.entries {
        if let Some(root) = manifest
            .entries
            .iter()
            .map(|e| &e.storage_root)
            .find(|root| Path::new(root).starts_with(&entry.path))
        {
            return Err(refuse(
                format!(
                    "the entry {} contains the storage root {root}: migrating it would copy \
                     storage into itself",
                    entry.path
                ),
                "persist the paths inside it that hold state instead, or move the storage root \
                 out of it (e.g. /persist), then rebuild and rerun",
            ));
        }
        let stored = entry.storage_path();
        if let Some(other) = manifest
            .entries
            .iter()
            .map(|e| &e.storage_root)
            .find(|root| Path::new(root).starts_with(&stored))
        {
            return Err(refuse(
                format!(
                    "the entry {} is stored at {}, which is or contains the storage root {other}: \
                     migrating it would copy over (or, with replace-with-backup, rename away) \
                     everything stored there",
                    entry.path,
                    stored.display()
                ),
                "keep storage roots apart from each other's entries (e.g. /persist and \
                 /persist-home, not /persist and /persist/home), then rebuild and rerun",
            ));
        }
    }
    Ok(())
}

pub fn hostile_in_storage(storage_root: &str, at: &str, what: &str) -> anyhow::Error {
    refuse(
        format!(
            "{at} inside the storage root {storage_root} is {what}; rasa never writes through a \
             symlink in storage, because it could point anywhere (e.g. at /etc/shadow)"
        ),
        format!("inspect it, then remove or rename it (`ls -la {at}`) and rerun"),
    )
}

/// An error of the descriptor layer at `path`, in words.
pub fn fs_error(path: &str, e: nix::Error) -> anyhow::Error {
    if e == fs::CHANGED {
        anyhow::anyhow!("{path} changed while rasa was looking at it; rerun when it is quiet")
    } else {
        anyhow::Error::new(e).context(format!("inspecting {path}"))
    }
}

/// Open the storage root itself, refusing what is not a real directory.
pub fn open_storage_root(live: BorrowedFd<'_>, live_root: &Path, root: &str) -> Result<OwnedFd> {
    let parts = fs::components(OsStr::new(root));
    match fs::open_dir_beneath(live, &parts).map_err(|e| fs_error(root, e))? {
        Beneath::Dir(fd, _) => Ok(fd),
        Beneath::Missing { at } => Err(refuse(
            format!(
                "the storage root {root} does not exist (under --live-root {}, {} is missing)",
                live_root.display(),
                fs::joined(&parts[..=at])
            ),
            format!(
                "mount the persistent subvolume at {root} (fileSystems.\"{root}\".neededForBoot = \
                 true) and rerun"
            ),
        )),
        Beneath::Symlink { at, target } => Err(refuse(
            format!(
                "the storage root path {} is a symlink to {}",
                fs::joined(&parts[..=at]),
                Path::new(&target).display()
            ),
            "make the storage root a real directory (the persistent subvolume's mount point)",
        )),
        Beneath::NotDirectory { at, kind } => Err(refuse(
            format!(
                "the storage root path {} is {}",
                fs::joined(&parts[..=at]),
                kind.described()
            ),
            "make the storage root a real directory (the persistent subvolume's mount point)",
        )),
    }
}

fn decide(entry: &Entry, cx: &Inspection<'_>) -> Result<Decision> {
    let storage_root = open_storage_root(cx.live, cx.live_root, &entry.storage_root)?;
    let live_parts = fs::components(OsStr::new(&entry.path));
    let (name, parents) = live_parts.split_last().expect("validated: not /");

    // Storage side: a symlink anywhere on the way is refused, whatever the live side holds.
    let storage_parent = match fs::open_dir_beneath(storage_root.as_fd(), parents)
        .map_err(|e| fs_error(&entry.storage_path().display().to_string(), e))?
    {
        Beneath::Dir(fd, _) => Some(fd),
        Beneath::Missing { .. } => None,
        Beneath::Symlink { at, target } => {
            return Err(hostile_in_storage(
                &entry.storage_root,
                &stored_at(&entry.storage_root, &parents[..=at]),
                &format!("a symlink to {}", Path::new(&target).display()),
            ))
        }
        Beneath::NotDirectory { at, kind } => {
            return Err(hostile_in_storage(
                &entry.storage_root,
                &stored_at(&entry.storage_root, &parents[..=at]),
                kind.described(),
            ))
        }
    };
    let storage_st = match &storage_parent {
        Some(fd) => fs::lstat_at(fd.as_fd(), name)?,
        None => None,
    };

    // Live side: a symlink on the way is not followed, and not silently skipped either.
    let live_parent =
        match fs::open_dir_beneath(cx.live, parents).map_err(|e| fs_error(&entry.path, e))? {
            Beneath::Dir(fd, _) => Some(fd),
            Beneath::Missing { .. } => None,
            Beneath::Symlink { at, target } => {
                let link = fs::joined(&parents[..=at]);
                let rest = fs::joined(&live_parts[at + 1..]);
                return Ok(Decision::Problem {
                    problem: format!(
                        "{link} is a symlink to {}: rasa does not copy through symlinks, and the \
                     next boot erases {} (it lives on the root, not in storage)",
                        Path::new(&target).display(),
                        entry.path
                    ),
                    fix: format!(
                        "persist the real path instead ({}{rest} in environment.persistence), or \
                     replace the symlink {link} with the directory it points to, then rerun",
                        Path::new(&target).display()
                    ),
                });
            }
            Beneath::NotDirectory { at, kind } => return Ok(Decision::Problem {
                problem: format!(
                    "{} is {}, so {} cannot exist below it",
                    fs::joined(&parents[..=at]),
                    kind.described(),
                    entry.path
                ),
                fix: "correct the path in environment.persistence, or remove what is in the way, \
                      then rerun"
                    .into(),
            }),
        };
    let live_st = match &live_parent {
        Some(fd) => fs::lstat_at(fd.as_fd(), name)?,
        None => None,
    };

    if let (Some(st), Some(storage_parent)) = (&storage_st, &storage_parent) {
        if Kind::of(st) == Kind::Symlink {
            let stored_target = fs::read_link_at(storage_parent.as_fd(), name)?;
            let same_link = match (&live_st, &live_parent) {
                (Some(l), Some(lp)) if Kind::of(l) == Kind::Symlink => {
                    fs::read_link_at(lp.as_fd(), name)? == stored_target
                }
                _ => false,
            };
            if !same_link {
                return Err(hostile_in_storage(
                    &entry.storage_root,
                    &entry.storage_path().display().to_string(),
                    &format!("a symlink to {}", Path::new(&stored_target).display()),
                ));
            }
        }
    }
    let (Some(live_st), Some(live_parent)) = (live_st, live_parent) else {
        return Ok(if storage_st.is_some() {
            Decision::AlreadyPersisted("only in storage; nothing on the live root to copy")
        } else if entry.needed_for_boot {
            Decision::CreateEmpty
        } else {
            Decision::Missing
        });
    };
    if let Some(st) = &storage_st {
        if fs::identity(st) == fs::identity(&live_st) {
            let full = cx.live_root.join(entry.path.trim_start_matches('/'));
            let bind = cx.mount_points.contains(&full);
            return Ok(Decision::AlreadyPersisted(if bind {
                "bind-mounted from storage (impermanence is active)"
            } else {
                "the live path is the stored one (same inode)"
            }));
        }
    }
    let live_kind = Kind::of(&live_st);
    if live_kind == Kind::Symlink
        && Path::new(&fs::read_link_at(live_parent.as_fd(), name)?) == entry.storage_path()
    {
        return Ok(Decision::AlreadyPersisted(
            "a symlink into storage (impermanence is active)",
        ));
    }
    let kind_ok = match entry.kind {
        EntryKind::Directory => live_kind == Kind::Directory,
        EntryKind::File => live_kind != Kind::Directory,
    };
    if !kind_ok {
        let (said, fix) = match entry.kind {
            EntryKind::Directory => (
                "a directory",
                "list it under `files` instead of `directories` (or, for a symlink, persist \
                 the directory it points to), then rebuild and rerun",
            ),
            EntryKind::File => (
                "a file",
                "list it under `directories` instead of `files`, then rebuild and rerun",
            ),
        };
        return Ok(Decision::Problem {
            problem: format!(
                "the manifest says {said} but {} is {}: rasa cannot copy it as listed, and the \
                 next boot erases it",
                entry.path,
                live_kind.described()
            ),
            fix: fix.into(),
        });
    }
    if live_kind == Kind::Socket {
        return Ok(Decision::Skipped("a socket; its server recreates it"));
    }
    let size = fs::measure(live_parent.as_fd(), name, &cx.mount_roots).map_err(|(rel, e)| {
        let parent = Path::new(&entry.path).parent().unwrap_or(Path::new("/"));
        fs_error(&parent.join(rel).display().to_string(), e)
    })?;
    let method = predict_method(live_parent.as_fd(), storage_root.as_fd());
    let (Some(storage_parent), Some(_)) = (&storage_parent, &storage_st) else {
        return Ok(Decision::Copy { size, method });
    };
    let device = live_st.st_dev;
    let left_out = |st: &nix::libc::stat| cx.mount_roots.is_mount_point(st, device);
    let difference = copy::first_difference(
        live_parent.as_fd(),
        name,
        storage_parent.as_fd(),
        name,
        Path::new(name),
        &left_out,
    )?;
    Ok(match difference {
        None => Decision::Identical { size },
        Some(difference) => Decision::Conflict {
            size,
            method,
            difference,
        },
    })
}

fn stored_at(storage_root: &str, parts: &[OsString]) -> String {
    format!(
        "{}{}",
        storage_root.trim_end_matches('/'),
        fs::joined(parts)
    )
}

fn predict_method(source: BorrowedFd<'_>, storage: BorrowedFd<'_>) -> Method {
    match (crate::btrfs::fsid(source), crate::btrfs::fsid(storage)) {
        (Some(a), Some(b)) if a == b => Method::Reflink,
        _ => Method::Copy,
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

fn resolve_owner(entry: &Entry) -> Result<Owner> {
    let user = nix::unistd::User::from_name(&entry.user)
        .with_context(|| format!("looking up user {:?}", entry.user))?
        .ok_or_else(|| {
            refuse(
                format!(
                    "the manifest gives user {:?} for {}, and this system has no such user",
                    entry.user, entry.path
                ),
                "create the user (users.users.<name>) in the configuration you migrate from, or \
                 correct the user in environment.persistence, then rebuild",
            )
        })?;
    let group = nix::unistd::Group::from_name(&entry.group)
        .with_context(|| format!("looking up group {:?}", entry.group))?
        .ok_or_else(|| {
            refuse(
                format!(
                    "the manifest gives group {:?} for {}, and this system has no such group",
                    entry.group, entry.path
                ),
                "create the group (users.groups.<name>) or correct environment.persistence, then \
                 rebuild",
            )
        })?;
    let mode = crate::rules::parse_mode(&entry.mode).ok_or_else(|| {
        refuse(
            format!(
                "the manifest gives mode {:?} for {}, which is not an octal mode like \"0755\"",
                entry.mode, entry.path
            ),
            "correct the mode in environment.persistence and rebuild",
        )
    })?;
    Ok(Owner {
        uid: user.uid.as_raw(),
        gid: group.gid.as_raw(),
        mode,
    })
}
