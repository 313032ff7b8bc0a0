//! The subvolume layout rasa works on, as given on the command line, and its validation.

use std::ffi::OsStr;
use std::path::PathBuf;

use anyhow::Result;

use crate::error::refuse;
use crate::rules;
use crate::toplevel;

/// Where the filesystem is and what its subvolumes are called. Shared by `rollback`, `prune`,
/// `old-roots` and `check system`, so the flags mean the same everywhere.
#[derive(clap::Args, Clone, Debug)]
pub struct LayoutArgs {
    /// Block device that holds the btrfs filesystem, e.g. /dev/mapper/cryptroot.
    /// [default: the btrfs device mounted at /]
    #[arg(long, value_name = "DEVICE", env = "RASA_DEVICE")]
    pub device: Option<PathBuf>,

    /// Name of the root subvolume at the top level (what `/` is mounted from).
    #[arg(long, value_name = "NAME", default_value = "root")]
    pub root: String,

    /// Name of the read-only blank subvolume each boot starts from.
    #[arg(long, value_name = "NAME", default_value = "root-blank")]
    pub blank: String,

    /// Start each boot from a new empty subvolume instead of a snapshot of --blank.
    #[arg(long, conflicts_with = "blank")]
    pub empty: bool,

    /// Directory at the top level where previous roots are kept, one subvolume per boot.
    #[arg(long, value_name = "NAME", default_value = "old_roots")]
    pub old_roots: String,

    /// Name of the persistent subvolume. rasa never touches it; the name is only checked
    /// against the others so that a typo cannot make it the root or an old root.
    #[arg(long, value_name = "NAME", default_value = "persist")]
    pub persist: String,
}

/// How many previous roots to keep.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct RetentionArgs {
    /// Always keep this many of the newest old roots (0 keeps none by count).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub keep: u32,

    /// Also keep every old root retired less than this many days ago (0: none by age).
    #[arg(long, value_name = "DAYS", default_value_t = 7)]
    pub keep_days: u32,
}

/// A layout whose names have been checked.
#[derive(Clone, Debug)]
pub struct Layout {
    pub device: PathBuf,
    pub root: String,
    /// `None` in empty mode.
    pub blank: Option<String>,
    pub old_roots: String,
    pub persist: String,
}

impl Layout {
    /// The temporary name of the next root while it is being prepared. It sits beside the root
    /// at the top level, so installing it is a single rename within one parent.
    pub fn new_root_name(&self) -> String {
        rules::temporary_name(&self.root)
    }

    pub fn root_os(&self) -> &OsStr {
        OsStr::new(&self.root)
    }
}

fn example_for(flag: &str) -> &'static str {
    match flag {
        "--root" => "root",
        "--blank" => "root-blank",
        "--old-roots" => "old_roots",
        "--log" => "log",
        _ => "persist",
    }
}

impl LayoutArgs {
    /// Check names and pick the device; touches nothing on disk.
    pub fn validate(&self) -> Result<Layout> {
        self.validate_with(None)
    }

    /// The names this layout configures, for [`rules::names_problems`].
    fn named<'a>(&'a self, log: Option<&'a str>) -> Vec<rules::Named<'a>> {
        let named = |label: &'a str, what, name: &'a str| rules::Named {
            label,
            what,
            name,
            example: example_for(label),
        };
        let mut all = vec![
            named("--root", "root subvolume", &self.root),
            named("--old-roots", "old-roots directory", &self.old_roots),
            named("--persist", "persistent subvolume", &self.persist),
        ];
        if !self.empty {
            all.push(named("--blank", "blank subvolume", &self.blank));
        }
        if let Some(log) = log {
            all.push(named("--log", "log subvolume", log));
        }
        all
    }

    /// [`validate`](Self::validate), with setup's extra `--log` subvolume among the names.
    pub fn validate_with(&self, log: Option<&str>) -> Result<Layout> {
        if let Some(problem) = rules::names_problems(&self.named(log)).first() {
            return Err(problem.refusal());
        }
        let device = match &self.device {
            Some(device) => device.clone(),
            None => toplevel::root_device().ok_or_else(|| {
                refuse(
                    "no --device given and / is not mounted from btrfs",
                    "pass --device /dev/mapper/<name> (or set RASA_DEVICE)",
                )
            })?,
        };
        Ok(Layout {
            device,
            root: self.root.clone(),
            blank: (!self.empty).then(|| self.blank.clone()),
            old_roots: self.old_roots.clone(),
            persist: self.persist.clone(),
        })
    }
}
