//! Previous roots: how they are named, listed, and pruned.
//!
//! Each boot's retired root becomes `<old-roots>/<YYYYMMDDTHHMMSSZ>`, a subvolume in a plain
//! directory at the top level (a directory, not a subvolume, because a subvolume can only be
//! renamed within its parent subvolume). Names sort in retirement order even when the initrd's
//! clock is wrong: a new name is never lower than the newest existing one (see [`next_name`]).
//! Only names of that shape are ever pruned; anything else a user puts there is left alone.

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
pub const PRUNING_PREFIX: &str = ".pruning-";

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OldRoot {
    pub name: String,
    /// Seconds since the epoch at retirement, from the name.
    pub retired: u64,
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

/// `YYYYMMDDTHHMMSSZ` → seconds since the epoch.
pub fn parse_timestamp(name: &str) -> Option<u64> {
    let b = name.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = std::str::from_utf8(&b[r]).ok()?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (y, mo, d) = (digits(0..4)?, digits(4..6)?, digits(6..8)?);
    let (h, mi, s) = (digits(9..11)?, digits(11..13)?, digits(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let days = days_from_civil(y, mo as u32, d as u32);
    let secs = days * 86_400 + h * 3600 + mi * 60 + s;
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
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The name for a root retired at `now`: the timestamp, or one second after the newest
/// existing name when the clock is behind it (an initrd without RTC, a dead CMOS battery), so
/// names stay unique and in retirement order.
pub fn next_name(existing: &[OldRoot], now: u64) -> (String, bool) {
    let newest = existing.iter().map(|r| r.retired).max();
    match newest {
        Some(newest) if now <= newest => (format_timestamp(newest + 1), true),
        _ => (format_timestamp(now), false),
    }
}

/// The old roots in the directory, oldest first. A missing directory holds none.
pub fn scan(top: BorrowedFd<'_>, dir_name: &str) -> Result<Vec<OldRoot>> {
    let dir = match btrfs::open_dir_at(top, OsStr::new(dir_name)) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("opening {dir_name}")),
    };
    let mut roots = Vec::new();
    for entry in nix::dir::Dir::from_fd(dir)
        .with_context(|| format!("reading {dir_name}"))?
        .iter()
    {
        let entry = entry.with_context(|| format!("reading {dir_name}"))?;
        let Ok(name) = entry.file_name().to_str() else {
            continue;
        };
        if let Some(retired) = parse_timestamp(name) {
            roots.push(OldRoot {
                name: name.to_owned(),
                retired,
            });
        }
    }
    roots.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(roots)
}

/// Names of old roots claimed by an interrupted prune.
fn scan_claimed(top: BorrowedFd<'_>, dir_name: &str) -> Result<Vec<String>> {
    let dir = match btrfs::open_dir_at(top, OsStr::new(dir_name)) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("opening {dir_name}")),
    };
    let mut claimed = Vec::new();
    for entry in nix::dir::Dir::from_fd(dir)?.iter() {
        let entry = entry?;
        if let Some(name) = entry
            .file_name()
            .to_str()
            .ok()
            .filter(|n| n.starts_with(PRUNING_PREFIX))
        {
            claimed.push(name.to_owned());
        }
    }
    claimed.sort();
    Ok(claimed)
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

/// Retention: the newest `keep` always stay, and so does every root younger than `keep_days`.
/// A clock that runs behind only makes roots look younger, so it can keep more, never fewer.
pub fn judge(roots: &[OldRoot], retention: RetentionArgs, now: u64) -> Vec<Verdict> {
    let n = roots.len();
    roots
        .iter()
        .enumerate()
        .map(|(i, root)| {
            let rank_from_newest = n - 1 - i;
            if rank_from_newest < retention.keep as usize {
                Verdict::KeptByCount
            } else if now.saturating_sub(root.retired) < u64::from(retention.keep_days) * 86_400 {
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

/// Ids of the subvolumes pruning must never delete.
pub fn protected_ids(top: &TopLevel, names: &[&str]) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    for name in names {
        if let Ok(fd) = btrfs::open_dir_at(top.fd(), OsStr::new(name)) {
            if top.is_subvolume(OsStr::new(name))? {
                ids.push(btrfs::subvol_info(fd.as_fd())?.id);
            }
        }
    }
    Ok(ids)
}

#[derive(Debug, Serialize)]
pub struct PruneReport {
    pub kept: Vec<String>,
    pub pruned: Vec<String>,
    pub subvolumes_deleted: usize,
    pub dry_run: bool,
}

/// Apply retention. First finish any prune a crash interrupted, then claim each doomed root by
/// renaming it to `.pruning-<name>` (atomic; a crash leaves it claimed, never half-kept), then
/// delete its tree.
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
        subvolumes_deleted: 0,
        dry_run,
    };

    for claimed in scan_claimed(top.fd(), dir_name)? {
        log::info(format!(
            "finishing an interrupted prune of {dir_name}/{claimed}"
        ));
        if !dry_run {
            report.subvolumes_deleted += delete_tree(top, dir_name, &claimed, &protected)?;
        }
        report
            .pruned
            .push(claimed.trim_start_matches(PRUNING_PREFIX).to_owned());
    }

    let roots = scan(top.fd(), dir_name)?;
    let verdicts = judge(&roots, retention, now());
    for (root, verdict) in roots.iter().zip(verdicts) {
        if verdict != Verdict::Prune {
            report.kept.push(root.name.clone());
            continue;
        }
        report.pruned.push(root.name.clone());
        if dry_run {
            log::info(format!("would prune {dir_name}/{}", root.name));
            continue;
        }
        let claimed = format!("{PRUNING_PREFIX}{}", root.name);
        let dir = btrfs::open_dir_at(top.fd(), OsStr::new(dir_name))?;
        nix::fcntl::renameat2(
            dir.as_fd(),
            root.name.as_str(),
            dir.as_fd(),
            claimed.as_str(),
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .with_context(|| format!("claiming {dir_name}/{} for pruning", root.name))?;
        failpoint::hit("prune-claimed");
        let deleted = delete_tree(top, dir_name, &claimed, &protected)?;
        report.subvolumes_deleted += deleted;
        log::info(format!(
            "pruned {dir_name}/{} ({deleted} subvolume{})",
            root.name,
            if deleted == 1 { "" } else { "s" }
        ));
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
            report.kept.len()
        );
    }
    Ok(crate::error::exit::OK)
}

#[derive(clap::Subcommand, Debug)]
pub enum OldRootsCommand {
    /// List the kept previous roots, newest first, with their age and retention verdict.
    #[command(after_help = "\
Examples:
  rasa old-roots list
  rasa old-roots list --device /dev/mapper/cryptroot --json

To get a file back from an old root:
  mount -o subvolid=5 /dev/mapper/cryptroot /mnt
  cp -a /mnt/old_roots/20261122T193000Z/etc/something /etc/something
  umount /mnt")]
    List(ListArgs),
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub layout: LayoutArgs,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Print the list as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct ListedRoot {
    name: String,
    retired: u64,
    age_seconds: u64,
    created: u64,
    nested_subvolumes: usize,
    verdict: Verdict,
}

pub fn run_old_roots(command: OldRootsCommand) -> Result<u8> {
    let OldRootsCommand::List(args) = command;
    let layout = args.layout.validate()?;
    toplevel::check_device(&layout.device)?;
    let top = TopLevel::mount(&layout.device, true)?;
    let roots = scan(top.fd(), &layout.old_roots)?;
    let now = now();
    let verdicts = judge(&roots, args.retention, now);
    let dir = btrfs::open_dir_at(top.fd(), OsStr::new(&layout.old_roots)).ok();
    let mut listed = Vec::new();
    for (root, verdict) in roots.iter().zip(verdicts).rev() {
        let (created, nested) = match dir
            .as_ref()
            .and_then(|d| btrfs::open_dir_at(d.as_fd(), OsStr::new(&root.name)).ok())
        {
            Some(fd) => {
                let info = btrfs::subvol_info(fd.as_fd())?;
                (
                    info.otime,
                    btrfs::tree::descendants_depth_first(top.fd(), info.id)?.len(),
                )
            }
            None => (0, 0),
        };
        listed.push(ListedRoot {
            name: root.name.clone(),
            retired: root.retired,
            age_seconds: now.saturating_sub(root.retired),
            created,
            nested_subvolumes: nested,
            verdict,
        });
    }
    drop(dir);
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
    println!(
        "{:<18} {:>10} {:>7}  RETENTION",
        "NAME", "RETIRED", "NESTED"
    );
    for root in &listed {
        let verdict = match root.verdict {
            Verdict::KeptByCount => "kept (newest)",
            Verdict::KeptByAge => "kept (age)",
            Verdict::Prune => "pruned at next prune",
        };
        println!(
            "{:<18} {:>10} {:>7}  {}",
            root.name,
            human_age(root.age_seconds),
            root.nested_subvolumes,
            verdict
        );
    }
    println!(
        "\nmount -o subvolid=5 {} /mnt  # then copy from /mnt/{}/<NAME>/...",
        layout.device.display(),
        layout.old_roots
    );
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

    #[test]
    fn next_name_stays_monotonic_when_the_clock_is_behind() {
        let existing = vec![OldRoot {
            name: format_timestamp(2_000_000_000),
            retired: 2_000_000_000,
        }];
        assert_eq!(
            next_name(&existing, 1_000),
            (format_timestamp(2_000_000_001), true)
        );
        assert_eq!(
            next_name(&existing, 2_000_000_000),
            (format_timestamp(2_000_000_001), true)
        );
        assert_eq!(
            next_name(&existing, 2_000_000_500),
            (format_timestamp(2_000_000_500), false)
        );
        assert_eq!(next_name(&[], 5), (format_timestamp(5), false));
    }

    #[test]
    fn retention_keeps_newest_by_count_and_young_by_age() {
        let day = 86_400;
        let now = 100 * day;
        let roots: Vec<OldRoot> = [90, 95, 97, 98, 99]
            .iter()
            .map(|d| OldRoot {
                name: format_timestamp(d * day),
                retired: d * day,
            })
            .collect();
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
