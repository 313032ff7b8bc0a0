//! `rasa migrate`: copy the state the manifest lists from the live root into its storage root,
//! before the first boot that wipes `/`.
//!
//! Shaped like `rollback`: inspect ([`plan`]) into a [`plan::Plan`] value that changes nothing,
//! then print it ([`render`]) or execute it ([`apply`]) and keep a [`record`] of the run, which
//! `rasa check system` reads. The default dry run and `--apply` share one plan.

pub mod apply;
pub mod plan;
pub mod record;
mod render;

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use crate::error::{exit, refuse};
use crate::log;
use crate::manifest;

use plan::PlannedEntry;

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
    let (live, live_root) = open_live_root(&args.live_root)?;
    let mut plan = plan::plan(&manifest, live.as_fd(), &live_root, args.on_conflict)?;
    if args.apply {
        apply::apply(&mut plan, live.as_fd(), &live_root)?;
        apply::write_records(&manifest_path, &plan, live.as_fd(), &live_root)?;
    }
    let report = Report {
        manifest: manifest_path.display().to_string(),
        manifest_source: source.to_owned(),
        applied: args.apply,
        entries: plan.entries,
    };
    let text = if args.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        render::render(&report)
    };
    log::print_stdout(&text)?;
    let unresolved = report.entries.iter().any(PlannedEntry::unresolved);
    Ok(if unresolved { exit::PROBLEMS } else { exit::OK })
}

/// The live root, open, and its absolute path (to compare with mount points).
pub fn open_live_root(live_root: &Path) -> Result<(OwnedFd, PathBuf)> {
    // The live root itself is given by the user and may be reached through symlinks; nothing
    // below it is.
    let bad = |e: std::io::Error| {
        refuse(
            format!("cannot open --live-root {}: {e}", live_root.display()),
            "pass an existing directory with --live-root (default /)",
        )
    };
    let absolute = std::fs::canonicalize(live_root).map_err(bad)?;
    let file = std::fs::File::open(&absolute).map_err(bad)?;
    Ok((file.into(), absolute))
}
