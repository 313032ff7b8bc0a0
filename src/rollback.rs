//! `rasa rollback`: give the next boot a blank root, keep the previous one.
//!
//! The order of the steps is the whole point. Each step is a single atomic btrfs operation
//! (a snapshot, or a rename within the top-level subvolume), btrfs commits them in order, and
//! so a power cut leaves the disk exactly after some step. For every such point the next run
//! knows what to do, and at no point is there neither a bootable root nor the previous one:
//!
//! | disk after          | `root`   | `root.rasa-new` | previous root      | next run does        |
//! |---------------------|----------|-----------------|--------------------|----------------------|
//! | (nothing yet)       | previous | -               | = root             | everything           |
//! | 1. create new       | previous | fresh           | = root             | discards new, again  |
//! | 2. move root aside  | -        | fresh           | old_roots/<stamp>  | step 3 only          |
//! | 3. install new      | fresh    | -               | old_roots/<stamp>  | (done)               |
//!
//! Before step 1, a stale `root.rasa-new` (a name only rasa creates, the rules reserve, and
//! nothing ever mounts) is discarded, nested subvolumes first, read-only flags cleared: a crash
//! half-way leaves `root` untouched. Nothing else is deleted on the boot's critical path.
//!
//! With `root` gone and a `root.rasa-new` that is not one rasa would install (read-only, or with
//! nested subvolumes): `Plan::Remake`, in the other order, so that there is always a root:
//!
//! | disk after            | `root` | `root.rasa-new`  | next run does                                  |
//! |-----------------------|--------|------------------|------------------------------------------------|
//! | (nothing yet)         | -      | stray            | everything                                     |
//! | R1. make root         | fresh  | stray            | discards the stray, then a full run (the fresh |
//! | (during the discard)  | fresh  | part of a stray  | root, never booted, is kept as an old root)    |
//! | R2. stray discarded   | fresh  | -                | (done)                                         |
//!
//! Before anything, with the top level locked against every other rasa (see
//! `TopLevel::lock`), `inspect` refuses (exit 3, nothing changed) what no rerun could complete:
//! a root that is mounted (a running system), the filesystem's default subvolume, or
//! read-only; a `root.rasa-new` that is not a subvolume; `/nix` or `/boot` inside the root,
//! which the blank root would lack. Pruning old roots is separate (`rasa prune`, run from
//! a stage-2 service) because deleting a root that holds thousands of nested subvolumes takes
//! time proportional to that tree, and the boot should not wait for it.
//!
//! ## Booting an old root once
//!
//! `--from-old-root [NAME]` (the kernel parameter `rasa.boot-old-root[=NAME]` from the boot
//! menu; without a name, the newest old root) runs the same three steps with another source for
//! step 1: a writable snapshot of `<old-roots>/NAME` instead of the blank. The old root itself
//! is not touched (a snapshot, not a rename), so it stays recoverable and retention still counts
//! it; the current root is retired under a new name as usual. The crash points, for a next run
//! in either mode (the normal reset, or booting an old root again):
//!
//! | disk after          | `root`   | `root.rasa-new` | `<old-roots>/NAME` | next run does (either mode)           |
//! |---------------------|----------|-----------------|--------------------|---------------------------------------|
//! | (nothing yet)       | current  | -               | as it was          | everything                            |
//! | 1. snapshot NAME    | current  | copy of NAME    | as it was          | discards new (never booted), again    |
//! | 2. move root aside  | -        | copy of NAME    | as it was          | step 3 only: installs the copy        |
//! | 3. install new      | copy     | -               | as it was          | (done)                                |
//!
//! After step 2 a next run cannot tell which source the waiting `root.rasa-new` came from, and
//! need not: it was never booted, it is writable and has no nested subvolumes (a snapshot stops
//! at them), so `InstallOnly` finishes whichever run was interrupted. Asked to boot an old root
//! in that state, rasa finishes the interrupted run and says so (boot the entry again for the
//! old root) rather than discard the only root-to-be, which would leave a moment with no root.
//! An unknown NAME (or no old root at all) is a refusal that changes nothing: the unit fails,
//! and the boot goes on with the current root as it is, not reset, which is bootable and loses
//! nothing; the message lists the old roots there are.

pub mod record;

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use nix::fcntl::{renameat2, RenameFlags};
use nix::sys::stat::{fstatat, mkdirat, Mode};

use crate::btrfs;
use crate::error::{self, exit, refuse};
use crate::failpoint;
use crate::hibernation::{self, Verdict};
use crate::layout::{Layout, LayoutArgs, RetentionArgs};
use crate::log;
use crate::old_roots;
use crate::rules;
use crate::toplevel::{self, TopLevel};

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  # In the systemd initrd, before sysroot.mount (what the NixOS module runs):
  rasa rollback --device /dev/mapper/cryptroot --root root --blank root-blank

  # Start from a new empty subvolume instead of a blank snapshot:
  rasa rollback --device /dev/mapper/cryptroot --empty

  # See what would happen, change nothing:
  rasa rollback --device /dev/mapper/cryptroot --dry-run

  # Boot yesterday's system once: a writable snapshot of the newest old root becomes the root
  # (the kernel parameter rasa.boot-old-root[=NAME] does this from the boot menu):
  rasa rollback --device /dev/mapper/cryptroot --from-old-root
  rasa rollback --device /dev/mapper/cryptroot --from-old-root 20260101T120000Z

The previous root is kept as <old-roots>/<YYYYMMDDTHHMMSSZ>. Old roots past retention are
deleted by `rasa prune` after boot, or here with --prune.")]
pub struct RollbackArgs {
    #[command(flatten)]
    pub layout: LayoutArgs,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Also prune old roots past retention now, after the new root is in place. This puts the
    /// deletion on the boot's critical path; prefer `rasa prune` from a stage-2 service.
    #[arg(long)]
    pub prune: bool,
    /// Inspect and print the plan; change nothing (the top level is mounted read-only).
    #[arg(long)]
    pub dry_run: bool,
    /// Reset the root even when a hibernation image is waiting to be resumed (which then can no
    /// longer resume safely). The kernel parameter `rasa.ignore-hibernation` does the same from
    /// the boot menu; `noresume` discards the image and so lets the reset go on as well.
    #[arg(long)]
    pub ignore_hibernation: bool,
    /// Instead of the blank, put a writable snapshot of the old root NAME (the newest without a
    /// name) in place as the root; the old root stays as it is, the current one is retired as
    /// usual. Without this flag, the kernel parameter `rasa.boot-old-root[=NAME]` asks the same.
    #[arg(long, value_name = "NAME", num_args = 0..=1)]
    pub from_old_root: Option<Option<String>>,
    /// Record the outcome (result, duration, the old root's name) here as JSON, for `rasa diff
    /// --prometheus`, on every run but a dry run, refusals and failures included. /run survives
    /// the initrd's switch to the real root. A write error is only a warning.
    #[arg(long, value_name = "PATH", env = record::ENV, default_value = record::DEFAULT_PATH)]
    pub record_file: PathBuf,
}

#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// The usual case: make a new root, retire the current one, install the new one.
    Full { discard_stale_new: bool },
    /// A previous run retired the root but stopped before installing the new one.
    InstallOnly,
    /// The root is gone, and the `root.rasa-new` left is not one rasa would install (read-only,
    /// or holding nested subvolumes, which a snapshot of the blank never does): discard it,
    /// make a new one and install that.
    Remake,
    /// Boot an old root once: the steps of `Full`, with a writable snapshot of
    /// `<old-roots>/<source>` as the new root instead of the blank.
    FromOldRoot {
        source: String,
        discard_stale_new: bool,
    },
}

/// The old root asked for: `Some(None)` for the newest, `Some(Some(name))` for one by name.
/// The flag wins; without it, the kernel parameter `rasa.boot-old-root[=NAME]` (the boot-menu
/// entry), whose empty value also means the newest.
fn old_root_request(flag: &Option<Option<String>>, cmdline: &str) -> Option<Option<String>> {
    if flag.is_some() {
        return flag.clone();
    }
    cmdline.split_whitespace().find_map(|arg| {
        if arg == "rasa.boot-old-root" {
            Some(None)
        } else {
            arg.strip_prefix("rasa.boot-old-root=")
                .map(|name| (!name.is_empty()).then(|| name.to_owned()))
        }
    })
}

/// What a run did, for the record.
struct Done {
    outcome: record::Outcome,
    old_root: Option<String>,
    message: String,
}

/// Run, then record the outcome (every outcome, refusals and failures included; a dry run
/// changes nothing and records nothing, so the record keeps saying what the boot did).
pub fn run(args: RollbackArgs) -> Result<u8> {
    let started = Instant::now();
    let record_file = args.record_file.clone();
    let dry_run = args.dry_run;
    let result = run_steps(args, started);
    if !dry_run {
        let done = match &result {
            Ok(done) => record::Record::new(
                done.outcome,
                started.elapsed(),
                done.old_root.clone(),
                done.message.clone(),
            ),
            Err(e) => record::Record::new(
                if error::exit_code_for(e) == exit::REFUSED {
                    record::Outcome::Refused
                } else {
                    record::Outcome::Failed
                },
                started.elapsed(),
                None,
                format!("{e:#}"),
            ),
        };
        if let Err(e) = done.write(&record_file) {
            // The root is what it is either way; a missing record only blinds the fleet view.
            log::warn(format!("could not record the outcome: {e:#}"));
        }
    }
    result.map(|_| exit::OK)
}

fn run_steps(args: RollbackArgs, started: Instant) -> Result<Done> {
    let layout = args.layout.validate()?;
    toplevel::check_device(&layout.device)?;
    if let Some(why) = kept_for_resume(&args) {
        // Not a failure: the boot goes on with the root the hibernated system left, which is
        // what a resume needs; the next boot without an image resets it as usual.
        log::warn(format!(
            "{why}; the root is kept as it is (nothing reset) so that the hibernated system can \
             still resume. To reset it anyway, boot with `noresume` (which throws the image \
             away) or `rasa.ignore-hibernation`"
        ));
        if args.dry_run {
            println!("dry run: nothing will be changed. rasa rollback would keep the root: {why}");
        }
        return Ok(Done {
            outcome: record::Outcome::KeptForResume,
            old_root: None,
            message: why,
        });
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let request = old_root_request(&args.from_old_root, &cmdline);
    let top = TopLevel::mount(&layout.device, args.dry_run)?;
    let plan = inspect(&top, &layout, request.as_ref())?;
    if args.dry_run {
        print_plan(&top, &layout, &plan)?;
        top.unmount()?;
        return Ok(Done {
            outcome: record::Outcome::Reset,
            old_root: None,
            message: "dry run".into(),
        });
    }
    let old_root = execute(&top, &layout, &plan)?;
    let critical = started.elapsed();
    log::info(format!(
        "new root in place in {:.1} ms",
        critical.as_secs_f64() * 1e3
    ));
    if args.prune {
        let report = old_roots::prune(&top, &layout, args.retention, false)?;
        log::info(format!(
            "pruned {} old root(s), kept {}",
            report.pruned.len(),
            report.kept.len() + report.in_use.len()
        ));
        for failure in &report.failed {
            // The new root is in place; a root prune could not delete is retried next time.
            log::warn(format!(
                "could not prune {}: {}",
                failure.name, failure.error
            ));
        }
    }
    top.unmount()?;
    let (outcome, installed) = match &plan {
        Plan::FromOldRoot { source, .. } => (
            record::Outcome::BootedOldRoot,
            format!("a snapshot of the old root {}/{source}", layout.old_roots),
        ),
        Plan::Full { .. } | Plan::InstallOnly | Plan::Remake => (
            record::Outcome::Reset,
            match &layout.blank {
                Some(blank) => format!("a snapshot of {blank}"),
                None => "a new empty subvolume".into(),
            },
        ),
    };
    let message = match &old_root {
        Some(name) => format!(
            "the root is {installed}; the previous root is kept as {}/{name}",
            layout.old_roots
        ),
        None if plan == Plan::InstallOnly => format!(
            "the root is the one an interrupted run prepared; that run kept the previous root in {}",
            layout.old_roots
        ),
        None => format!("the root was gone and is now {installed}"),
    };
    Ok(Done {
        outcome,
        old_root,
        message,
    })
}

/// Why this boot must not reset the root: a hibernation image waits to be resumed (or a resume
/// location is configured and cannot be read, so rasa cannot tell).
fn kept_for_resume(args: &RollbackArgs) -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if args.ignore_hibernation
        || cmdline
            .split_whitespace()
            .any(|arg| arg == "rasa.ignore-hibernation")
    {
        return None;
    }
    match hibernation::inspect_this_machine() {
        Verdict::ImagePresent(at, signature) => Some(format!(
            "a hibernation image ({signature}) is waiting on {} ({})",
            at.device.display(),
            at.named_by
        )),
        Verdict::Unreadable(at, why) => Some(format!(
            "a resume location is configured ({}) but {why}, so rasa cannot tell whether a \
             hibernated system is waiting on it",
            at.named_by
        )),
        Verdict::NoResumeConfigured | Verdict::ResumeDisabled | Verdict::NoImage(_) => None,
    }
}

/// Look at the top level and decide; refuse (changing nothing) when the layout is not one rasa
/// can act on safely.
fn inspect(top: &TopLevel, layout: &Layout, request: Option<&Option<String>>) -> Result<Plan> {
    let dev = layout.device.display();
    let root = layout.root.as_str();
    let new = layout.new_root_name();

    if let Some(blank) = &layout.blank {
        if !top.is_subvolume(OsStr::new(blank))? {
            return Err(refuse(
                format!("the blank subvolume {blank:?} does not exist at the top level of {dev} (found: {})", top_level_listing(top)),
                format!("create it once with `btrfs subvolume create <top>/{blank} && btrfs property set <top>/{blank} ro true` (or `rasa setup`), pass the right name with --blank, or use --empty"),
            ));
        }
        let fd = btrfs::open_dir_at(top.fd(), OsStr::new(blank))?;
        if !btrfs::is_readonly(fd.as_fd())? {
            return Err(refuse(
                format!("the blank subvolume {blank:?} is writable, so what each boot starts from could drift"),
                format!("make it read-only: `btrfs property set <top>/{blank} ro true`"),
            ));
        }
    }

    match fstatat(top.fd(), layout.old_roots.as_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if st.st_mode & nix::libc::S_IFMT != nix::libc::S_IFDIR => {
            return Err(refuse(
                format!("{:?} at the top level is not a directory", layout.old_roots),
                "move it away, or pass another name with --old-roots",
            ))
        }
        Ok(st) if st.st_ino == btrfs::FIRST_FREE_OBJECTID => {
            return Err(refuse(
                format!("{:?} is a subvolume; the old roots must live in a plain directory, because a subvolume can only be renamed within its parent", layout.old_roots),
                format!("rename it and let rasa create {:?} as a directory, or pass another name with --old-roots", layout.old_roots),
            ))
        }
        Ok(_) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e).context("inspecting the old-roots directory"),
    }

    let root_is_subvol = top.is_subvolume(OsStr::new(root))?;
    let root_exists =
        root_is_subvol || fstatat(top.fd(), root, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).is_ok();
    if root_exists && !root_is_subvol {
        return Err(refuse(
            format!("{root:?} at the top level of {dev} is not a subvolume"),
            "pass the name of the root subvolume with --root (the subvol= option of /)",
        ));
    }

    // `root.rasa-new` is rasa's own name (the rules reserve it), but what is there now may not
    // be what rasa left: a snapshot into it would fail with EEXIST at every boot.
    let new_present = match fstatat(
        top.fd(),
        new.as_str(),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Err(nix::errno::Errno::ENOENT) => false,
        Err(e) => return Err(e).with_context(|| format!("inspecting {new}")),
        Ok(_) if top.is_subvolume(OsStr::new(&new))? => true,
        Ok(st) => {
            let kind = if st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFDIR {
                "a plain directory"
            } else {
                "not a directory"
            };
            return Err(refuse(
                format!("{new:?} at the top level of {dev} is {kind}, not a subvolume; rasa reserves that name for the root it prepares, and did not make this"),
                format!("look inside, then move it away (`mv <top>/{new} <top>/{new}.moved`) or delete it; the next rollback then goes ahead"),
            ));
        }
    };
    let new_is_rasas = new_present && {
        let fd = btrfs::open_dir_at(top.fd(), OsStr::new(&new))?;
        let info = btrfs::subvol_info(fd.as_fd())?;
        !btrfs::is_readonly(fd.as_fd())?
            && btrfs::tree::child_subvolumes(top.fd(), info.id)?.is_empty()
    };

    if !root_is_subvol {
        if new_present && request.is_some() {
            log::warn(format!(
                "an interrupted run left {root} gone and {new} in its place; finishing that run \
                 instead of booting an old root (discarding {new} first would leave a moment with \
                 no root): boot with rasa.boot-old-root again for the old root"
            ));
        }
        return match (new_present, new_is_rasas) {
            (true, true) => Ok(Plan::InstallOnly),
            (true, false) => Ok(Plan::Remake),
            (false, _) => Err(refuse(
                format!(
                    "the root subvolume {root:?} does not exist at the top level of {dev} (found: {})",
                    top_level_listing(top)
                ),
                "pass the name of the root subvolume with --root (the subvol= option of /)",
            )),
        };
    }

    let root_fd = btrfs::open_dir_at(top.fd(), OsStr::new(root))?;
    let root_id = btrfs::subvol_info(root_fd.as_fd())?.id;
    if let Some((_, at)) = top
        .mounted_subvolumes()
        .into_iter()
        .find(|(id, _)| *id == root_id)
    {
        return Err(refuse(
            format!("the root subvolume {root:?} is mounted at {}: this is a running system (or the initrd after sysroot.mount), and retiring the root it runs on would leave it writing into an old root that prune later deletes", at.display()),
            "rasa rollback runs in the initrd before / is mounted (the NixOS module's rasa-rollback.service); to start from a blank root, reboot",
        ));
    }
    if top.default_subvolume()? == root_id {
        return Err(refuse(
            format!("the root subvolume {root:?} is the filesystem's default subvolume (what a mount without subvol= gets): after a rollback that default would be the retired root, and a boot that relies on it would keep booting the old state until prune deletes it"),
            format!("mount / with subvol={root} explicitly (NixOS: fileSystems.\"/\".options), then reset the default: `btrfs subvolume set-default 5 <top>`"),
        ));
    }
    if btrfs::is_readonly(root_fd.as_fd())? {
        return Err(refuse(
            format!("the root subvolume {root:?} is read-only, so it cannot be moved into {}", layout.old_roots),
            format!("make it writable (`btrfs property set <top>/{root} ro false`), or pass the right name with --root"),
        ));
    }
    let source = match request {
        Some(name) => Some(find_old_root(top, layout, name.as_deref())?),
        None => None,
    };
    // What the new root starts from: /nix or /boot in the current root is lost with it unless
    // the new root has them too.
    let mut lost = rules::boot_dirs_inside(root_fd.as_fd())?;
    let start = match &source {
        Some(name) => Some(format!("{}/{name}", layout.old_roots)),
        None => layout.blank.clone(),
    };
    if let Some(start) = &start {
        let start_fd = btrfs::open_dir_at(top.fd(), OsStr::new(start))?;
        let kept = rules::boot_dirs_inside(start_fd.as_fd())?;
        lost.retain(|d| !kept.contains(d));
    }
    if let Some(dir) = lost.first() {
        return Err(refuse(
            format!("/{dir} is part of the root subvolume {root:?} (a directory or a nested subvolume), not a subvolume of its own at the top level: it would be retired with the root, the blank root would have no /{dir}{}, and the machine could not boot", if *dir == "nix" { " (no /nix/store)" } else { " (no kernels)" }),
            format!("move /{dir} into a subvolume of its own at the top level, mounted at /{dir} (docs/guide.md), and boot once with it before enabling rollback"),
        ));
    }
    Ok(match source {
        Some(source) => Plan::FromOldRoot {
            source,
            discard_stale_new: new_present,
        },
        None => Plan::Full {
            discard_stale_new: new_present,
        },
    })
}

/// The name of the old root to boot (the newest for `None`), or a refusal listing those there
/// are.
fn find_old_root(top: &TopLevel, layout: &Layout, name: Option<&str>) -> Result<String> {
    let scan = old_roots::scan_all(top.fd(), &layout.old_roots)?;
    if let Some(found) = old_roots::find(&scan, name) {
        return Ok(found.name.clone());
    }
    let dev = layout.device.display();
    let dir = &layout.old_roots;
    let names: Vec<&str> = scan.roots.iter().map(|r| r.name.as_str()).collect();
    let problem = match name {
        Some(name) if names.is_empty() => format!(
            "asked to boot the old root {name:?}, but {dir} on {dev} holds no old roots"
        ),
        Some(name) => format!(
            "asked to boot the old root {name:?}, but there is no old root of that name in {dir} on {dev}; the old roots, oldest first: {}",
            names.join(", ")
        ),
        None => format!("asked to boot the newest old root, but {dir} on {dev} holds no old roots"),
    };
    let fix = if names.is_empty() {
        "there is nothing to go back to: boot normally (without rasa.boot-old-root); at boot, the current root is then used as it is, not reset".to_string()
    } else {
        format!(
            "boot with rasa.boot-old-root={} (or rasa.boot-old-root alone for the newest), or pass one of those names to --from-old-root; at boot, the current root is then used as it is, not reset",
            names.last().unwrap()
        )
    };
    Err(refuse(problem, fix))
}

fn top_level_listing(top: &TopLevel) -> String {
    let mut names: Vec<String> = std::fs::read_dir(top.path())
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}

fn ensure_old_roots_dir(top: &TopLevel, layout: &Layout) -> Result<()> {
    // 0700: old roots hold whatever the root held, secrets included.
    match mkdirat(top.fd(), layout.old_roots.as_str(), Mode::S_IRWXU) {
        Ok(()) => {
            log::info(format!(
                "created the old-roots directory {}",
                layout.old_roots
            ));
            Ok(())
        }
        Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {}", layout.old_roots)),
    }
}

/// Carry out the plan; the name the current root was kept under, when this run retired it.
fn execute(top: &TopLevel, layout: &Layout, plan: &Plan) -> Result<Option<String>> {
    let new = layout.new_root_name();
    let root = layout.root.as_str();
    ensure_old_roots_dir(top, layout)?;
    let old_dir = btrfs::open_dir_at(top.fd(), OsStr::new(&layout.old_roots))
        .context("opening the old-roots directory")?;

    if let Plan::Remake = plan {
        // The root is gone: make the fresh root under its own name first (one atomic step), and
        // only then discard the stray. Discarding first would leave a moment with neither a root
        // nor a root-to-be, and a crash there a machine with nothing to boot.
        make_from_blank(top, layout, root)?;
        failpoint::hit("created-new-root");
        discard_stray_new(top, layout)?;
        nix::unistd::syncfs(top.fd()).context("syncing the filesystem")?;
        return Ok(None);
    }

    if let Plan::Full { .. } | Plan::FromOldRoot { .. } = plan {
        // A leftover new root is from a run that stopped before installing it: it was never
        // booted and holds nothing of value.
        if matches!(
            plan,
            Plan::Full {
                discard_stale_new: true
            } | Plan::FromOldRoot {
                discard_stale_new: true,
                ..
            }
        ) {
            discard_stray_new(top, layout)?;
        }

        // Step 1. The new root is made under a temporary name; `root` is untouched.
        match (plan, &layout.blank) {
            (Plan::FromOldRoot { source, .. }, _) => {
                // A snapshot, not a rename: the old root stays as it was, still recoverable and
                // still counted by retention.
                let source_fd = btrfs::open_dir_at(old_dir.as_fd(), OsStr::new(source))
                    .with_context(|| format!("opening {}/{source}", layout.old_roots))?;
                let info = btrfs::subvol_info(source_fd.as_fd())?;
                let nested = btrfs::tree::child_subvolumes(top.fd(), info.id)?.len();
                btrfs::snapshot(source_fd.as_fd(), top.fd(), OsStr::new(&new), false)?;
                log::info(format!(
                    "created {new} as a writable snapshot of the old root {}/{source}, which stays as it is",
                    layout.old_roots
                ));
                if nested > 0 {
                    log::warn(format!(
                        "{}/{source} holds {nested} nested subvolume(s), which a snapshot does not include: they are empty directories in the root this boot gets, and stay in {}/{source}",
                        layout.old_roots, layout.old_roots
                    ));
                }
            }
            _ => make_from_blank(top, layout, &new)?,
        }
        failpoint::hit("created-new-root");
    }
    let mut retired = None;
    if let Plan::Full { .. } | Plan::FromOldRoot { .. } = plan {
        // Step 2. Retire the current root with one rename into the old-roots directory. Both
        // live in the top-level subvolume, so this is atomic; NOREPLACE guards a kept root.
        let existing = old_roots::scan_all(top.fd(), &layout.old_roots)?;
        let (stamp, clock_behind) = old_roots::next_name(&existing, old_roots::now());
        if clock_behind {
            log::warn(format!("the clock ({stamp}) is behind the newest old root's name; retention orders old roots by creation, not by name"));
        }
        renameat2(
            top.fd(),
            root,
            old_dir.as_fd(),
            stamp.as_str(),
            RenameFlags::RENAME_NOREPLACE,
        )
        .with_context(|| format!("moving {root} to {}/{stamp}", layout.old_roots))?;
        log::info(format!(
            "kept the previous root as {}/{stamp}",
            layout.old_roots
        ));
        failpoint::hit("moved-old-root");
        retired = Some(stamp);
    } else if let Plan::InstallOnly = plan {
        log::info(format!(
            "resuming an interrupted rollback: {root} was already kept, installing {new}"
        ));
    }

    // Step 3. Install the new root. `root` does not exist here, so NOREPLACE can only fail if
    // something else raced us, and then we stop rather than clobber it.
    renameat2(
        top.fd(),
        new.as_str(),
        top.fd(),
        root,
        RenameFlags::RENAME_NOREPLACE,
    )
    .with_context(|| format!("renaming {new} to {root}"))?;
    log::info(format!("installed the new {root}"));
    failpoint::hit("installed-new-root");

    // Make the new layout durable before the boot goes on and starts writing to it.
    nix::unistd::syncfs(top.fd()).context("syncing the filesystem")?;
    Ok(retired)
}

/// Make `name` at the top level from the blank (a writable snapshot), or a new empty subvolume
/// with `--empty`.
fn make_from_blank(top: &TopLevel, layout: &Layout, name: &str) -> Result<()> {
    match &layout.blank {
        Some(blank) => {
            let source = btrfs::open_dir_at(top.fd(), OsStr::new(blank))?;
            btrfs::snapshot(source.as_fd(), top.fd(), OsStr::new(name), false)?;
            log::info(format!("created {name} as a writable snapshot of {blank}"));
        }
        None => {
            btrfs::create_subvolume(top.fd(), OsStr::new(name))?;
            log::info(format!("created {name} as a new empty subvolume"));
        }
    }
    Ok(())
}

/// Delete a `root.rasa-new` left by an interrupted run (never booted), nested subvolumes first;
/// never one of the subvolumes rasa keeps.
fn discard_stray_new(top: &TopLevel, layout: &Layout) -> Result<()> {
    let new = layout.new_root_name();
    log::info(format!(
        "discarding {new}, left by an interrupted run before it was used"
    ));
    let mut keep: Vec<&str> = vec![&layout.root, &layout.persist];
    keep.extend(layout.blank.as_deref());
    let protected = old_roots::protected_ids(top, &keep)?;
    btrfs::delete_subvolume_tree(top.fd(), top.fd(), OsStr::new(&new), &protected, || {
        failpoint::hit("discarded-stale-subvolume")
    })?;
    failpoint::hit("discarded-stale-new");
    Ok(())
}

fn print_plan(top: &TopLevel, layout: &Layout, plan: &Plan) -> Result<()> {
    let new = layout.new_root_name();
    let existing = old_roots::scan_all(top.fd(), &layout.old_roots)?;
    let (stamp, _) = old_roots::next_name(&existing, old_roots::now());
    println!("dry run: nothing will be changed. rasa rollback would:");
    match plan {
        Plan::Full { discard_stale_new } => {
            if *discard_stale_new {
                println!("  - discard {new}, left by an interrupted run");
            }
            match &layout.blank {
                Some(blank) => println!("  1. snapshot {blank} (read-only blank) as {new}"),
                None => println!("  1. create {new} as an empty subvolume"),
            }
            println!("  2. move {} to {}/{stamp}", layout.root, layout.old_roots);
        }
        Plan::FromOldRoot {
            source,
            discard_stale_new,
        } => {
            if *discard_stale_new {
                println!("  - discard {new}, left by an interrupted run");
            }
            println!(
                "  1. snapshot the old root {}/{source} (left as it is) as {new}",
                layout.old_roots
            );
            println!("  2. move {} to {}/{stamp}", layout.root, layout.old_roots);
        }
        Plan::InstallOnly => println!("  (a previous run already kept the old root)"),
        Plan::Remake => {
            match &layout.blank {
                Some(blank) => println!(
                    "  1. snapshot {blank} (read-only blank) as {} (the root is gone)",
                    layout.root
                ),
                None => println!(
                    "  1. create {} as an empty subvolume (the root is gone)",
                    layout.root
                ),
            }
            println!("  2. discard {new}: not one rasa would install");
            println!("old roots kept now: {}", existing.roots.len());
            return Ok(());
        }
    }
    println!("  3. rename {new} to {}", layout.root);
    println!("old roots kept now: {}", existing.roots.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::old_root_request;

    #[test]
    fn the_kernel_parameter_asks_for_an_old_root_and_the_flag_wins() {
        let none: Option<Option<String>> = None;
        assert_eq!(old_root_request(&none, "quiet root=x"), None);
        assert_eq!(
            old_root_request(&none, "quiet rasa.boot-old-root ro"),
            Some(None)
        );
        assert_eq!(old_root_request(&none, "rasa.boot-old-root="), Some(None));
        assert_eq!(
            old_root_request(&none, "a rasa.boot-old-root=20260101T000000Z b"),
            Some(Some("20260101T000000Z".into()))
        );
        // A parameter that only starts the same is not this one.
        assert_eq!(old_root_request(&none, "rasa.boot-old-roots"), None);
        let flag = Some(Some("X".to_string()));
        assert_eq!(
            old_root_request(&flag, "rasa.boot-old-root"),
            Some(Some("X".into()))
        );
    }
}
