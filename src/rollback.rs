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
//! Nothing is deleted on the boot's critical path except a stale `root.rasa-new` (a name only
//! rasa creates and nothing ever mounts). Pruning old roots is separate (`rasa prune`, run from
//! a stage-2 service) because deleting a root that holds thousands of nested subvolumes takes
//! time proportional to that tree, and the boot should not wait for it.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::time::Instant;

use anyhow::{Context, Result};
use nix::fcntl::{renameat2, RenameFlags};
use nix::sys::stat::{fstatat, mkdirat, Mode};

use crate::btrfs;
use crate::error::{exit, refuse};
use crate::failpoint;
use crate::layout::{Layout, LayoutArgs, RetentionArgs};
use crate::log;
use crate::old_roots;
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
}

#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// The usual case: make a new root, retire the current one, install the new one.
    Full { discard_stale_new: bool },
    /// A previous run retired the root but stopped before installing the new one.
    InstallOnly,
}

pub fn run(args: RollbackArgs) -> Result<u8> {
    let started = Instant::now();
    let layout = args.layout.validate()?;
    toplevel::check_device(&layout.device)?;
    let top = TopLevel::mount(&layout.device, args.dry_run)?;
    let plan = inspect(&top, &layout)?;
    if args.dry_run {
        print_plan(&top, &layout, &plan)?;
        top.unmount()?;
        return Ok(exit::OK);
    }
    execute(&top, &layout, &plan)?;
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
            report.kept.len()
        ));
    }
    top.unmount()?;
    Ok(exit::OK)
}

/// Look at the top level and decide; refuse (changing nothing) when the layout is not one rasa
/// can act on safely.
fn inspect(top: &TopLevel, layout: &Layout) -> Result<Plan> {
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
    let new_present = top.is_subvolume(OsStr::new(&new))?;
    match (root_is_subvol, new_present) {
        (true, stale) => Ok(Plan::Full {
            discard_stale_new: stale,
        }),
        (false, true) => Ok(Plan::InstallOnly),
        (false, false) => Err(refuse(
            format!(
                "the root subvolume {root:?} does not exist at the top level of {dev} (found: {})",
                top_level_listing(top)
            ),
            "pass the name of the root subvolume with --root (the subvol= option of /)",
        )),
    }
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

fn execute(top: &TopLevel, layout: &Layout, plan: &Plan) -> Result<()> {
    let new = layout.new_root_name();
    let root = layout.root.as_str();
    ensure_old_roots_dir(top, layout)?;
    let old_dir = btrfs::open_dir_at(top.fd(), OsStr::new(&layout.old_roots))
        .context("opening the old-roots directory")?;

    if let Plan::Full { discard_stale_new } = plan {
        // A leftover new root is from a run that stopped before installing it: `root` is still
        // the previous root, so the leftover was never booted and holds nothing of value.
        if *discard_stale_new {
            log::info(format!(
                "discarding {new}, left by an interrupted run before it was used"
            ));
            btrfs::delete_subvolume_tree(top.fd(), top.fd(), OsStr::new(&new), &[], || {})?;
        }

        // Step 1. The new root is made under a temporary name; `root` is untouched.
        match &layout.blank {
            Some(blank) => {
                let source = btrfs::open_dir_at(top.fd(), OsStr::new(blank))?;
                btrfs::snapshot(source.as_fd(), top.fd(), OsStr::new(&new), false)?;
                log::info(format!("created {new} as a writable snapshot of {blank}"));
            }
            None => {
                btrfs::create_subvolume(top.fd(), OsStr::new(&new))?;
                log::info(format!("created {new} as a new empty subvolume"));
            }
        }
        failpoint::hit("created-new-root");

        // Step 2. Retire the current root with one rename into the old-roots directory. Both
        // live in the top-level subvolume, so this is atomic; NOREPLACE guards a kept root.
        let existing = old_roots::scan(top.fd(), &layout.old_roots)?;
        let (stamp, clock_behind) = old_roots::next_name(&existing, old_roots::now());
        if clock_behind {
            log::warn(format!("the clock is at or behind the newest old root; naming this one {stamp} to keep the order"));
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
    } else {
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
    Ok(())
}

fn print_plan(top: &TopLevel, layout: &Layout, plan: &Plan) -> Result<()> {
    let new = layout.new_root_name();
    let existing = old_roots::scan(top.fd(), &layout.old_roots)?;
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
        Plan::InstallOnly => println!("  (a previous run already kept the old root)"),
    }
    println!("  3. rename {new} to {}", layout.root);
    println!("old roots kept now: {}", existing.len());
    Ok(())
}
