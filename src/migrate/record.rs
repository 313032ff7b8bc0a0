//! The record of `migrate --apply` runs, `<storageRoot>/.rasa/migrations.json`: what `rasa check
//! system` reads to say when state was last migrated. Its types are the file's format, so they
//! live here and not in the plan.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use crate::fs::{self, Beneath};

pub const RECORD_DIR: &str = ".rasa";
pub const RECORD_FILE: &str = "migrations.json";

/// What was (or will be) done for one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Copy,
    AlreadyPersisted,
    Identical,
    Conflict,
    Missing,
    /// Nothing to copy, but the initrd mounts it (`neededForBoot`): created empty in storage.
    CreateEmpty,
    /// Inside a directory entry of the same storage root: that entry's copy holds it.
    Covered,
    /// Left alone, and nothing is lost by that (a socket).
    Skipped,
    /// Left alone, and the next boot would lose it: reported with the fix, exit 4.
    Problem,
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

/// The record of earlier runs in the storage root `root` (open), if there is one.
pub fn read(root: BorrowedFd<'_>) -> Result<Option<RecordFile>> {
    let dir = match fs::open_dir_beneath(root, &[RECORD_DIR.into()])? {
        Beneath::Dir(fd, _) => fd,
        _ => return Ok(None),
    };
    let Some(st) = fs::lstat_at(dir.as_fd(), OsStr::new(RECORD_FILE))? else {
        return Ok(None);
    };
    if fs::Kind::of(&st) != fs::Kind::File {
        return Ok(None);
    }
    let fd = fs::open_verified(dir.as_fd(), OsStr::new(RECORD_FILE), &st)?;
    let text = std::io::read_to_string(std::fs::File::from(fd))?;
    Ok(serde_json::from_str(&text).ok())
}

/// Append `run` to the record in the storage root `root` (open), creating `.rasa` (0700) and
/// replacing the file atomically.
pub fn append(root: BorrowedFd<'_>, root_shown: &str, run: RecordRun) -> Result<()> {
    let record_dir = match fs::open_dir_beneath(root, &[RECORD_DIR.into()])? {
        Beneath::Dir(fd, _) => fd,
        Beneath::Missing { .. } => {
            super::apply::make_dir(root, OsStr::new(RECORD_DIR), 0, 0, 0o700)?;
            match fs::open_dir(root, OsStr::new(RECORD_DIR))? {
                Some((fd, _)) => fd,
                None => anyhow::bail!("{root_shown}/{RECORD_DIR} vanished while created"),
            }
        }
        _ => {
            return Err(super::plan::hostile_in_storage(
                root_shown,
                &format!("{root_shown}/{RECORD_DIR}"),
                "not a directory",
            ))
        }
    };
    let mut record = read(root)?.unwrap_or(RecordFile {
        version: 1,
        runs: Vec::new(),
    });
    record.runs.push(run);
    let text = serde_json::to_string_pretty(&record)? + "\n";
    let temp = OsStr::new(".migrations.json.tmp");
    match nix::unistd::unlinkat(
        record_dir.as_fd(),
        temp,
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    ) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(e).context("removing a leftover temporary record"),
    }
    let fd = nix::fcntl::openat(
        record_dir.as_fd(),
        temp,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
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
    .with_context(|| {
        format!(
            "publishing the record {}",
            Path::new(root_shown).join(RECORD_DIR).display()
        )
    })?;
    Ok(())
}
