//! `rasa check system`: is this machine ready to lose `/` at every boot?
//!
//! Each check is independent and reports ✓ or ✗ (with the fix), or ! for a warning that does
//! not fail the check, or · for plain information. The filesystem is inspected through a
//! read-only mount of its top level in a private mount namespace (see toplevel.rs), so the
//! check itself can change nothing.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use crate::btrfs;
use crate::error::exit;
use crate::fs::{self, Beneath};
use crate::layout::LayoutArgs;
use crate::log;
use crate::manifest::{self, Manifest};
use crate::migrate::record;
use crate::old_roots;
use crate::toplevel::{self, TopLevel};

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  rasa check system
  rasa check system --device /dev/mapper/cryptroot --json
  rasa check system --live-root /mnt              # a system mounted by an installer")]
pub struct Args {
    #[command(flatten)]
    pub layout: LayoutArgs,

    /// The manifest to check against [default: as for `rasa migrate`].
    #[arg(long, value_name = "PATH")]
    pub manifest: Option<PathBuf>,

    /// The root the manifest's paths are resolved under (for installers, chroots and tests).
    #[arg(long, value_name = "PATH", default_value = "/")]
    pub live_root: PathBuf,

    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Fail,
    Warn,
    Info,
}

#[derive(Debug, Serialize)]
pub struct Item {
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// Every path the item is about, when the message can show only some (JSON shows all).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

#[derive(Default)]
struct Report {
    items: Vec<Item>,
}

impl Report {
    fn ok(&mut self, message: impl Into<String>) {
        self.push(Status::Ok, message.into(), None);
    }
    fn fail(&mut self, message: impl Into<String>, fix: impl Into<String>) {
        self.push(Status::Fail, message.into(), Some(fix.into()));
    }
    fn warn(&mut self, message: impl Into<String>, fix: impl Into<String>) {
        self.push(Status::Warn, message.into(), Some(fix.into()));
    }
    fn info(&mut self, message: impl Into<String>) {
        self.push(Status::Info, message.into(), None);
    }
    fn push(&mut self, status: Status, message: String, fix: Option<String>) {
        self.items.push(Item {
            status,
            message,
            fix,
            paths: Vec::new(),
        });
    }
}

pub fn run(args: Args) -> Result<u8> {
    let mut report = Report::default();
    inspect(&args, &mut report);
    let failed = report.items.iter().any(|i| i.status == Status::Fail);
    if args.json {
        #[derive(Serialize)]
        struct Json<'a> {
            ok: bool,
            checks: &'a [Item],
        }
        log::print_stdout(
            &(serde_json::to_string_pretty(&Json {
                ok: !failed,
                checks: &report.items,
            })? + "\n"),
        )?;
    } else {
        log::print_stdout(&render(&report.items, log::stdout_colour()))?;
    }
    Ok(if failed { exit::PROBLEMS } else { exit::OK })
}

pub fn render(items: &[Item], colour: bool) -> String {
    let mut out = String::new();
    for item in items {
        let (mark, code) = match item.status {
            Status::Ok => ("✓", "32"),
            Status::Fail => ("✗", "31"),
            Status::Warn => ("!", "33"),
            Status::Info => ("·", "0"),
        };
        if colour {
            out.push_str(&format!("\x1b[1;{code}m{mark}\x1b[0m {}\n", item.message));
        } else {
            out.push_str(&format!("{mark} {}\n", item.message));
        }
        if let Some(fix) = &item.fix {
            out.push_str(&format!("    fix: {fix}\n"));
        }
    }
    let count = |s: Status| items.iter().filter(|i| i.status == s).count();
    out.push_str(&format!(
        "{} passed, {} failed, {} warning{}\n",
        count(Status::Ok),
        count(Status::Fail),
        count(Status::Warn),
        if count(Status::Warn) == 1 { "" } else { "s" }
    ));
    out
}

fn inspect(args: &Args, report: &mut Report) {
    let manifest = match manifest::locate(args.manifest.as_deref()) {
        Ok((path, source)) => match manifest::read(&path) {
            Ok(m) => {
                let problems = super::manifest::problems(&m);
                if problems.is_empty() {
                    report.ok(format!("manifest {} is valid ({source})", path.display()));
                } else {
                    report.fail(
                        format!(
                            "manifest {} has problems: {}",
                            path.display(),
                            problems.join("; ")
                        ),
                        format!(
                            "run `rasa check manifest {}` and fix the configuration",
                            path.display()
                        ),
                    );
                }
                Some(m)
            }
            Err(e) => {
                report.fail(
                    format!("manifest {}: {}", path.display(), first_line(&e)),
                    "regenerate it with nixos-rebuild, or pass --manifest PATH",
                );
                None
            }
        },
        Err(_) => {
            report.warn(
                "no manifest found (looked in the next boot's system and /etc/rasa)",
                "enable the rasa NixOS module and run `nixos-rebuild boot`, or pass --manifest PATH",
            );
            None
        }
    };

    let layout = match args.layout.validate() {
        Ok(layout) => layout,
        Err(e) => {
            report.fail(
                first_line(&e),
                "pass --device (and the subvolume names if not the defaults)",
            );
            return;
        }
    };
    let device = layout.device.display().to_string();
    if let Err(e) = toplevel::check_device(&layout.device) {
        report.fail(
            first_line(&e),
            "pass the unlocked btrfs device with --device (for LUKS: /dev/mapper/<name>)",
        );
        return;
    }
    report.ok(format!("{device} holds a btrfs filesystem"));

    if !nix::unistd::geteuid().is_root() {
        report.fail(
            "cannot inspect the subvolumes without root",
            "run `sudo rasa check system`",
        );
        return;
    }
    let top = match TopLevel::mount(&layout.device, true) {
        Ok(top) => top,
        Err(e) => {
            report.fail(first_line(&e), "see `dmesg` for the kernel's reason");
            return;
        }
    };

    let mut missing = Vec::new();
    let mut names = vec![layout.root.as_str(), layout.persist.as_str()];
    if let Some(blank) = &layout.blank {
        names.push(blank);
    }
    for name in &names {
        if !top.is_subvolume(OsStr::new(name)).unwrap_or(false) {
            missing.push(*name);
        }
    }
    if missing.is_empty() {
        report.ok(format!("subvolumes {} exist", names.join(", ")));
    } else {
        report.fail(
            format!(
                "subvolume{} {} missing",
                if missing.len() == 1 { " is" } else { "s are" },
                missing.join(", ")
            ),
            format!(
                "create {} at the top level (mount -o subvolid=5 {device} /mnt; btrfs subvolume \
                 create /mnt/<name>; for the blank: btrfs subvolume snapshot -r /mnt/{} /mnt/{})",
                missing.join(", "),
                layout.root,
                layout.blank.as_deref().unwrap_or("root-blank")
            ),
        );
    }

    match &layout.blank {
        Some(blank) if !missing.contains(&blank.as_str()) => check_blank(&top, blank, report),
        Some(_) => {}
        None => report.info("empty mode: each boot starts from a new empty subvolume (no blank)"),
    }

    let persist_id = btrfs::open_dir_at(top.fd(), OsStr::new(&layout.persist))
        .ok()
        .and_then(|fd| btrfs::subvol_info(fd.as_fd()).ok())
        .map(|info| info.id);

    let live = match std::fs::File::open(&args.live_root) {
        Ok(f) => Some(OwnedFd::from(f)),
        Err(e) => {
            report.fail(
                format!("cannot open --live-root {}: {e}", args.live_root.display()),
                "pass an existing directory with --live-root",
            );
            None
        }
    };
    if let (Some(live), Some(manifest)) = (&live, &manifest) {
        check_storage(live, manifest, &layout.persist, persist_id, report);
        check_entries(live, manifest, report);
        check_records(live, manifest, report);
        check_mutable_users(live, manifest, report);
        check_service_state(live, manifest, report);
    }
    if let (Some(live), Some(manifest)) = (&live, &manifest) {
        let earlier = earlier_id_maps(&top, &layout.old_roots, live, manifest);
        check_id_drift(live, &args.live_root, manifest, &earlier, report);
    }

    match old_roots::scan(top.fd(), &layout.old_roots) {
        Ok(roots) if roots.is_empty() => report.info(format!(
            "no old roots kept yet in {} (one is kept per boot)",
            layout.old_roots
        )),
        Ok(roots) => report.info(format!(
            "{} old root{} kept in {} (oldest {}, newest {})",
            roots.len(),
            if roots.len() == 1 { "" } else { "s" },
            layout.old_roots,
            roots.first().map(|r| r.name.as_str()).unwrap_or(""),
            roots.last().map(|r| r.name.as_str()).unwrap_or("")
        )),
        Err(e) => report.fail(
            format!(
                "cannot read the old roots in {}: {}",
                layout.old_roots,
                first_line(&e)
            ),
            format!(
                "check that {} at the top level is a directory",
                layout.old_roots
            ),
        ),
    }
    let _ = top.unmount();
}

fn first_line(e: &anyhow::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

fn check_blank(top: &TopLevel, blank: &str, report: &mut Report) {
    let fd = match btrfs::open_dir_at(top.fd(), OsStr::new(blank)) {
        Ok(fd) => fd,
        Err(e) => {
            report.fail(format!("cannot open the blank {blank}: {e}"), "recreate it");
            return;
        }
    };
    let fix_recreate = format!(
        "recreate it empty and read-only: btrfs subvolume delete /mnt/{blank}; btrfs subvolume \
         create /mnt/blank-tmp; btrfs subvolume snapshot -r /mnt/blank-tmp /mnt/{blank}; btrfs \
         subvolume delete /mnt/blank-tmp (with the top level mounted at /mnt)"
    );
    match btrfs::is_readonly(fd.as_fd()) {
        Ok(true) => {}
        Ok(false) => {
            report.fail(
                format!("the blank {blank} is writable: anything written to it would come back at every boot"),
                format!("btrfs property set -ts /mnt/{blank} ro true (with the top level mounted at /mnt)"),
            );
            return;
        }
        Err(e) => {
            report.fail(
                format!("cannot read the flags of {blank}: {e:#}"),
                fix_recreate,
            );
            return;
        }
    }
    match fs::list(fd.as_fd()) {
        Ok(names) if names.is_empty() => {
            report.ok(format!("the blank {blank} is read-only and empty"))
        }
        Ok(names) => report.fail(
            format!(
                "the blank {blank} is read-only but not empty ({} entr{}, e.g. {}): every boot \
                 would start with them",
                names.len(),
                if names.len() == 1 { "y" } else { "ies" },
                Path::new(&names[0]).display()
            ),
            fix_recreate,
        ),
        Err(e) => report.fail(
            format!("cannot list the blank {blank}: {e:#}"),
            fix_recreate,
        ),
    }
}

fn storage_roots(manifest: &Manifest) -> Vec<String> {
    let mut roots: Vec<String> = manifest
        .entries
        .iter()
        .map(|e| e.storage_root.clone())
        .collect();
    roots.sort();
    roots.dedup();
    roots
}

/// The directory at `path` under the live root, opened without following any symlink.
fn open_under(live: &OwnedFd, path: &str) -> nix::Result<Beneath> {
    fs::open_dir_beneath(live.as_fd(), &fs::components(OsStr::new(path)))
}

/// Where a path stands under the live root.
enum Found {
    Exists,
    Absent,
    /// Something on the way is a symlink or not a directory: the path as listed cannot be
    /// reached without following it (described).
    Blocked(String),
}

fn find_under(live: &OwnedFd, path: &str) -> Found {
    let parts = fs::components(OsStr::new(path));
    let Some((name, parents)) = parts.split_last() else {
        return Found::Exists;
    };
    match fs::open_dir_beneath(live.as_fd(), parents) {
        Ok(Beneath::Dir(dir, _)) => match fs::lstat_at(dir.as_fd(), name) {
            Ok(Some(_)) => Found::Exists,
            Ok(None) => Found::Absent,
            Err(e) => Found::Blocked(format!("{path} cannot be inspected: {e}")),
        },
        Ok(Beneath::Missing { .. }) => Found::Absent,
        Ok(Beneath::Symlink { at, target }) => Found::Blocked(format!(
            "{} is a symlink to {}",
            fs::joined(&parents[..=at]),
            Path::new(&target).display()
        )),
        Ok(Beneath::NotDirectory { at, kind }) => Found::Blocked(format!(
            "{} is {}",
            fs::joined(&parents[..=at]),
            kind.described()
        )),
        Err(e) => Found::Blocked(format!("{path} cannot be inspected: {e}")),
    }
}

fn check_storage(
    live: &OwnedFd,
    manifest: &Manifest,
    persist: &str,
    persist_id: Option<u64>,
    report: &mut Report,
) {
    for root in storage_roots(manifest) {
        let fix = format!(
            "mount the {persist} subvolume there at boot: fileSystems.\"{root}\" = {{ device = \
             ...; fsType = \"btrfs\"; options = [ \"subvol={persist}\" ]; neededForBoot = true; }}"
        );
        match open_under(live, &root) {
            Ok(Beneath::Dir(fd, st)) => {
                let info = btrfs::subvol_info(fd.as_fd()).ok();
                let top_of_subvolume = st.st_ino == btrfs::FIRST_FREE_OBJECTID;
                match (info, persist_id) {
                    (Some(info), Some(id)) if info.id == id && top_of_subvolume => {
                        report.ok(format!("storage root {root} is the {persist} subvolume"))
                    }
                    _ => report.fail(
                        format!(
                            "storage root {root} is not the {persist} subvolume: what is written \
                             there lives on the root and is wiped at the next boot"
                        ),
                        fix,
                    ),
                }
            }
            Ok(Beneath::Missing { .. }) => {
                report.fail(format!("storage root {root} does not exist"), fix)
            }
            Ok(Beneath::Symlink { at, target }) => report.fail(
                format!(
                    "storage root {root} goes through a symlink ({} -> {}): rasa never writes \
                     through one",
                    fs::joined(&fs::components(OsStr::new(&root))[..=at]),
                    Path::new(&target).display()
                ),
                fix,
            ),
            Ok(Beneath::NotDirectory { at, kind }) => report.fail(
                format!(
                    "storage root {root} is not a directory ({} is {})",
                    fs::joined(&fs::components(OsStr::new(&root))[..=at]),
                    kind.described()
                ),
                fix,
            ),
            Err(e) => report.fail(format!("cannot inspect storage root {root}: {e}"), fix),
        }
    }
}

fn check_entries(live: &OwnedFd, manifest: &Manifest, report: &mut Report) {
    let mut absent = Vec::new();
    let mut both_absent = 0;
    for entry in &manifest.entries {
        let stored = entry.storage_path();
        let in_storage = find_under(live, &stored.to_string_lossy());
        let on_live = find_under(live, &entry.path);
        if let Found::Blocked(why) = &on_live {
            // Not "exists nowhere yet": whatever is behind the symlink lives on the root.
            report.fail(
                format!(
                    "manifest entry {}: {why}; rasa does not follow it, and the next boot erases \
                     what is there",
                    entry.path
                ),
                "persist the real path (the symlink's target) instead, or replace the symlink \
                 with the directory it points to; then run `rasa migrate --apply`",
            );
            continue;
        }
        match (in_storage, on_live) {
            (Found::Blocked(why), _) => report.fail(
                format!(
                    "the storage copy of {} cannot be reached: {why}",
                    entry.path
                ),
                format!(
                    "make every directory on the way to {} a real directory (rasa never writes \
                     through a symlink in storage)",
                    stored.display()
                ),
            ),
            (Found::Exists, _) => {}
            (Found::Absent, _) if entry.needed_for_boot => report.fail(
                format!(
                    "{} is needed for boot (the initrd mounts it before activation) but {} does \
                     not exist",
                    entry.path,
                    stored.display()
                ),
                "run `rasa migrate --apply` (it creates it, empty if there is nothing to copy)",
            ),
            (Found::Absent, Found::Exists) => absent.push(entry.path.clone()),
            (Found::Absent, _) => both_absent += 1,
        }
    }
    let total = manifest.entries.len();
    if absent.is_empty() {
        let mut message = format!(
            "{} of {total} manifest entries exist in storage",
            total - both_absent
        );
        if both_absent > 0 {
            message.push_str(&format!(
                " ({both_absent} exist nowhere yet; impermanence creates them empty at boot)"
            ));
        }
        report.ok(message);
    } else {
        let shown: Vec<&str> = absent.iter().take(5).map(String::as_str).collect();
        report.fail(
            format!(
                "{} manifest entr{} on / but not in storage, so the next boot erases {}: {}{}",
                absent.len(),
                if absent.len() == 1 { "y is" } else { "ies are" },
                if absent.len() == 1 { "it" } else { "them" },
                shown.join(", "),
                if absent.len() > 5 { ", ..." } else { "" }
            ),
            "run `rasa migrate` to see the plan, then `rasa migrate --apply`",
        );
    }
}

fn check_records(live: &OwnedFd, manifest: &Manifest, report: &mut Report) {
    for root in storage_roots(manifest) {
        let record = match open_under(live, &root) {
            Ok(Beneath::Dir(fd, _)) => record::read(fd.as_fd()).ok().flatten(),
            _ => None,
        };
        match record.as_ref().and_then(|r| r.runs.last()) {
            Some(run) => {
                let copied = run
                    .entries
                    .iter()
                    .filter(|e| e.action == record::Action::Copy)
                    .count();
                report.info(format!(
                    "last `rasa migrate --apply` into {root}: {} ({copied} entr{} copied, {} run{} recorded)",
                    old_roots::format_timestamp(run.finished_at),
                    if copied == 1 { "y" } else { "ies" },
                    record.as_ref().map_or(0, |r| r.runs.len()),
                    if record.as_ref().map_or(0, |r| r.runs.len()) == 1 { "" } else { "s" },
                ));
            }
            None => report.info(format!(
                "no record of `rasa migrate --apply` in {root}/.rasa"
            )),
        }
    }
}

/// With `users.mutableUsers = true`, passwords set with `passwd` live in /etc/shadow on the
/// root, and a wiped root forgets them. NixOS passes the setting to its activation script in a
/// users-groups.json in the store, which is cheap to read.
fn check_mutable_users(live: &OwnedFd, manifest: &Manifest, report: &mut Report) {
    let persisted = manifest
        .entries
        .iter()
        .any(|e| e.path == "/etc/shadow" || e.path == "/etc");
    if persisted {
        return;
    }
    // Read as the system under --live-root sees it: the profile is a chain of absolute
    // symlinks into its own /nix/store.
    let read = |path: &str| {
        fs::read_in_root(live.as_fd(), Path::new(path))
            .ok()
            .flatten()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
    };
    let activate = [
        "/nix/var/nix/profiles/system/activate",
        "/run/current-system/activate",
    ]
    .iter()
    .find_map(|p| read(p));
    let Some(activate) = activate else { return };
    let Some(spec) = activate
        .split(|c: char| c.is_whitespace() || c == '\'' || c == '"')
        .find(|w| w.starts_with("/nix/store/") && w.ends_with("-users-groups.json"))
    else {
        return;
    };
    let Some(text) = read(spec) else {
        return;
    };
    let mutable = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("mutableUsers").and_then(|m| m.as_bool()));
    if mutable == Some(true) {
        report.warn(
            "users.mutableUsers is true but /etc/shadow is not persisted: passwords changed with \
             `passwd` are lost at every boot",
            "set users.mutableUsers = false with hashedPasswordFile (kept under the storage root), \
             or persist /etc/shadow",
        );
    }
}

/// The units whose state (the manifest's `services`, from the module's state check) is on the
/// live root, not persisted and not on a file system of its own: what the next boot erases,
/// by unit. Information, not a failure: `rasa.ephemeral` may list it on purpose.
fn check_service_state(live: &OwnedFd, manifest: &Manifest, report: &mut Report) {
    let Ok(root_dev) = fs::fstat(live.as_fd()).map(|st| st.st_dev) else {
        return;
    };
    let persisted = |path: &str| {
        manifest.entries.iter().any(|e| {
            path == e.path
                || (path.starts_with(e.path.as_str()) && path[e.path.len()..].starts_with('/'))
        })
    };
    let on_root = |path: &str| -> bool {
        let parts = fs::components(OsStr::new(path));
        let Some((name, parents)) = parts.split_last() else {
            return false;
        };
        match fs::open_dir_beneath(live.as_fd(), parents) {
            Ok(Beneath::Dir(dir, st)) if st.st_dev == root_dev => {
                matches!(fs::lstat_at(dir.as_fd(), name), Ok(Some(st)) if st.st_dev == root_dev)
            }
            _ => false,
        }
    };
    let lost: Vec<String> = manifest
        .services
        .iter()
        .filter_map(|service| {
            let paths: Vec<&str> = service
                .paths
                .iter()
                .map(String::as_str)
                .filter(|p| !persisted(p) && on_root(p))
                .collect();
            (!paths.is_empty()).then(|| format!("{} ({})", service.unit, paths.join(", ")))
        })
        .collect();
    if !lost.is_empty() {
        report.info(format!(
            "state of {} unit{} is on the root and not persisted, so the next boot erases it: {}",
            lost.len(),
            if lost.len() == 1 { "" } else { "s" },
            lost.join("; ")
        ));
    }
}

// ---- uid/gid drift: stored files whose owner no longer maps to the user they belonged to ----

/// Users or groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum IdKind {
    User,
    Group,
}

impl IdKind {
    fn word(self) -> &'static str {
        match self {
            IdKind::User => "uid",
            IdKind::Group => "gid",
        }
    }
    fn map_file(self) -> &'static str {
        match self {
            IdKind::User => "var/lib/nixos/uid-map",
            IdKind::Group => "var/lib/nixos/gid-map",
        }
    }
}

/// The name → id maps NixOS's update-users-groups.pl keeps in /var/lib/nixos (uid-map,
/// gid-map: JSON objects; a removed user stays in them so its id is not handed out again).
#[derive(Debug, Default)]
struct IdMaps {
    uid: std::collections::BTreeMap<String, u32>,
    gid: std::collections::BTreeMap<String, u32>,
}

impl IdMaps {
    /// The maps of the system under `root`; `None` when it has neither file.
    fn read(root: std::os::fd::BorrowedFd<'_>) -> Option<IdMaps> {
        let read = |file: &str| -> Option<std::collections::BTreeMap<String, u32>> {
            let bytes = fs::read_in_root(root, Path::new(file)).ok().flatten()?;
            serde_json::from_slice(&bytes).ok()
        };
        let uid = read(IdKind::User.map_file());
        let gid = read(IdKind::Group.map_file());
        if uid.is_none() && gid.is_none() {
            return None;
        }
        Some(IdMaps {
            uid: uid.unwrap_or_default(),
            gid: gid.unwrap_or_default(),
        })
    }
    fn of(&self, kind: IdKind) -> &std::collections::BTreeMap<String, u32> {
        match kind {
            IdKind::User => &self.uid,
            IdKind::Group => &self.gid,
        }
    }
}

/// The maps earlier boots used: each old root's own /var/lib/nixos (what that boot allocated,
/// when /var/lib/nixos was not persisted), and the copy in each storage root.
fn earlier_id_maps(
    top: &TopLevel,
    old_roots_dir: &str,
    live: &OwnedFd,
    manifest: &Manifest,
) -> Vec<(String, IdMaps)> {
    let mut earlier = Vec::new();
    for root in old_roots::scan(top.fd(), old_roots_dir).unwrap_or_default() {
        let parts = [old_roots_dir.into(), root.name.clone().into()];
        if let Ok(Beneath::Dir(fd, _)) = fs::open_dir_beneath(top.fd(), &parts) {
            if let Some(maps) = IdMaps::read(fd.as_fd()) {
                earlier.push((format!("old root {}", root.name), maps));
            }
        }
    }
    for root in storage_roots(manifest) {
        if let Ok(Beneath::Dir(fd, _)) = open_under(live, &root) {
            if let Some(maps) = IdMaps::read(fd.as_fd()) {
                earlier.push((format!("{root}/var/lib/nixos"), maps));
            }
        }
    }
    earlier
}

/// Why a stored file's owner is not who it belonged to.
#[derive(Debug, Clone)]
struct Belonged {
    name: String,
    /// Where `name` had the file's id: an earlier map, or the manifest entry that declares it.
    source: String,
    /// The id `name` has now, if the current map has it.
    now: Option<u32>,
}

/// The names an id belonged to in the earlier maps and no longer does.
fn drifted(kind: IdKind, id: u32, current: &IdMaps, earlier: &[(String, IdMaps)]) -> Vec<Belonged> {
    let mut found: Vec<Belonged> = Vec::new();
    for (source, maps) in earlier {
        for (name, _) in maps.of(kind).iter().filter(|(_, &v)| v == id) {
            let now = current.of(kind).get(name).copied();
            if now != Some(id) && !found.iter().any(|b| &b.name == name) {
                found.push(Belonged {
                    name: name.clone(),
                    source: source.clone(),
                    now,
                });
            }
        }
    }
    found
}

/// Files in storage whose uid or gid no longer maps to the user or group it belonged to: when
/// /var/lib/nixos is not kept (or was kept late), NixOS hands out ids afresh and a service's
/// state ends up owned by another user, or by nobody. Compared: the current maps (the live
/// root's /var/lib/nixos) with every earlier map, and with the owner a directory entry of the
/// manifest declares.
fn check_id_drift(
    live: &OwnedFd,
    live_root: &Path,
    manifest: &Manifest,
    earlier: &[(String, IdMaps)],
    report: &mut Report,
) {
    use std::collections::{BTreeMap, HashMap};
    let Some(current) = IdMaps::read(live.as_fd()) else {
        report.info(
            "no /var/lib/nixos/uid-map or gid-map on the live root: uid/gid drift not checked",
        );
        return;
    };
    let declared: HashMap<PathBuf, &manifest::Entry> = manifest
        .entries
        .iter()
        .filter(|e| e.kind == manifest::EntryKind::Directory)
        .map(|e| (e.storage_path(), e))
        .collect();
    let mut cache: HashMap<(IdKind, u32), Vec<Belonged>> = HashMap::new();
    // (kind, id) → why, and the files.
    let mut groups: BTreeMap<(IdKind, u32), (Vec<Belonged>, Vec<String>)> = BTreeMap::new();
    let mut files = 0u64;
    let mut walked = Vec::new();
    for root in storage_roots(manifest) {
        let parts = fs::components(OsStr::new(&root));
        let Some((name, parents)) = parts.split_last() else {
            continue;
        };
        let Ok(Beneath::Dir(parent, _)) = fs::open_dir_beneath(live.as_fd(), parents) else {
            continue;
        };
        let mounts = fs::walk::MountRoots::below(&live_root.join(root.trim_start_matches('/')));
        let Ok(walk) = fs::walk::Walk::new(parent.as_fd(), name, mounts) else {
            continue;
        };
        let base = Path::new(&root)
            .parent()
            .unwrap_or(Path::new("/"))
            .to_path_buf();
        walked.push(root.clone());
        for event in walk {
            let event = match event {
                Ok(event) => event,
                Err((rel, e)) => {
                    report.warn(
                        format!(
                            "uid/gid drift: cannot walk {}: {e}",
                            base.join(&rel).display()
                        ),
                        "check the permissions and the filesystem (dmesg)",
                    );
                    break;
                }
            };
            if event.mount_point {
                continue;
            }
            files += 1;
            let path = base.join(&event.rel);
            for (kind, id) in [
                (IdKind::User, event.stat.st_uid),
                (IdKind::Group, event.stat.st_gid),
            ] {
                let mut why = cache
                    .entry((kind, id))
                    .or_insert_with(|| drifted(kind, id, &current, earlier))
                    .clone();
                if let Some(entry) = declared.get(&path) {
                    let name = match kind {
                        IdKind::User => &entry.user,
                        IdKind::Group => &entry.group,
                    };
                    // A directory declared as root's is often chowned by its service; only a
                    // named owner says whose it is.
                    let now = current.of(kind).get(name).copied();
                    if name != "root" && now.is_some() && now != Some(id) {
                        why.push(Belonged {
                            name: name.clone(),
                            source: format!("the manifest entry {}", entry.path),
                            now,
                        });
                    }
                }
                if !why.is_empty() {
                    let group = groups.entry((kind, id)).or_default();
                    for b in why {
                        // One reason per name: the first place it had this id.
                        if !group.0.iter().any(|seen| seen.name == b.name) {
                            group.0.push(b);
                        }
                    }
                    group.1.push(path.display().to_string());
                }
            }
        }
    }
    if groups.is_empty() {
        report.ok(format!(
            "owners of {files} stored file{} match the uid/gid maps ({} earlier map{} compared)",
            if files == 1 { "" } else { "s" },
            earlier.len(),
            if earlier.len() == 1 { "" } else { "s" }
        ));
        return;
    }
    const SHOWN: usize = 20;
    for ((kind, id), (why, mut paths)) in groups {
        paths.sort();
        let holder = current
            .of(kind)
            .iter()
            .find(|(_, &v)| v == id)
            .map(|(n, _)| n.clone());
        let reasons: Vec<String> = why
            .iter()
            .map(|b| {
                let now = match b.now {
                    Some(n) => format!("{} is now {} {n}", b.name, kind.word()),
                    None => format!("{} is not in the current map", b.name),
                };
                format!("{}'s in {}; {now}", b.name, b.source)
            })
            .collect();
        let shown: Vec<&str> = paths.iter().take(SHOWN).map(String::as_str).collect();
        // Whose state it is, from the manifest's services.
        let mut units: Vec<&str> = paths
            .iter()
            .flat_map(|p| {
                walked.iter().filter_map(move |root| {
                    p.strip_prefix(root.as_str())
                        .filter(|rest| rest.starts_with('/'))
                })
            })
            .flat_map(|live| manifest.units_of(live))
            .collect();
        units.sort();
        units.dedup();
        let message = format!(
            "{} stored file{}{} owned by {} {id}, which was {}{}: {}{}",
            paths.len(),
            if paths.len() == 1 { "" } else { "s" },
            if units.is_empty() {
                String::new()
            } else {
                format!(" (state of {})", units.join(", "))
            },
            kind.word(),
            reasons.join(", and "),
            match &holder {
                Some(h) => format!(", and {} {id} is now {h}'s", kind.word()),
                None => String::new(),
            },
            shown.join(", "),
            if paths.len() > SHOWN {
                format!(", and {} more (--json lists all)", paths.len() - SHOWN)
            } else {
                String::new()
            }
        );
        let keep = "keep /var/lib/nixos (rasa.presets.essential, needed for boot) so that ids \
                    stay the same across boots";
        let fix = match why.as_slice() {
            [Belonged {
                name,
                now: Some(new),
                ..
            }] => {
                let (test, change) = match kind {
                    IdKind::User => ("-uid", format!("chown -h {new}")),
                    IdKind::Group => ("-gid", format!("chgrp -h {new}")),
                };
                format!(
                    "give them back to {name}: find {} -xdev {test} {id} -exec {change} {{}} +; \
                     {keep}",
                    walked.join(" ")
                )
            }
            _ => format!(
                "decide whose they are, chown them to that {}, and {keep}",
                match kind {
                    IdKind::User => "user",
                    IdKind::Group => "group",
                }
            ),
        };
        report.fail(message, fix);
        if let Some(item) = report.items.last_mut() {
            item.paths = paths;
        }
    }
}
