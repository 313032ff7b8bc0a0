//! `rasa setup`: prepare an existing btrfs root for rasa, without touching its contents.
//!
//! It only ever creates things that are missing (the persistent subvolume, the read-only empty
//! blank, the old-roots directory, optionally a log subvolume), so running it twice is harmless
//! and it can never destroy anything. The blank is made under a temporary name, set read-only
//! and only then renamed into place, so a crash never leaves a writable blank for rollback to
//! start from.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::fcntl::{renameat2, AtFlags, RenameFlags};
use nix::sys::stat::{fstatat, mkdirat, Mode};
use serde::Serialize;

use crate::btrfs;
use crate::error::{exit, refuse};
use crate::layout::LayoutArgs;
use crate::log;
use crate::toplevel::{self, TopLevel};

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  # What would be created (dry run, the default):
  sudo rasa setup

  # Create it, with a separate subvolume for /var/log:
  sudo rasa setup --log log --apply

It creates only what is missing: the persistent subvolume, the read-only EMPTY blank, the
old-roots directory and, with --log, a log subvolume. It never changes the current root, and
prints the fileSystems entries to add to your NixOS configuration.")]
pub struct SetupArgs {
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// Also create a subvolume for /var/log with this name.
    #[arg(long, value_name = "NAME")]
    pub log: Option<String>,
    /// Where the persistent subvolume is mounted.
    #[arg(long, value_name = "PATH", default_value = "/persist")]
    pub storage_root: PathBuf,
    /// The mount point of the running root (for chroots and tests).
    #[arg(long, value_name = "PATH", default_value = "/")]
    pub live_root: PathBuf,
    /// The manifest, to report the storage copies the initrd needs (its `neededForBoot`
    /// entries); by default the next boot's configuration's, when there is one.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Carry out the plan. Without it, nothing is changed.
    #[arg(long)]
    pub apply: bool,
    /// Print the plan or result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Action {
    Exists,
    Create,
    Created,
}

#[derive(Debug, Serialize)]
struct Step {
    name: String,
    what: &'static str,
    action: Action,
    note: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    device: String,
    root: String,
    applied: bool,
    steps: Vec<Step>,
    /// What would make the first `rasa rollback` refuse, found now rather than at that boot.
    warnings: Vec<String>,
    nix: String,
}

enum Kind {
    Subvolume,
    Blank,
    Directory,
}

pub fn run(args: SetupArgs) -> Result<u8> {
    let mut layout_args = args.layout.clone();
    let live = toplevel::mount_at(&args.live_root);
    let live_fs = live
        .as_ref()
        .map_or_else(|| "not mounted".to_owned(), |m| m.fstype.clone());
    let Some(live) = live.filter(|m| m.fstype == "btrfs") else {
        return Err(refuse(
            format!("{} is not a btrfs mount (it is {live_fs}); rasa needs the root on a btrfs subvolume", args.live_root.display()),
            "install onto btrfs first (see docs/guide.md, \"Fresh install\")",
        ));
    };
    let expected_root = format!("/{}", args.layout.root);
    if live.fs_root != expected_root {
        return Err(refuse(
            format!(
                "{} is mounted from the btrfs subvolume {:?}, not from a top-level subvolume named {:?}",
                args.live_root.display(),
                live.fs_root,
                args.layout.root
            ),
            if live.fs_root == "/" {
                "the root is the top level itself: move it into a subvolume first (see docs/guide.md), rasa cannot reset the top level".to_owned()
            } else {
                format!("pass --root {} if that is your root subvolume", live.fs_root.trim_start_matches('/'))
            },
        ));
    }
    if layout_args.device.is_none() {
        layout_args.device = Some(live.source.clone());
    }
    let layout = layout_args.validate_with(args.log.as_deref())?;
    toplevel::check_device(&layout.device)?;
    let top = TopLevel::mount(&layout.device, !args.apply)?;

    let mut wanted: Vec<(String, Kind, &'static str)> = vec![(
        layout.persist.clone(),
        Kind::Subvolume,
        "persistent subvolume",
    )];
    if let Some(blank) = &layout.blank {
        wanted.push((blank.clone(), Kind::Blank, "read-only empty blank"));
    }
    wanted.push((
        layout.old_roots.clone(),
        Kind::Directory,
        "old-roots directory",
    ));
    if let Some(log_name) = &args.log {
        wanted.push((log_name.clone(), Kind::Subvolume, "log subvolume"));
    }

    // Look at everything first: a collision anywhere refuses before anything is created.
    let mut steps = Vec::new();
    for (name, kind, what) in &wanted {
        steps.push(inspect(&top, name, kind, what)?);
    }
    if args.apply {
        for ((name, kind, _), step) in wanted.iter().zip(steps.iter_mut()) {
            if step.action == Action::Create {
                create(&top, name, kind)?;
                step.action = Action::Created;
                log::info(format!("created the {} {name}", step.what));
            }
        }
    }
    let mut warnings = rollback_warnings(&top, &layout.root)?;
    drop(top);
    warnings.extend(needed_for_boot_warnings(&args)?);

    let nix = filesystems_snippet(
        &layout.device,
        &args.storage_root,
        &layout.persist,
        args.log.as_deref(),
    );
    let report = Report {
        device: layout.device.display().to_string(),
        root: layout.root.clone(),
        applied: args.apply,
        steps,
        warnings,
        nix,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(exit::OK)
}

fn inspect(top: &TopLevel, name: &str, kind: &Kind, what: &'static str) -> Result<Step> {
    let st = match fstatat(top.fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(nix::errno::Errno::ENOENT) => {
            return Ok(Step {
                name: name.into(),
                what,
                action: Action::Create,
                note: None,
            })
        }
        Err(e) => return Err(e).with_context(|| format!("inspecting {name}")),
    };
    let is_dir = st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFDIR;
    let is_subvol = is_dir && st.st_ino == btrfs::FIRST_FREE_OBJECTID;
    let collision = |found: &str, fix: String| {
        Err(refuse(format!("{name:?} already exists at the top level and is {found}, not the {what} rasa needs"), fix))
    };
    match kind {
        Kind::Directory if is_subvol => collision(
            "a subvolume",
            "rename it, or pass another name with --old-roots (old roots must sit in a plain directory)".to_owned(),
        ),
        Kind::Directory if !is_dir => collision("not a directory", "move it away, or pass another name with --old-roots".into()),
        Kind::Directory => Ok(Step { name: name.into(), what, action: Action::Exists, note: None }),
        Kind::Subvolume | Kind::Blank if !is_subvol => {
            collision(if is_dir { "a plain directory" } else { "not a directory" }, format!("move {name:?} away, or choose another name"))
        }
        Kind::Subvolume => Ok(Step { name: name.into(), what, action: Action::Exists, note: None }),
        Kind::Blank => {
            let fd = btrfs::open_dir_at(top.fd(), OsStr::new(name))?;
            let readonly = btrfs::is_readonly(fd.as_fd())?;
            let entries = std::fs::read_dir(top.path().join(name)).map(|d| d.count()).unwrap_or(0);
            if !readonly {
                return Err(refuse(
                    format!("the blank {name:?} exists but is writable"),
                    format!("if it is what every boot should start from, make it read-only: `btrfs property set <top>/{name} ro true`"),
                ));
            }
            let note = (entries > 0).then(|| format!("not empty ({entries} entries): every boot will start with them"));
            Ok(Step { name: name.into(), what, action: Action::Exists, note })
        }
    }
}

fn create(top: &TopLevel, name: &str, kind: &Kind) -> Result<()> {
    match kind {
        Kind::Directory => {
            mkdirat(top.fd(), name, Mode::S_IRWXU).with_context(|| format!("creating {name}"))
        }
        Kind::Subvolume => btrfs::create_subvolume(top.fd(), OsStr::new(name)),
        Kind::Blank => {
            let temp = crate::rules::temporary_name(name);
            if top.is_subvolume(OsStr::new(&temp))? {
                // Left by an interrupted setup; it was never renamed into use.
                btrfs::delete_subvolume_tree(top.fd(), top.fd(), OsStr::new(&temp), &[], || {})?;
            }
            btrfs::create_subvolume(top.fd(), OsStr::new(&temp))?;
            let fd = btrfs::open_dir_at(top.fd(), OsStr::new(&temp))?;
            btrfs::set_readonly(fd.as_fd(), true)?;
            drop(fd);
            renameat2(
                top.fd(),
                temp.as_str(),
                top.fd(),
                name,
                RenameFlags::RENAME_NOREPLACE,
            )
            .with_context(|| format!("renaming {temp} to {name}"))
        }
    }
}

fn filesystems_snippet(
    device: &Path,
    storage_root: &Path,
    persist: &str,
    log: Option<&str>,
) -> String {
    let entry = |mount_point: &str, subvol: &str| {
        format!(
            "  fileSystems.\"{mount_point}\" = {{\n    device = \"{}\";\n    fsType = \"btrfs\";\n    options = [ \"subvol={subvol}\" \"compress=zstd\" \"noatime\" ];\n    neededForBoot = true;\n  }};\n",
            device.display()
        )
    };
    let mut nix = String::from("{\n");
    nix += &entry(&storage_root.display().to_string(), persist);
    if let Some(log) = log {
        nix += &entry("/var/log", log);
    }
    nix + "}\n"
}

/// What `rasa rollback` would refuse about the root (the same predicates it uses): `/nix` or
/// `/boot` inside the root subvolume, or the root being the default subvolume.
fn rollback_warnings(top: &TopLevel, root: &str) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    let fd = btrfs::open_dir_at(top.fd(), OsStr::new(root))
        .with_context(|| format!("opening the root subvolume {root}"))?;
    for dir in crate::rules::boot_dirs_inside(fd.as_fd())? {
        warnings.push(format!(
            "/{dir} is part of the root subvolume {root:?}: rasa rollback will refuse until /{dir} is a subvolume of its own at the top level, mounted at /{dir}"
        ));
    }
    if top.default_subvolume()? == btrfs::subvol_info(fd.as_fd())?.id {
        warnings.push(format!(
            "{root:?} is the filesystem's default subvolume: rasa rollback will refuse until / is mounted with subvol={root} and the default is reset (`btrfs subvolume set-default 5 <top>`)"
        ));
    }
    Ok(warnings)
}

/// The storage copies the initrd mounts before activation could create them (`neededForBoot`
/// entries such as /var/lib/nixos): missing at the first wiping boot, that mount fails and, for
/// /var/lib/nixos, the uid/gid maps of the boot are lost. Setup runs before the state is moved,
/// so it reports them; `rasa migrate --apply` creates them (empty when there is nothing to copy)
/// and `rasa check system` fails while one is missing.
fn needed_for_boot_warnings(args: &SetupArgs) -> Result<Vec<String>> {
    let path = match &args.manifest {
        Some(path) => path.clone(),
        None => match crate::manifest::locate(None) {
            Ok((path, _)) => path,
            // No configuration with rasa yet: nothing to report, and the guide's next steps
            // (rebuild, then migrate) create these copies.
            Err(_) => return Ok(Vec::new()),
        },
    };
    let manifest = crate::manifest::load(&path)?;
    let live = nix::fcntl::open(
        &args.live_root,
        nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening {}", args.live_root.display()))?;
    let mut warnings = Vec::new();
    for entry in manifest.entries.iter().filter(|e| e.needed_for_boot) {
        let storage = entry.storage_path();
        let parts = crate::fs::components(storage.as_os_str());
        let Some((name, parents)) = parts.split_last() else {
            continue;
        };
        let exists = match crate::fs::open_dir_beneath(live.as_fd(), parents)? {
            crate::fs::Beneath::Dir(dir, _) => crate::fs::lstat_at(dir.as_fd(), name)?.is_some(),
            _ => false,
        };
        if !exists {
            warnings.push(format!(
                "the initrd mounts {} from {} (neededForBoot), which does not exist yet: `rasa migrate --apply` creates it before the first wiping boot",
                entry.path,
                storage.display()
            ));
        }
    }
    Ok(warnings)
}

fn print_report(report: &Report) {
    let verb = if report.applied { "" } else { "dry run: " };
    println!(
        "{verb}rasa setup on {} (root subvolume {:?}):",
        report.device, report.root
    );
    for step in &report.steps {
        let (mark, text) = match step.action {
            Action::Exists => ("=", "exists"),
            Action::Create => ("+", "would create"),
            Action::Created => ("+", "created"),
        };
        print!("  {mark} {:<12} {} ({})", step.name, text, step.what);
        match &step.note {
            Some(note) => println!(": {note}"),
            None => println!(),
        }
    }
    for warning in &report.warnings {
        println!("  ! {warning}");
    }
    if !report.applied && report.steps.iter().any(|s| s.action == Action::Create) {
        println!("run again with --apply to create what is missing.");
    }
    println!(
        "\nAdd to your NixOS configuration (the mounts must be there in the initrd):\n\n{}",
        report.nix
    );
}
