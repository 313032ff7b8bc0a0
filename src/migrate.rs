//! `rasa migrate`: copy the state the manifest lists from the live root into its storage root,
//! before the first boot that wipes `/`.
//!
//! Planning touches nothing, so the default dry run and `--apply` share one plan. Every entry
//! is copied into a temporary name beside its final place (`.<name>.rasa-migrate`, inside the
//! storage root, so on the same filesystem) and renamed into place only once complete and
//! synced: after a crash the final name either does not exist or holds a whole copy, and the
//! rerun deletes the leftover temporary copy and starts that entry again.

use std::ffi::{OsStr, OsString};
use std::io::IsTerminal;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::libc;
use serde::{Deserialize, Serialize};

use crate::copy::{self, Copier};
use crate::error::{exit, refuse};
use crate::failpoint;
use crate::log;
use crate::manifest::{self, Entry, EntryKind, Manifest};

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  rasa migrate                                   # dry run: print the plan, change nothing
  rasa migrate --apply                           # copy what the plan says
  rasa migrate --manifest ./manifest.json --json # the plan for machines
  rasa migrate --apply --on-conflict keep-storage
  rasa migrate --live-root /mnt --manifest /mnt/etc/rasa/manifest.json --apply
                                                 # from an installer, system at /mnt

Run it after `nixos-rebuild boot` and before rebooting into the wiping configuration.
Exit codes: 0 done (or nothing to do), 3 refused (nothing changed), 4 conflicts left alone,
1 failed part-way (rerun to finish; no entry is ever left half-copied under its final name).")]
pub struct Args {
    /// The manifest to use [default: the next boot's, /nix/var/nix/profiles/system/rasa-manifest.json
    /// (or its etc/rasa/manifest.json), then /etc/rasa/manifest.json].
    #[arg(long, value_name = "PATH")]
    pub manifest: Option<PathBuf>,

    /// Execute the plan (without it, nothing is changed).
    #[arg(long)]
    pub apply: bool,

    /// Print the plan (or, with --apply, the result) as JSON on stdout.
    #[arg(long)]
    pub json: bool,

    /// What to do when storage already holds a different version of an entry.
    #[arg(long, value_enum, value_name = "POLICY", default_value = "stop")]
    pub on_conflict: ConflictPolicy,

    /// The root the manifest's paths (both the live paths and the storage roots) are resolved
    /// under: `/` on a running system, the mount point of the target system from an installer
    /// or a chroot, a scratch tree in tests.
    #[arg(long, value_name = "PATH", default_value = "/")]
    pub live_root: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictPolicy {
    /// Report the conflict and copy nothing for that entry (exit code 4).
    Stop,
    /// Keep what storage holds; leave the live version where it is.
    KeepStorage,
    /// Rename what storage holds to `<name>.rasa-backup-<unix time>`, then copy the live version.
    ReplaceWithBackup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Copy,
    AlreadyPersisted,
    Identical,
    Conflict,
    Missing,
    Skipped,
}

impl Action {
    fn label(self) -> &'static str {
        match self {
            Action::Copy => "copy",
            Action::AlreadyPersisted => "already persisted",
            Action::Identical => "identical",
            Action::Conflict => "conflict",
            Action::Missing => "missing on both sides",
            Action::Skipped => "skipped",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Reflink,
    Copy,
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
    /// For a conflict: what will be (or was) done about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<ConflictPolicy>,
    /// Bytes in regular files to copy (for `copy` and replaced conflicts).
    pub bytes: u64,
    /// Files, directories and links to copy.
    pub items: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// After --apply: what the copy did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<copy::Stats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    #[serde(skip)]
    storage_root: String,
    /// The manifest's user, group and mode, resolved.
    #[serde(skip)]
    owner: (u32, u32, u32),
}

impl PlannedEntry {
    fn will_copy(&self) -> bool {
        self.action == Action::Copy
            || (self.action == Action::Conflict
                && self.resolution == Some(ConflictPolicy::ReplaceWithBackup))
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub manifest: String,
    pub manifest_source: String,
    pub applied: bool,
    pub entries: Vec<PlannedEntry>,
}

pub fn run(args: Args) -> Result<u8> {
    let (manifest_path, source) = manifest::locate(args.manifest.as_deref())?;
    log::info(format!(
        "using manifest {} ({source})",
        manifest_path.display()
    ));
    let manifest = manifest::load(&manifest_path)?;
    if args.apply && !nix::unistd::geteuid().is_root() {
        return Err(refuse(
            "rasa migrate --apply must run as root: it keeps every file's owner and reads files \
             of every user",
            "run it with sudo (or without --apply for the plan)",
        ));
    }
    let live = open_live_root(&args.live_root)?;
    let mut entries = plan(&manifest, live.as_fd(), &args.live_root, args.on_conflict)?;
    if args.apply {
        apply(&mut entries, live.as_fd())?;
        write_records(&manifest_path, &entries, live.as_fd())?;
    }
    let report = Report {
        manifest: manifest_path.display().to_string(),
        manifest_source: source.to_owned(),
        applied: args.apply,
        entries,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    let unresolved = report
        .entries
        .iter()
        .any(|e| e.action == Action::Conflict && e.resolution == Some(ConflictPolicy::Stop));
    Ok(if unresolved { exit::PROBLEMS } else { exit::OK })
}

fn open_live_root(live_root: &Path) -> Result<OwnedFd> {
    // The live root itself is given by the user and may be reached through symlinks; nothing
    // below it is.
    let file = std::fs::File::open(live_root).map_err(|e| {
        refuse(
            format!("cannot open --live-root {}: {e}", live_root.display()),
            "pass an existing directory with --live-root (default /)",
        )
    })?;
    Ok(file.into())
}

/// The components of an absolute manifest path, refusing anything `rasa check manifest` would.
fn components(path: &str, field: &str) -> Result<Vec<OsString>> {
    if !path.starts_with('/') {
        return Err(refuse(
            format!("the manifest's {field} {path:?} is not an absolute path"),
            "run `rasa check manifest FILE` for every problem, and regenerate the manifest",
        ));
    }
    let parts: Vec<OsString> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(OsString::from)
        .collect();
    if parts.iter().any(|c| c == "." || c == "..") {
        return Err(refuse(
            format!("the manifest's {field} {path:?} contains '.' or '..'"),
            "run `rasa check manifest FILE` for every problem, and regenerate the manifest",
        ));
    }
    Ok(parts)
}

/// Where walking a path below an open directory ended.
enum Walk {
    Dir(OwnedFd),
    /// A component does not exist.
    Missing,
    /// Component `index` is a symlink (to the given target) or not a directory.
    Blocked(usize, String),
}

fn walk(start: BorrowedFd<'_>, parts: &[OsString]) -> Result<Walk> {
    let mut current: Option<OwnedFd> = None;
    for (i, part) in parts.iter().enumerate() {
        let dir = current.as_ref().map_or(start, |fd| fd.as_fd());
        match copy::lstat_at(dir, part)? {
            None => return Ok(Walk::Missing),
            Some(st) if copy::is_type(&st, libc::S_IFLNK) => {
                let target = copy::read_link_at(dir, part)?;
                return Ok(Walk::Blocked(
                    i,
                    format!("a symlink to {}", Path::new(&target).display()),
                ));
            }
            Some(st) if !copy::is_type(&st, libc::S_IFDIR) => {
                return Ok(Walk::Blocked(i, "not a directory".into()))
            }
            Some(_) => current = Some(copy::open_dir(dir, part)?),
        }
    }
    Ok(Walk::Dir(match current {
        Some(fd) => fd,
        None => dup(start)?,
    }))
}

fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    fd.try_clone_to_owned().context("dup")
}

fn join(parts: &[OsString]) -> String {
    let mut s = String::new();
    for p in parts {
        s.push('/');
        s.push_str(&p.to_string_lossy());
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

fn hostile_symlink(storage_root: &str, at: &str, what: &str) -> anyhow::Error {
    refuse(
        format!(
            "{at} inside the storage root {storage_root} is {what}; rasa never writes through a \
             symlink in storage, because it could point anywhere (e.g. at /etc/shadow)"
        ),
        format!("inspect it, then remove or rename it (`ls -la {at}`) and rerun"),
    )
}

/// Mount points from /proc/self/mountinfo, to tell a bind mount from storage apart.
fn mount_points() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .collect()
}

fn unescape_mountinfo(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

struct Resolved {
    storage_root: String,
    storage: Vec<OsString>,
    live: Vec<OsString>,
}

pub fn plan(
    manifest: &Manifest,
    live: BorrowedFd<'_>,
    live_root: &Path,
    policy: ConflictPolicy,
) -> Result<Vec<PlannedEntry>> {
    // Refuse bad users and groups before looking at anything else, so nothing is half done.
    let mut owners = Vec::new();
    for entry in &manifest.entries {
        let owner = resolve_owner(entry)?;
        owners.push((owner.uid, owner.gid, owner.mode));
    }
    let mounts = mount_points();
    let mut out = Vec::new();
    for (entry, owner) in manifest.entries.iter().zip(owners) {
        let resolved = Resolved {
            storage_root: entry.storage_root.clone(),
            storage: components(&entry.storage_root, "storageRoot")?,
            live: components(&entry.path, "path")?,
        };
        if resolved.live.is_empty() {
            return Err(refuse(
                "the manifest lists / itself as a persisted path",
                "list the directories below / to keep instead",
            ));
        }
        let mut planned = PlannedEntry {
            path: entry.path.clone(),
            storage_path: entry.storage_path().display().to_string(),
            kind: entry.kind,
            action: Action::Copy,
            reason: None,
            resolution: None,
            bytes: 0,
            items: 0,
            method: None,
            result: None,
            backup: None,
            storage_root: entry.storage_root.clone(),
            owner,
        };
        plan_entry(
            entry,
            &resolved,
            live,
            live_root,
            &mounts,
            policy,
            &mut planned,
        )?;
        out.push(planned);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn plan_entry(
    entry: &Entry,
    resolved: &Resolved,
    live: BorrowedFd<'_>,
    live_root: &Path,
    mounts: &[String],
    policy: ConflictPolicy,
    planned: &mut PlannedEntry,
) -> Result<()> {
    let storage_root =
        match walk(live, &resolved.storage)? {
            Walk::Dir(fd) => fd,
            Walk::Missing => {
                return Err(refuse(
                    format!(
                        "the storage root {} does not exist (under --live-root {})",
                        resolved.storage_root,
                        live_root.display()
                    ),
                    format!(
                        "mount the persistent subvolume at {} (fileSystems.\"{}\".neededForBoot = \
                     true) and rerun",
                        resolved.storage_root, resolved.storage_root
                    ),
                ))
            }
            Walk::Blocked(i, what) => return Err(refuse(
                format!(
                    "the storage root path {} is {what}",
                    join(&resolved.storage[..=i])
                ),
                "make the storage root a real directory (the persistent subvolume's mount point)",
            )),
        };
    let (name, parents) = resolved.live.split_last().expect("checked non-empty");
    // Storage side: a symlink anywhere on the way is refused, whatever the live side holds.
    let storage_parent = match walk(storage_root.as_fd(), parents)? {
        Walk::Dir(fd) => Some(fd),
        Walk::Missing => None,
        Walk::Blocked(i, what) => {
            return Err(hostile_symlink(
                &resolved.storage_root,
                &format!(
                    "{}{}",
                    resolved.storage_root.trim_end_matches('/'),
                    join(&parents[..=i])
                ),
                &what,
            ))
        }
    };
    let storage_st = match &storage_parent {
        Some(fd) => copy::lstat_at(fd.as_fd(), name)?,
        None => None,
    };
    // Live side.
    let live_parent = match walk(live, parents)? {
        Walk::Dir(fd) => Some(fd),
        Walk::Missing => None,
        Walk::Blocked(i, what) => {
            planned.action = Action::Skipped;
            planned.reason = Some(format!(
                "{} is {what}; rasa does not copy through symlinks",
                join(&parents[..=i])
            ));
            return Ok(());
        }
    };
    let live_st = match &live_parent {
        Some(fd) => copy::lstat_at(fd.as_fd(), name)?,
        None => None,
    };
    if let Some(st) = &storage_st {
        if copy::is_type(st, libc::S_IFLNK) {
            let same_link = match (&live_st, &live_parent) {
                (Some(l), Some(lp)) if copy::is_type(l, libc::S_IFLNK) => {
                    copy::read_link_at(lp.as_fd(), name)?
                        == copy::read_link_at(storage_parent.as_ref().unwrap().as_fd(), name)?
                }
                _ => false,
            };
            if !same_link {
                let target = copy::read_link_at(storage_parent.as_ref().unwrap().as_fd(), name)?;
                return Err(hostile_symlink(
                    &resolved.storage_root,
                    &planned.storage_path,
                    &format!("a symlink to {}", Path::new(&target).display()),
                ));
            }
        }
    }
    let Some(live_st) = live_st else {
        if storage_st.is_some() {
            planned.action = Action::AlreadyPersisted;
            planned.reason = Some("only in storage; nothing on the live root to copy".into());
        } else {
            planned.action = Action::Missing;
            planned.reason = Some("impermanence creates it empty at boot".into());
        }
        return Ok(());
    };
    let live_parent = live_parent.expect("live entry has a parent");
    if let Some(st) = &storage_st {
        if (st.st_dev, st.st_ino) == (live_st.st_dev, live_st.st_ino) {
            let full = live_root.join(entry.path.trim_start_matches('/'));
            let bind = mounts.iter().any(|m| Path::new(m) == full);
            planned.action = Action::AlreadyPersisted;
            planned.reason = Some(if bind {
                "bind-mounted from storage (impermanence is active)".into()
            } else {
                "the live path is the stored one (same inode)".into()
            });
            return Ok(());
        }
    }
    if copy::is_type(&live_st, libc::S_IFLNK) {
        let target = copy::read_link_at(live_parent.as_fd(), name)?;
        if Path::new(&target) == entry.storage_path() {
            planned.action = Action::AlreadyPersisted;
            planned.reason = Some("a symlink into storage (impermanence is active)".into());
            return Ok(());
        }
    }
    let kind_ok = match entry.kind {
        EntryKind::Directory => copy::is_type(&live_st, libc::S_IFDIR),
        EntryKind::File => !copy::is_type(&live_st, libc::S_IFDIR),
    };
    if !kind_ok {
        planned.action = Action::Skipped;
        planned.reason = Some(format!(
            "the manifest says {} but the live path is {}",
            match entry.kind {
                EntryKind::Directory => "directory",
                EntryKind::File => "file",
            },
            describe_type(&live_st)
        ));
        return Ok(());
    }
    if copy::is_type(&live_st, libc::S_IFSOCK) {
        planned.action = Action::Skipped;
        planned.reason = Some("a socket; its server recreates it".into());
        return Ok(());
    }
    let (bytes, items) = copy::measure(live_parent.as_fd(), name)?;
    planned.bytes = bytes;
    planned.items = items;
    planned.method = Some(predict_method(live_parent.as_fd(), storage_root.as_fd()));
    if let Some(storage_parent) = &storage_parent {
        if storage_st.is_some() {
            let difference = copy::first_difference(
                live_parent.as_fd(),
                name,
                storage_parent.as_fd(),
                name,
                Path::new(name),
            )?;
            match difference {
                None => {
                    planned.action = Action::Identical;
                    planned.method = None;
                }
                Some(what) => {
                    planned.action = Action::Conflict;
                    planned.reason = Some(what);
                    planned.resolution = Some(policy);
                    if policy != ConflictPolicy::ReplaceWithBackup {
                        planned.method = None;
                    }
                }
            }
            return Ok(());
        }
    }
    planned.action = Action::Copy;
    Ok(())
}

fn describe_type(st: &libc::stat) -> &'static str {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => "a directory",
        libc::S_IFREG => "a regular file",
        libc::S_IFLNK => "a symlink",
        libc::S_IFSOCK => "a socket",
        libc::S_IFIFO => "a fifo",
        _ => "a device node",
    }
}

fn predict_method(source: BorrowedFd<'_>, storage: BorrowedFd<'_>) -> Method {
    match (copy::btrfs_fsid(source), copy::btrfs_fsid(storage)) {
        (Some(a), Some(b)) if a == b => Method::Reflink,
        _ => Method::Copy,
    }
}

struct Owner {
    uid: u32,
    gid: u32,
    mode: u32,
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
    Ok(Owner {
        uid: user.uid.as_raw(),
        gid: group.gid.as_raw(),
        mode: parse_mode(entry)?,
    })
}

pub fn parse_mode_str(mode: &str) -> Option<u32> {
    if mode.is_empty() || mode.len() > 5 || !mode.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(mode, 8).ok().filter(|m| *m <= 0o7777)
}

fn parse_mode(entry: &Entry) -> Result<u32> {
    parse_mode_str(&entry.mode).ok_or_else(|| {
        refuse(
            format!(
                "the manifest gives mode {:?} for {}, which is not an octal mode like \"0755\"",
                entry.mode, entry.path
            ),
            "correct the mode in environment.persistence and rebuild",
        )
    })
}

fn apply(entries: &mut [PlannedEntry], live: BorrowedFd<'_>) -> Result<()> {
    let total: u64 = entries
        .iter()
        .filter(|e| e.will_copy())
        .map(|e| e.bytes)
        .sum();
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    for planned in entries.iter_mut().filter(|e| e.will_copy()) {
        bar.set_message(planned.path.clone());
        let result = copy_entry(planned, live, &|n| bar.inc(n));
        if let Err(e) = result {
            bar.abandon();
            return Err(e.context(format!(
                "migrating {} (entries before it are complete; rerun to finish)",
                planned.path
            )));
        }
    }
    bar.finish_and_clear();
    Ok(())
}

fn copy_entry(
    planned: &mut PlannedEntry,
    live: BorrowedFd<'_>,
    progress: &dyn Fn(u64),
) -> Result<()> {
    // The plan holds strings; re-derive the components (already validated).
    let storage_root_str = planned.storage_root.clone();
    let storage_parts = components(&storage_root_str, "storageRoot")?;
    let live_parts = components(&planned.path, "path")?;
    let (name, parents) = live_parts.split_last().expect("non-empty");
    let Walk::Dir(live_parent) = walk(live, parents)? else {
        anyhow::bail!("{} changed since the plan was made", planned.path);
    };
    let Walk::Dir(storage_root) = walk(live, &storage_parts)? else {
        anyhow::bail!("the storage root changed since the plan was made");
    };
    let storage_parent = ensure_parents(
        storage_root.as_fd(),
        live,
        parents,
        &storage_root_str,
        planned,
    )?;
    let temp = temp_name(name);
    // A leftover from an interrupted run: ours by its name, and never complete.
    copy::remove_tree(storage_parent.as_fd(), &temp)
        .with_context(|| format!("removing the leftover {}", Path::new(&temp).display()))?;
    let reflink = planned.method == Some(Method::Reflink);
    let after_file = || failpoint::hit("migrate-copied-file");
    let mut copier = Copier::new(reflink, progress, &after_file);
    copier.copy(live_parent.as_fd(), name, storage_parent.as_fd(), &temp)?;
    copy::sync_filesystem(storage_parent.as_fd())?;
    if planned.action == Action::Conflict {
        let backup = backup_name(name);
        rename_noreplace(storage_parent.as_fd(), name, &backup)?;
        planned.backup = Some(format!(
            "{}/{}",
            Path::new(&planned.storage_path)
                .parent()
                .unwrap_or(Path::new("/"))
                .display(),
            Path::new(&backup).display()
        ));
    }
    rename_noreplace(storage_parent.as_fd(), &temp, name)?;
    copy::sync_filesystem(storage_parent.as_fd())?;
    failpoint::hit("migrate-renamed-entry");
    planned.result = Some(copier.stats);
    Ok(())
}

fn temp_name(name: &OsStr) -> OsString {
    let mut t = OsString::from(".");
    t.push(name);
    t.push(".rasa-migrate");
    t
}

fn backup_name(name: &OsStr) -> OsString {
    let mut b = name.to_os_string();
    b.push(format!(".rasa-backup-{}", crate::old_roots::now()));
    b
}

fn rename_noreplace(dir: BorrowedFd<'_>, from: &OsStr, to: &OsStr) -> Result<()> {
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
    storage_root_str: &str,
    planned: &PlannedEntry,
) -> Result<OwnedFd> {
    let mut current = dup(storage_root)?;
    let mut live_dir = Some(dup(live)?);
    for (i, part) in parents.iter().enumerate() {
        let live_st = match &live_dir {
            Some(d) => copy::lstat_at(d.as_fd(), part)?,
            None => None,
        };
        live_dir = match (&live_dir, &live_st) {
            (Some(d), Some(st)) if copy::is_type(st, libc::S_IFDIR) => {
                Some(copy::open_dir(d.as_fd(), part)?)
            }
            _ => None,
        };
        match copy::lstat_at(current.as_fd(), part)? {
            Some(st) if copy::is_type(&st, libc::S_IFDIR) => {}
            Some(_) => {
                return Err(hostile_symlink(
                    storage_root_str,
                    &format!("{}{}", storage_root_str, join(&parents[..=i])),
                    "not a directory",
                ))
            }
            None => {
                let is_entry_parent = i + 1 == parents.len() && planned.kind == EntryKind::File;
                let (uid, gid, mode) = if is_entry_parent {
                    planned.owner
                } else if let Some(st) = &live_st {
                    (st.st_uid, st.st_gid, st.st_mode & 0o7777)
                } else {
                    (0, 0, 0o755)
                };
                make_dir(current.as_fd(), part, uid, gid, mode)?;
            }
        }
        current = copy::open_dir(current.as_fd(), part)?;
    }
    Ok(current)
}

/// Create a directory owner-only, then give it its owner, then its mode.
fn make_dir(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32, mode: u32) -> Result<()> {
    let name_c = std::ffi::CString::new(name.as_bytes()).expect("no NUL");
    // SAFETY: valid fd and name.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), name_c.as_ptr(), mode & 0o700) } < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("creating {}", Path::new(name).display()));
    }
    let fd = copy::open_dir(dir, name)?;
    copy::remove_inherited_acls(&copy::XattrSource::Fd(fd.as_fd()))?;
    nix::unistd::fchown(&fd, Some(uid.into()), Some(gid.into())).context("fchown")?;
    nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(mode))
        .context("fchmod")?;
    Ok(())
}

#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RecordFile {
    pub version: u32,
    pub runs: Vec<RecordRun>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordRun {
    /// Unix time (seconds) the run finished.
    pub finished_at: u64,
    pub manifest: String,
    pub entries: Vec<RecordEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordEntry {
    pub path: String,
    pub action: Action,
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
}

pub const RECORD_DIR: &str = ".rasa";
pub const RECORD_FILE: &str = "migrations.json";

/// Append this run to `<storageRoot>/.rasa/migrations.json` of every storage root it used.
fn write_records(
    manifest_path: &Path,
    entries: &[PlannedEntry],
    live: BorrowedFd<'_>,
) -> Result<()> {
    let mut roots: Vec<String> = Vec::new();
    for e in entries {
        if !roots.contains(&e.storage_root) {
            roots.push(e.storage_root.clone());
        }
    }
    for root in roots {
        let parts = components(&root, "storageRoot")?;
        let Walk::Dir(root_fd) = walk(live, &parts)? else {
            anyhow::bail!("the storage root {root} changed during the run");
        };
        let record_dir = match copy::lstat_at(root_fd.as_fd(), OsStr::new(RECORD_DIR))? {
            Some(st) if copy::is_type(&st, libc::S_IFDIR) => {
                copy::open_dir(root_fd.as_fd(), OsStr::new(RECORD_DIR))?
            }
            Some(_) => {
                return Err(hostile_symlink(
                    &root,
                    &format!("{root}/{RECORD_DIR}"),
                    "not a directory",
                ))
            }
            None => {
                make_dir(root_fd.as_fd(), OsStr::new(RECORD_DIR), 0, 0, 0o700)?;
                copy::open_dir(root_fd.as_fd(), OsStr::new(RECORD_DIR))?
            }
        };
        let mut record = read_record(record_dir.as_fd())?.unwrap_or(RecordFile {
            version: 1,
            runs: Vec::new(),
        });
        record.runs.push(RecordRun {
            finished_at: crate::old_roots::now(),
            manifest: manifest_path.display().to_string(),
            entries: entries
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
        });
        let text = serde_json::to_string_pretty(&record)? + "\n";
        let temp = OsStr::new(".migrations.json.tmp");
        let _ = nix::unistd::unlinkat(
            record_dir.as_fd(),
            temp,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        let fd = nix::fcntl::openat(
            record_dir.as_fd(),
            temp,
            nix::fcntl::OFlag::O_WRONLY
                | nix::fcntl::OFlag::O_CREAT
                | nix::fcntl::OFlag::O_EXCL
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .context("writing the record")?;
        let mut file = std::fs::File::from(fd);
        std::io::Write::write_all(&mut file, text.as_bytes()).context("writing the record")?;
        file.sync_all()?;
        nix::fcntl::renameat(
            record_dir.as_fd(),
            temp,
            record_dir.as_fd(),
            OsStr::new(RECORD_FILE),
        )
        .context("publishing the record")?;
    }
    Ok(())
}

/// The record of earlier runs in an open `.rasa` directory, if there is one.
pub fn read_record(record_dir: BorrowedFd<'_>) -> Result<Option<RecordFile>> {
    let fd = match copy::open_at(record_dir, OsStr::new(RECORD_FILE), libc::O_RDONLY) {
        Ok(fd) => fd,
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .and_then(|e| e.raw_os_error())
                == Some(libc::ENOENT) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let text = std::io::read_to_string(std::fs::File::from(fd))?;
    Ok(serde_json::from_str(&text).ok())
}

pub fn render(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}",
        if report.applied {
            "Migration done:"
        } else {
            "Migration plan (dry run; pass --apply to execute it):"
        }
    );
    let width = report
        .entries
        .iter()
        .map(|e| e.path.chars().count())
        .max()
        .unwrap_or(0);
    for e in &report.entries {
        let action = match (e.action, e.resolution) {
            (Action::Conflict, Some(ConflictPolicy::KeepStorage)) => {
                "conflict, kept storage".into()
            }
            (Action::Conflict, Some(ConflictPolicy::ReplaceWithBackup)) => {
                if report.applied {
                    "conflict, replaced".into()
                } else {
                    "conflict, will replace".into()
                }
            }
            (Action::Copy, _) if report.applied => "copied".to_owned(),
            (a, _) => a.label().to_owned(),
        };
        let mut detail = Vec::new();
        if e.will_copy() || e.action == Action::Identical || e.action == Action::Conflict {
            detail.push(format!(
                "{}, {} item{}",
                indicatif::HumanBytes(e.bytes),
                e.items,
                if e.items == 1 { "" } else { "s" }
            ));
        }
        if let Some(m) = e.method {
            detail.push(
                match m {
                    Method::Reflink => "reflink",
                    Method::Copy => "copy",
                }
                .into(),
            );
        }
        if let Some(reason) = &e.reason {
            detail.push(reason.clone());
        }
        if let Some(backup) = &e.backup {
            detail.push(format!("old version kept at {backup}"));
        }
        if let Some(r) = &e.result {
            for s in &r.skipped_sockets {
                detail.push(format!("skipped socket {s}"));
            }
            for s in &r.copied_again {
                detail.push(format!("{s} changed while copied, copied again"));
            }
        }
        let _ = writeln!(
            out,
            "  {action:<24} {:<width$}  -> {}  ({})",
            e.path,
            e.storage_path,
            detail.join("; ")
        );
    }
    let count = |a: Action| report.entries.iter().filter(|e| e.action == a).count();
    let copy_bytes: u64 = report
        .entries
        .iter()
        .filter(|e| e.will_copy())
        .map(|e| e.bytes)
        .sum();
    let _ = writeln!(
        out,
        "{} to copy ({}), {} already persisted, {} identical, {} conflicts, {} missing, {} skipped",
        report.entries.iter().filter(|e| e.will_copy()).count(),
        indicatif::HumanBytes(copy_bytes),
        count(Action::AlreadyPersisted),
        count(Action::Identical),
        count(Action::Conflict),
        count(Action::Missing),
        count(Action::Skipped),
    );
    if report
        .entries
        .iter()
        .any(|e| e.action == Action::Conflict && e.resolution == Some(ConflictPolicy::Stop))
    {
        let _ = writeln!(
            out,
            "Conflicts were left alone: compare the two versions, then rerun with \
             --on-conflict keep-storage or --on-conflict replace-with-backup."
        );
    }
    out
}
