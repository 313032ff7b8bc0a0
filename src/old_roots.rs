//! Previous roots: how they are named, listed, and pruned.
//!
//! Each boot's retired root becomes `<old-roots>/<YYYYMMDDTHHMMSSZ>`, a subvolume in a plain
//! directory at the top level (a directory, not a subvolume, because a subvolume can only be
//! renamed within its parent subvolume). The name is the clock at retirement (the year has as
//! many digits as it needs, so whatever the clock says gives a name the parser reads back).
//!
//! The clock is not trusted for order: the retirement order is the order in which the roots
//! were created, their `otransid` (the filesystem's transaction counter, which only grows; each
//! boot's root is created by the rollback that retires the previous one), and retention counts
//! by that order. (Not the last-change generation: merely reading an old root can bump it
//! through atime.) Age is measured from the name, corrected by that order where a clock was
//! wrong, so one boot with a clock in the year 9999 cannot keep its root (or freeze retention)
//! forever, and a clock behind only keeps more: see [`judge`].
//! Only subvolumes with names of that shape are ever pruned, and only `.pruning-<name>` of such
//! a name is taken as prune's own; anything else a user puts there is listed and left alone.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::btrfs;
use crate::failpoint;
use crate::layout::{LayoutArgs, RetentionArgs};
use crate::log;
use crate::toplevel::{self, TopLevel};

/// Prefix of an old root that pruning has claimed. A crash mid-prune leaves this name behind,
/// and the next prune finishes deleting it; listing never shows it as kept.
pub use crate::rules::PRUNING_PREFIX;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OldRoot {
    pub name: String,
    /// Seconds since the epoch at retirement, from the name (what the clock said then).
    pub retired: u64,
    /// Creation transaction and id of the subvolume: the retirement order, whatever the clocks
    /// said (each boot's root is created by the rollback that retires the one before it).
    pub order: (u64, u64),
    /// Subvolume id.
    pub id: u64,
}

/// Seconds since the epoch → `YYYYMMDDTHHMMSSZ` (UTC, proleptic Gregorian).
pub fn format_timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `YYYYMMDDTHHMMSSZ` → seconds since the epoch. The year has four digits or more: every
/// name [`format_timestamp`] makes is read back, and only those (the round trip is checked).
pub fn parse_timestamp(name: &str) -> Option<u64> {
    let b = name.as_bytes();
    let n = b.len();
    if !(16..=24).contains(&n) || b[n - 8] != b'T' || b[n - 1] != b'Z' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = std::str::from_utf8(&b[r]).ok()?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let ys = n - 12;
    let (y, mo, d) = (digits(0..ys)?, digits(ys..ys + 2)?, digits(ys + 2..ys + 4)?);
    let (h, mi, s) = (
        digits(n - 7..n - 5)?,
        digits(n - 5..n - 3)?,
        digits(n - 3..n - 1)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let days = days_from_civil(y, mo as u32, d as u32);
    let secs = days
        .checked_mul(86_400)?
        .checked_add(h * 3600 + mi * 60 + s)?;
    (secs >= 0 && format_timestamp(secs as u64) == name).then_some(secs as u64)
}

// Howard Hinnant's civil calendar algorithms: exact, no time-zone database needed (the initrd
// has none).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub fn now() -> u64 {
    // Tests fake the clock (a boot in the year 9999, a clock behind); release builds cannot.
    #[cfg(feature = "failpoints")]
    if let Some(now) = std::env::var("RASA_TEST_NOW")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return now;
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The name for a root retired at `now`: the timestamp, one second later for each name that
/// is already taken. Returns whether the clock is behind the newest old root (worth a warning:
/// its age is then measured from the newer root, see [`judge`]).
pub fn next_name(scan: &Scan, now: u64) -> (String, bool) {
    let taken: std::collections::HashSet<&str> = scan
        .roots
        .iter()
        .map(|r| r.name.as_str())
        .chain(scan.other.iter().map(|o| o.name.as_str()))
        .collect();
    let mut at = now;
    while taken.contains(format_timestamp(at).as_str()) {
        at += 1;
    }
    let behind = scan.roots.last().is_some_and(|newest| now < newest.retired);
    (format_timestamp(at), behind)
}

/// What the old-roots directory holds.
#[derive(Debug, Default)]
pub struct Scan {
    /// Subvolumes named by [`format_timestamp`], in retirement (creation) order, oldest first.
    pub roots: Vec<OldRoot>,
    /// `.pruning-<name>` subvolumes: claimed by a prune that did not finish.
    pub claimed: Vec<OldRoot>,
    /// Everything else: listed, never touched.
    pub other: Vec<Other>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Other {
    pub name: String,
    pub why: &'static str,
}

/// The old roots in the directory, in retirement order, oldest first.
pub fn scan(top: BorrowedFd<'_>, dir_name: &str) -> Result<Vec<OldRoot>> {
    Ok(scan_all(top, dir_name)?.roots)
}

/// The old root called `name`, or the newest (last retired) one for `None`: only a root rasa
/// named and retention counts (not one a prune has claimed, nor anything else in the directory).
pub fn find<'a>(scan: &'a Scan, name: Option<&str>) -> Option<&'a OldRoot> {
    match name {
        Some(name) => scan.roots.iter().find(|r| r.name == name),
        None => scan.roots.last(),
    }
}

/// Read the old-roots directory; a missing one holds nothing.
pub fn scan_all(top: BorrowedFd<'_>, dir_name: &str) -> Result<Scan> {
    let dir = match btrfs::open_dir_at(top, OsStr::new(dir_name)) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(Scan::default()),
        Err(e) => return Err(e).with_context(|| format!("opening {dir_name}")),
    };
    let mut scan = Scan::default();
    let names: Vec<String> = crate::fs::list(dir.as_fd())
        .with_context(|| format!("reading {dir_name}"))?
        .iter()
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    for name in names {
        let (stamp, claimed) = match crate::rules::claimed_old_root(&name) {
            Some(stamp) => (Some(stamp), true),
            None => (parse_timestamp(&name).map(|_| name.as_str()), false),
        };
        let why = if stamp.is_none() {
            if name.starts_with(PRUNING_PREFIX) {
                Some(
                    "named like a prune in progress, but not of an old root rasa named; left alone",
                )
            } else {
                Some("not an old-root name rasa makes; left alone")
            }
        } else if !btrfs::is_subvolume_at(dir.as_fd(), OsStr::new(&name))? {
            Some("not a subvolume; left alone")
        } else {
            None
        };
        if let Some(why) = why {
            scan.other.push(Other { name, why });
            continue;
        }
        let fd = btrfs::open_dir_at(dir.as_fd(), OsStr::new(&name))
            .with_context(|| format!("opening {dir_name}/{name}"))?;
        let info = btrfs::subvol_info(fd.as_fd())?;
        let root = OldRoot {
            retired: parse_timestamp(stamp.unwrap_or_default()).unwrap_or_default(),
            name,
            order: (info.otransid, info.id),
            id: info.id,
        };
        if claimed {
            scan.claimed.push(root);
        } else {
            scan.roots.push(root);
        }
    }
    scan.roots
        .sort_by(|a, b| (a.order, a.id, &a.name).cmp(&(b.order, b.id, &b.name)));
    scan.claimed.sort_by(|a, b| a.name.cmp(&b.name));
    scan.other.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(scan)
}

/// Why a root is kept, or that it goes.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Among the `keep` newest.
    KeptByCount,
    /// Retired less than `keep_days` ago.
    KeptByAge,
    Prune,
}

/// Retention: the newest `keep` (in retirement order) always stay, and so does every root
/// younger than `keep_days`.
///
/// A root's age counts from its name while the name fits the order: not in the future, and not
/// before the name of a root retired earlier. A name that does not fit (a boot whose clock was
/// ahead, even in the year 9999, or behind) says only that the root was retired between its
/// neighbours, so its age counts from the latest time that allows: the next fitting root's
/// time, or now while none follows. A wrong clock therefore only ever keeps more, and never
/// keeps a root forever or stops age retention.
pub fn judge(roots: &[OldRoot], retention: RetentionArgs, now: u64) -> Vec<Verdict> {
    let n = roots.len();
    let mut latest = vec![None; n];
    let mut fitting = 0u64;
    for (i, root) in roots.iter().enumerate() {
        if root.retired <= now && root.retired >= fitting {
            fitting = root.retired;
            latest[i] = Some(fitting);
        }
    }
    let mut after = now;
    for slot in latest.iter_mut().rev() {
        after = *slot.get_or_insert(after);
    }
    roots
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let rank_from_newest = n - 1 - i;
            if rank_from_newest < retention.keep as usize {
                Verdict::KeptByCount
            } else if now - latest[i].unwrap_or(now) < u64::from(retention.keep_days) * 86_400 {
                Verdict::KeptByAge
            } else {
                Verdict::Prune
            }
        })
        .collect()
}

/// Delete the old root `<dir>/<name>` with everything nested in it.
fn delete_tree(top: &TopLevel, dir_name: &str, name: &str, protected: &[u64]) -> Result<usize> {
    let dir = btrfs::open_dir_at(top.fd(), OsStr::new(dir_name))
        .with_context(|| format!("opening {dir_name}"))?;
    btrfs::delete_subvolume_tree(top.fd(), dir.as_fd(), OsStr::new(name), protected, || {
        failpoint::hit("prune-deleted-subvolume")
    })
    .with_context(|| format!("pruning {dir_name}/{name}"))
}

/// Ids of the subvolumes pruning must never delete: the root, the blank, the persistent
/// subvolume and the new root by name, every subvolume of this filesystem mounted anywhere
/// (the running `/`, a boot from an old root), and the filesystem's default subvolume.
pub fn protected_ids(top: &TopLevel, names: &[&str]) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    for name in names {
        if let Ok(fd) = btrfs::open_dir_at(top.fd(), OsStr::new(name)) {
            if top.is_subvolume(OsStr::new(name))? {
                ids.push(btrfs::subvol_info(fd.as_fd())?.id);
            }
        }
    }
    ids.extend(top.mounted_subvolumes().into_iter().map(|(id, _)| id));
    ids.push(top.default_subvolume()?);
    ids.retain(|id| *id != btrfs::FS_TREE_OBJECTID);
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Whether the tree of subvolume `id` holds a protected subvolume.
fn holds_protected(top: &TopLevel, id: u64, protected: &[u64]) -> Result<bool> {
    if protected.contains(&id) {
        return Ok(true);
    }
    Ok(btrfs::tree::descendants_depth_first(top.fd(), id)?
        .iter()
        .any(|d| protected.contains(d)))
}

#[derive(Debug, Serialize)]
pub struct PruneReport {
    pub kept: Vec<String>,
    pub pruned: Vec<String>,
    /// Past retention but mounted or holding a protected subvolume: kept, with a warning.
    pub in_use: Vec<String>,
    /// Old roots whose deletion failed, with the reason; the others were still pruned.
    pub failed: Vec<Failure>,
    pub subvolumes_deleted: usize,
    pub dry_run: bool,
}

#[derive(Debug, Serialize)]
pub struct Failure {
    pub name: String,
    pub error: String,
}

/// Apply retention. First finish any prune a crash interrupted, then claim each doomed root by
/// renaming it to `.pruning-<name>` (atomic; a crash leaves it claimed, never half-kept), then
/// delete its tree. A root that fails is reported and the others go on: one root that cannot
/// be deleted never stops pruning (the disk would fill).
pub fn prune(
    top: &TopLevel,
    layout: &crate::layout::Layout,
    retention: RetentionArgs,
    dry_run: bool,
) -> Result<PruneReport> {
    let dir_name = layout.old_roots.as_str();
    let mut protect: Vec<&str> = vec![&layout.root, &layout.persist];
    if let Some(blank) = &layout.blank {
        protect.push(blank);
    }
    let new_name = layout.new_root_name();
    protect.push(&new_name);
    let protected = protected_ids(top, &protect)?;
    let mut report = PruneReport {
        kept: Vec::new(),
        pruned: Vec::new(),
        in_use: Vec::new(),
        failed: Vec::new(),
        subvolumes_deleted: 0,
        dry_run,
    };
    let scan = scan_all(top.fd(), dir_name)?;

    let mut doomed = Vec::new();
    for claimed in &scan.claimed {
        let name = claimed.name.trim_start_matches(PRUNING_PREFIX).to_owned();
        if holds_protected(top, claimed.id, &protected)? {
            log::warn(format!("{dir_name}/{} is claimed for pruning but is (or holds) a mounted or protected subvolume; leaving it", claimed.name));
            report.in_use.push(name);
            continue;
        }
        log::info(format!(
            "finishing an interrupted prune of {dir_name}/{}",
            claimed.name
        ));
        doomed.push((name, claimed.name.clone(), true));
    }
    let verdicts = judge(&scan.roots, retention, now());
    for (root, verdict) in scan.roots.iter().zip(verdicts) {
        if verdict != Verdict::Prune {
            report.kept.push(root.name.clone());
        } else if holds_protected(top, root.id, &protected)? {
            log::warn(format!("{dir_name}/{} is past retention but is (or holds) a subvolume that is mounted or protected; keeping it", root.name));
            report.in_use.push(root.name.clone());
        } else {
            doomed.push((
                root.name.clone(),
                format!("{PRUNING_PREFIX}{}", root.name),
                false,
            ));
        }
    }

    for (name, claimed, already_claimed) in doomed {
        if dry_run {
            log::info(format!("would prune {dir_name}/{name}"));
            report.pruned.push(name);
            continue;
        }
        let result = (|| -> Result<usize> {
            if !already_claimed {
                let dir = btrfs::open_dir_at(top.fd(), OsStr::new(dir_name))?;
                nix::fcntl::renameat2(
                    dir.as_fd(),
                    name.as_str(),
                    dir.as_fd(),
                    claimed.as_str(),
                    nix::fcntl::RenameFlags::RENAME_NOREPLACE,
                )
                .with_context(|| format!("claiming {dir_name}/{name} for pruning"))?;
                failpoint::hit("prune-claimed");
            }
            delete_tree(top, dir_name, &claimed, &protected)
        })();
        match result {
            Ok(deleted) => {
                report.subvolumes_deleted += deleted;
                log::info(format!(
                    "pruned {dir_name}/{name} ({deleted} subvolume{})",
                    if deleted == 1 { "" } else { "s" }
                ));
                report.pruned.push(name);
            }
            Err(e) => {
                log::error(format!("{e:#}; going on with the other old roots"));
                report.failed.push(Failure {
                    name,
                    error: format!("{e:#}"),
                });
            }
        }
    }
    Ok(report)
}

// ---- `rasa prune` and `rasa old-roots list` ------------------------------------------------

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  # What would go, without deleting anything
  rasa prune --device /dev/mapper/cryptroot --dry-run

  # Keep the 3 newest old roots plus any retired in the last 14 days
  rasa prune --device /dev/mapper/cryptroot --keep 3 --keep-days 14

Run from a stage-2 service after boot (the NixOS module installs rasa-prune.service), so the
deletion of large or deeply nested old roots never delays the boot.")]
pub struct PruneArgs {
    #[command(flatten)]
    pub layout: LayoutArgs,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Show what would be pruned; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run_prune(args: PruneArgs) -> Result<u8> {
    let layout = args.layout.validate()?;
    toplevel::check_device(&layout.device)?;
    let top = TopLevel::mount(&layout.device, args.dry_run)?;
    let report = prune(&top, &layout, args.retention, args.dry_run)?;
    top.unmount()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let verb = if args.dry_run {
            "would prune"
        } else {
            "pruned"
        };
        println!(
            "{verb} {} old root(s), kept {}",
            report.pruned.len(),
            report.kept.len() + report.in_use.len()
        );
        for name in &report.in_use {
            println!("kept {name}: past retention, but mounted or holding a protected subvolume");
        }
        for failure in &report.failed {
            println!("FAILED to prune {}: {}", failure.name, failure.error);
        }
    }
    Ok(if report.failed.is_empty() {
        crate::error::exit::OK
    } else {
        crate::error::exit::FAILED
    })
}

#[derive(clap::Subcommand, Debug)]
pub enum OldRootsCommand {
    /// List the kept previous roots, newest first, with their retirement time, age, retention
    /// verdict and (on request) size and whether they hold a path.
    #[command(after_help = "\
Examples:
  rasa old-roots list
  rasa old-roots list --has /etc/nixos/configuration.nix   # which old roots hold it
  rasa old-roots list --size                               # walk each one for its size
  rasa old-roots list --device /dev/mapper/cryptroot --json

To get a file back from an old root:
  rasa restore /etc/nixos/configuration.nix            # dry run: from which old root, how big
  rasa restore /etc/nixos/configuration.nix --apply")]
    List(ListArgs),
    /// What the boot that left this old root created: the old root compared with the blank
    /// (the same as `rasa diff --old-root NAME`).
    #[command(after_help = "\
Examples:
  rasa old-roots show 20261122T193000Z
  rasa old-roots show 20261122T193000Z --long     # every path
  rasa old-roots show 20261122T193000Z --json")]
    Show(ShowArgs),
    /// Mount an old root read-only at /run/rasa/old-roots/NAME, for browsing.
    #[command(after_help = "\
Examples:
  rasa old-roots mount 20261122T193000Z
  ls /run/rasa/old-roots/20261122T193000Z/etc
  rasa old-roots umount 20261122T193000Z

The mount is read-only, nosuid, nodev and noexec, and visible to every process; prune never
deletes an old root while it is mounted.")]
    Mount(MountArgs),
    /// Unmount what `rasa old-roots mount` mounted.
    #[command(after_help = "\
Examples:
  rasa old-roots umount 20261122T193000Z
  rasa old-roots umount --all")]
    Umount(UmountArgs),
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub layout: LayoutArgs,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Say for each old root whether it holds this absolute path (a symlink on the way to it
    /// is reported, never followed).
    #[arg(long, value_name = "PATH")]
    pub has: Option<std::path::PathBuf>,
    /// Walk each old root to add up the size of its files (apparent size; old roots share
    /// most of their blocks with each other, so this is not what deleting one frees).
    #[arg(long)]
    pub size: bool,
    /// Print the list as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// The old root (a NAME of `rasa old-roots list`).
    pub name: String,
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// The manifest whose persisted paths and diffIgnore globs are left out.
    #[arg(long, value_name = "PATH")]
    pub manifest: Option<std::path::PathBuf>,
    /// Leave out absolute paths matching this glob; repeatable.
    #[arg(long = "ignore", value_name = "GLOB")]
    pub ignore: Vec<String>,
    /// Print every path instead of the summary.
    #[arg(long, conflicts_with = "json")]
    pub long: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Where `mount` puts old roots.
pub const MOUNT_DIR: &str = "/run/rasa/old-roots";

#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// The old root (a NAME of `rasa old-roots list`).
    pub name: String,
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// The directory the old root is mounted in, as DIR/NAME.
    #[arg(long, value_name = "DIR", default_value = MOUNT_DIR)]
    pub at: std::path::PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct UmountArgs {
    /// The old root to unmount.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub name: Option<String>,
    /// Unmount every old root mounted in DIR.
    #[arg(long)]
    pub all: bool,
    /// The directory `mount` used.
    #[arg(long, value_name = "DIR", default_value = MOUNT_DIR)]
    pub at: std::path::PathBuf,
    /// Directory at the top level where previous roots are kept.
    #[arg(long, value_name = "NAME", default_value = "old_roots")]
    pub old_roots: String,
    /// Only unmount old roots of this device [default: any].
    #[arg(long, value_name = "DEVICE", env = "RASA_DEVICE")]
    pub device: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
struct ListedRoot {
    name: String,
    /// Seconds since the epoch, from the name; 0 for what is not an old root.
    retired: u64,
    age_seconds: u64,
    /// The name's time, readable: when this root was retired (the next boot began).
    retired_at: String,
    created: u64,
    nested_subvolumes: usize,
    verdict: Listed,
    /// With --size: bytes in its files.
    #[serde(skip_serializing_if = "Option::is_none")]
    size_bytes: Option<u64>,
    /// With --has: whether it holds the path.
    #[serde(skip_serializing_if = "Option::is_none")]
    has: Option<Has>,
}

/// Whether an old root holds a path.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", tag = "state")]
enum Has {
    Yes {
        kind: &'static str,
    },
    No,
    /// A symlink on the way to the path: not followed.
    Symlink {
        at: String,
        target: String,
    },
}

/// What `list` says about one entry of the old-roots directory.
#[derive(Serialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum Listed {
    KeptByCount,
    KeptByAge,
    KeptInUse,
    Prune,
    /// `.pruning-<name>`: a prune that did not finish; the next prune goes on with it.
    BeingPruned,
    /// Not something rasa made; never touched.
    NotRasas,
}

pub fn run_old_roots(command: OldRootsCommand) -> Result<u8> {
    match command {
        OldRootsCommand::List(args) => run_list(args),
        OldRootsCommand::Show(args) => run_show(args),
        OldRootsCommand::Mount(args) => run_mount(args),
        OldRootsCommand::Umount(args) => run_umount(args),
    }
}

fn run_list(args: ListArgs) -> Result<u8> {
    let has_path = args
        .has
        .as_deref()
        .map(crate::restore::normalized)
        .transpose()?;
    let layout = args.layout.validate()?;
    toplevel::check_device(&layout.device)?;
    let top = TopLevel::mount(&layout.device, true)?;
    let scan = scan_all(top.fd(), &layout.old_roots)?;
    let now = now();
    // What prune would keep whatever retention says: mounted, or the default subvolume.
    let in_use = protected_ids(&top, &[])?;
    let mut listed = Vec::new();
    let mounts = crate::fs::MountRoots::below(top.path());
    let spinner = args
        .size
        .then(|| crate::diff::spinner("{spinner} measuring {msg}"))
        .flatten();
    let describe = |root: &OldRoot, verdict: Listed| -> Result<ListedRoot> {
        let dir = btrfs::open_dir_at(top.fd(), OsStr::new(&layout.old_roots))?;
        let fd = btrfs::open_dir_at(dir.as_fd(), OsStr::new(&root.name))?;
        let info = btrfs::subvol_info(fd.as_fd())?;
        let has = match &has_path {
            None => None,
            Some(path) => Some(match crate::restore::find_in(fd.as_fd(), path)? {
                crate::restore::Found::At(_, st) => Has::Yes {
                    kind: crate::fs::Kind::of(&st).described(),
                },
                crate::restore::Found::Absent => Has::No,
                crate::restore::Found::Symlink(at, target) => Has::Symlink { at, target },
            }),
        };
        let size_bytes = if args.size {
            if let Some(bar) = &spinner {
                bar.set_message(root.name.clone());
            }
            let size = crate::fs::measure(dir.as_fd(), OsStr::new(&root.name), &mounts).map_err(
                |(rel, e)| {
                    anyhow::Error::new(e).context(format!(
                        "measuring {}/{}",
                        layout.old_roots,
                        rel.display()
                    ))
                },
            )?;
            Some(size.bytes)
        } else {
            None
        };
        Ok(ListedRoot {
            name: root.name.clone(),
            retired: root.retired,
            age_seconds: now.saturating_sub(root.retired),
            retired_at: readable_time(root.retired),
            created: info.otime,
            nested_subvolumes: btrfs::tree::descendants_depth_first(top.fd(), info.id)?.len(),
            verdict,
            size_bytes,
            has,
        })
    };
    let verdicts = judge(&scan.roots, args.retention, now);
    for (root, verdict) in scan.roots.iter().zip(verdicts).rev() {
        let verdict = match verdict {
            Verdict::Prune if holds_protected(&top, root.id, &in_use)? => Listed::KeptInUse,
            Verdict::KeptByCount => Listed::KeptByCount,
            Verdict::KeptByAge => Listed::KeptByAge,
            Verdict::Prune => Listed::Prune,
        };
        listed.push(describe(root, verdict)?);
    }
    for claimed in &scan.claimed {
        listed.push(describe(claimed, Listed::BeingPruned)?);
    }
    for other in &scan.other {
        listed.push(ListedRoot {
            name: other.name.clone(),
            retired: 0,
            age_seconds: 0,
            retired_at: String::new(),
            created: 0,
            nested_subvolumes: 0,
            verdict: Listed::NotRasas,
            size_bytes: None,
            has: None,
        });
    }
    if let Some(bar) = spinner {
        bar.finish_and_clear();
    }
    top.unmount()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(crate::error::exit::OK);
    }
    if listed.is_empty() {
        println!(
            "no old roots in {} on {}",
            layout.old_roots,
            layout.device.display()
        );
        return Ok(crate::error::exit::OK);
    }
    let width = listed
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(0)
        .max(18);
    let mut header = format!(
        "{:<width$} {:<23} {:>10} {:>7}",
        "NAME", "RETIRED AT", "AGE", "NESTED"
    );
    if args.size {
        header.push_str(&format!(" {:>10}", "SIZE"));
    }
    if has_path.is_some() {
        header.push_str(&format!(" {:<4}", "HAS"));
    }
    println!("{header}  RETENTION");
    for root in &listed {
        let verdict = match root.verdict {
            Listed::KeptByCount => "kept (newest)",
            Listed::KeptByAge => "kept (age)",
            Listed::KeptInUse => "kept (mounted or in use)",
            Listed::Prune => "pruned at next prune",
            Listed::BeingPruned => "being pruned (the next prune finishes it)",
            Listed::NotRasas => "not made by rasa: left alone",
        };
        let age = match root.verdict {
            Listed::NotRasas => "-".to_owned(),
            _ => human_age(root.age_seconds),
        };
        let mut line = format!(
            "{:<width$} {:<23} {:>10} {:>7}",
            root.name, root.retired_at, age, root.nested_subvolumes
        );
        if args.size {
            let size = root
                .size_bytes
                .map_or("-".to_owned(), |b| indicatif::HumanBytes(b).to_string());
            line.push_str(&format!(" {size:>10}"));
        }
        if has_path.is_some() {
            let has = match &root.has {
                Some(Has::Yes { .. }) => "yes",
                Some(Has::No) => "no",
                Some(Has::Symlink { .. }) => "link",
                None => "-",
            };
            line.push_str(&format!(" {has:<4}"));
        }
        println!("{line}  {verdict}");
    }
    for root in &listed {
        if let Some(Has::Symlink { at, target }) = &root.has {
            println!(
                "{}: {at} is a symlink to {target} there; not followed",
                root.name
            );
        }
    }
    match &has_path {
        Some(path) => {
            println!("\nrasa restore {path} [--from NAME]  # dry run; --apply to copy it back")
        }
        None => println!(
            "\nrasa restore PATH [--from NAME]      # copy a path back (dry run; --apply to copy)\n\
             rasa old-roots mount NAME            # browse one at {MOUNT_DIR}/NAME"
        ),
    }
    Ok(crate::error::exit::OK)
}

/// `YYYY-MM-DD HH:MM:SS UTC` from seconds since the epoch.
fn readable_time(secs: u64) -> String {
    let stamp = format_timestamp(secs);
    let n = stamp.len();
    format!(
        "{}-{}-{} {}:{}:{} UTC",
        &stamp[..n - 12],
        &stamp[n - 12..n - 10],
        &stamp[n - 10..n - 8],
        &stamp[n - 7..n - 5],
        &stamp[n - 5..n - 3],
        &stamp[n - 3..n - 1]
    )
}

fn run_show(args: ShowArgs) -> Result<u8> {
    crate::diff::run(crate::diff::Args {
        layout: args.layout,
        engine: crate::diff::EngineChoice::Auto,
        live_root: None,
        old_root: Some(args.name),
        manifest: args.manifest,
        ignore: args.ignore,
        long: args.long,
        json: args.json,
        nix: false,
        exit_code: false,
        // The old root's own record (written inside it by `rasa watch`) names each path's unit.
        watch_record: None,
        no_watch_record: false,
        prometheus: None,
        rollback_record: crate::rollback::record::DEFAULT_PATH.into(),
    })
}

/// A NAME of an old root rasa made: the only names `mount` takes, so that nothing but an old
/// root (no `../persist`) is ever mounted through it.
fn checked_name(name: &str) -> Result<()> {
    if parse_timestamp(name).is_none() {
        return Err(crate::error::refuse(
            format!(
                "{name:?} is not the name of an old root (they are named like 20261122T193000Z)"
            ),
            "pick a NAME from `rasa old-roots list`",
        ));
    }
    Ok(())
}

/// Is what is mounted at `point` an old root of this layout (`fs_root` `/<old_roots>/<name>`)?
fn mounted_old_root(
    point: &std::path::Path,
    old_roots: &str,
    device: Option<&std::path::Path>,
) -> Option<toplevel::MountInfo> {
    toplevel::mount_at(point).filter(|m| {
        m.fstype == "btrfs"
            && device.is_none_or(|d| {
                m.source == d || std::fs::canonicalize(d).is_ok_and(|d| d == m.source)
            })
            && m.fs_root
                .strip_prefix(&format!("/{old_roots}/"))
                .is_some_and(|name| parse_timestamp(name).is_some())
    })
}

fn run_mount(args: MountArgs) -> Result<u8> {
    use nix::mount::{mount, MsFlags};
    checked_name(&args.name)?;
    let layout = args.layout.validate()?;
    toplevel::check_device(&layout.device)?;
    let target = args.at.join(&args.name);
    if let Some(m) = mounted_old_root(&target, &layout.old_roots, Some(&layout.device)) {
        if m.fs_root == format!("/{}/{}", layout.old_roots, args.name) {
            println!("{} is already mounted at {}", args.name, target.display());
            return Ok(crate::error::exit::OK);
        }
    }
    // 0700 like the rest of /run/rasa (the watch and rollback records): browsing an old root is
    // for root, and whoever creates /run/rasa first must not make it wider.
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&args.at)
            .with_context(|| format!("creating {}", args.at.display()))?;
    }
    let created = match std::fs::create_dir(&target) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(e).with_context(|| format!("creating {}", target.display())),
    };
    // Not in a private namespace: the user browses it. Read-only, and nothing on it runs,
    // opens a device or gains privileges.
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let options = format!("subvol={}/{}", layout.old_roots, args.name);
    if let Err(e) = mount(
        Some(&layout.device),
        &target,
        Some("btrfs"),
        flags,
        Some(options.as_str()),
    ) {
        if created {
            let _ = std::fs::remove_dir(&target);
        }
        return Err(crate::error::refuse(
            format!(
                "cannot mount the old root {} ({options}) of {}: {e}",
                args.name,
                layout.device.display()
            ),
            "pick a NAME from `rasa old-roots list` (and the --device and --old-roots it used)",
        ));
    }
    // What got mounted is that subvolume, and it is one.
    let mounted = toplevel::mount_at(&target);
    if mounted.as_ref().map(|m| m.fs_root.as_str())
        != Some(format!("/{}/{}", layout.old_roots, args.name).as_str())
    {
        let _ = nix::mount::umount2(&target, nix::mount::MntFlags::empty());
        anyhow::bail!(
            "mounting {options} put something else at {}; unmounted it again",
            target.display()
        );
    }
    println!(
        "mounted old root {} read-only at {}
  rasa restore PATH --from {}   # copy something back
  rasa old-roots umount {}       # when done",
        args.name,
        target.display(),
        args.name,
        args.name
    );
    Ok(crate::error::exit::OK)
}

fn run_umount(args: UmountArgs) -> Result<u8> {
    let targets: Vec<std::path::PathBuf> = match &args.name {
        Some(name) => {
            checked_name(name)?;
            let target = args.at.join(name);
            if mounted_old_root(&target, &args.old_roots, args.device.as_deref()).is_none() {
                return Err(crate::error::refuse(
                    format!("no old root is mounted at {}", target.display()),
                    "see `findmnt -R /run/rasa/old-roots` for what is mounted",
                ));
            }
            vec![target]
        }
        None => {
            let mut points: Vec<_> = toplevel::mounts()
                .into_iter()
                .map(|m| m.mount_point)
                .filter(|p| p.parent() == Some(args.at.as_path()))
                .filter(|p| mounted_old_root(p, &args.old_roots, args.device.as_deref()).is_some())
                .collect();
            points.dedup();
            points
        }
    };
    for target in &targets {
        // A point mounted more than once (two `mount`s raced) is unmounted until it is free.
        while mounted_old_root(target, &args.old_roots, args.device.as_deref()).is_some() {
            nix::mount::umount2(target, nix::mount::MntFlags::empty()).map_err(|e| {
                let why = if e == nix::errno::Errno::EBUSY {
                    ": a shell or program is using it (cd out of it, close what is open there)"
                } else {
                    ""
                };
                anyhow::anyhow!("unmounting {}: {e}{why}", target.display())
            })?;
        }
        let _ = std::fs::remove_dir(target);
        println!("unmounted {}", target.display());
    }
    if targets.is_empty() {
        println!("no old root is mounted in {}", args.at.display());
    }
    Ok(crate::error::exit::OK)
}

pub fn human_age(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        7200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// The refusal for an old root `name` that is not among `known`: names the ones there are, and
/// how to pick (`fix`, which each command words for itself).
pub fn unknown_old_root(
    name: &str,
    layout: &crate::layout::Layout,
    known: &[OldRoot],
    fix: &str,
) -> anyhow::Error {
    let names: Vec<&str> = known.iter().rev().map(|r| r.name.as_str()).collect();
    crate::error::refuse(
        format!(
            "there is no old root {name:?} in {} on {}{}",
            layout.old_roots,
            layout.device.display(),
            if names.is_empty() {
                " (it holds none)".to_owned()
            } else {
                format!(" (it holds: {})", names.join(", "))
            }
        ),
        fix,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        for secs in [
            0u64,
            951_782_400,
            1_700_000_000,
            1_798_000_000,
            4_102_444_799,
        ] {
            let name = format_timestamp(secs);
            assert_eq!(parse_timestamp(&name), Some(secs), "{name}");
        }
        expect_test::expect!["20261122T193000Z"].assert_eq(&format_timestamp(1_795_375_800));
    }

    #[test]
    fn rejects_names_that_are_not_timestamps() {
        for name in [
            "",
            "20261122T193000",
            "2026-11-22T19:30:00Z",
            "20261322T193000Z",
            "20260230T000000Z",
            "x0261122T193000Z",
        ] {
            assert_eq!(parse_timestamp(name), None, "{name}");
        }
    }

    fn roots_at(times: &[u64]) -> Vec<OldRoot> {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| OldRoot {
                name: format_timestamp(*t),
                retired: *t,
                order: (10 + i as u64, 1),
                id: 256 + i as u64,
            })
            .collect()
    }

    #[test]
    fn names_from_any_clock_parse_back() {
        // Year 9999's last second, and what a clock past it makes: the parser reads them all.
        for secs in [253_402_300_799u64, 253_402_300_800, 10_000_000_000_000] {
            let name = format_timestamp(secs);
            assert_eq!(parse_timestamp(&name), Some(secs), "{name}");
        }
        expect_test::expect!["100000101T000000Z"].assert_eq(&format_timestamp(253_402_300_800));
        // Leading zeros beyond four year digits are not a name rasa makes.
        assert_eq!(parse_timestamp("020261122T193000Z"), None);
    }

    #[test]
    fn next_name_is_the_clock_and_only_steps_past_taken_names() {
        let scan = Scan {
            roots: roots_at(&[2_000_000_000]),
            ..Scan::default()
        };
        // Behind the newest: the clock's own name (order comes from the transids), with a warning.
        assert_eq!(next_name(&scan, 1_000), (format_timestamp(1_000), true));
        // Taken: one second on.
        assert_eq!(
            next_name(&scan, 2_000_000_000),
            (format_timestamp(2_000_000_001), false)
        );
        assert_eq!(next_name(&Scan::default(), 5), (format_timestamp(5), false));
        // A boot in the year 9999 does not drag every later name after it.
        let poisoned = Scan {
            roots: roots_at(&[253_402_300_799]),
            ..Scan::default()
        };
        assert_eq!(
            next_name(&poisoned, 1_800_000_000).0,
            format_timestamp(1_800_000_000)
        );
    }

    #[test]
    fn a_clock_behind_keeps_more_never_fewer() {
        let day = 86_400;
        let now = 1_800_000_000;
        use Verdict::*;
        let age_only = RetentionArgs {
            keep: 0,
            keep_days: 7,
        };
        // The second root was retired by a boot with a dead clock (1970): it counts as retired
        // when the next root was, or now while it is the newest.
        let roots = roots_at(&[now - 30 * day, 0]);
        assert_eq!(judge(&roots, age_only, now), vec![Prune, KeptByAge]);
        let roots = roots_at(&[now - 30 * day, 0, now - 2 * day]);
        assert_eq!(
            judge(&roots, age_only, now),
            vec![Prune, KeptByAge, KeptByAge]
        );
        let roots = roots_at(&[now - 30 * day, 0, now - 9 * day]);
        assert_eq!(judge(&roots, age_only, now), vec![Prune, Prune, Prune]);
    }

    #[test]
    fn a_future_clock_does_not_freeze_age_retention() {
        let day = 86_400;
        let now = 1_800_000_000;
        use Verdict::*;
        let retention = RetentionArgs {
            keep: 1,
            keep_days: 7,
        };
        // Retired in order: one at year 9999, then three with a correct clock, 30, 20 and 1
        // days ago. The 9999 one is older than the root retired 30 days ago: it goes.
        let roots = roots_at(&[253_402_300_799, now - 30 * day, now - 20 * day, now - day]);
        assert_eq!(
            judge(&roots, retention, now),
            vec![Prune, Prune, Prune, KeptByCount]
        );
        // While it is the newest it is kept (by count here, and its age is clamped to now).
        let roots = roots_at(&[now - 30 * day, 253_402_300_799]);
        assert_eq!(judge(&roots, retention, now), vec![Prune, KeptByCount]);
        let none = RetentionArgs {
            keep: 0,
            keep_days: 7,
        };
        assert_eq!(judge(&roots, none, now), vec![Prune, KeptByAge]);
    }

    #[test]
    fn retention_keeps_newest_by_count_and_young_by_age() {
        let day = 86_400;
        let now = 100 * day;
        let roots = roots_at(&[90 * day, 95 * day, 97 * day, 98 * day, 99 * day]);
        let judge_with = |keep, keep_days| judge(&roots, RetentionArgs { keep, keep_days }, now);
        use Verdict::*;
        assert_eq!(
            judge_with(2, 0),
            vec![Prune, Prune, Prune, KeptByCount, KeptByCount]
        );
        assert_eq!(
            judge_with(1, 4),
            vec![Prune, Prune, KeptByAge, KeptByAge, KeptByCount]
        );
        assert_eq!(judge_with(0, 0), vec![Prune; 5]);
        assert_eq!(judge_with(9, 0), vec![KeptByCount; 5]);
        // A clock far behind makes every root look young: age keeps them all.
        assert_eq!(
            judge(
                &roots,
                RetentionArgs {
                    keep: 0,
                    keep_days: 1
                },
                0
            ),
            vec![KeptByAge; 5]
        );
    }
}
