//! What the last `rasa rollback` did, for the fleet view (`rasa diff --prometheus`).
//!
//! The rollback runs in the initrd; systemd carries `/run` across the switch to the real root,
//! so a stage-2 `rasa diff --prometheus` reads what the initrd wrote. One small JSON object,
//! replaced atomically (a temporary created exclusively beside it, then a rename, which replaces
//! a symlink planted at the name instead of following it). Recording is never a reason for the
//! rollback to fail: a write error is a warning.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Where `rasa rollback` writes its record and `rasa diff --prometheus` reads it.
pub const DEFAULT_PATH: &str = "/run/rasa/rollback.json";
/// The environment variable both `--record-file` (rollback) and `--rollback-record` (diff) default
/// from, so that a test can point every run elsewhere.
pub const ENV: &str = "RASA_ROLLBACK_RECORD";

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The root was reset to the blank (or an empty subvolume), or an interrupted reset was
    /// finished.
    Reset,
    /// A hibernation image waits to be resumed: the root was left as it was.
    KeptForResume,
    /// A writable snapshot of an old root is the root (`rasa.boot-old-root`).
    BootedOldRoot,
    /// Bad input or layout: nothing was changed (exit 3).
    Refused,
    /// Something failed part-way (exit 1); the next run completes the job.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Reset => "reset",
            Outcome::KeptForResume => "kept-for-resume",
            Outcome::BootedOldRoot => "booted-old-root",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub result: Outcome,
    /// From the start of `rasa rollback` to its outcome.
    pub duration_ms: u64,
    /// The name the previous root was kept under in the old-roots directory (`null` when no root
    /// was retired by this run).
    pub old_root: Option<String>,
    /// When the outcome was known, in Unix seconds.
    pub time: u64,
    pub message: String,
}

impl Record {
    pub fn new(
        result: Outcome,
        elapsed: Duration,
        old_root: Option<String>,
        message: String,
    ) -> Record {
        Record {
            result,
            duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            old_root,
            time: crate::old_roots::now(),
            message,
        }
    }

    /// Replace `path` with this record (0644; its directory, when missing, created 0700 as
    /// `rasa watch` creates /run/rasa, so that whichever comes first the directory is never
    /// wider than the watcher's record needs).
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::watch::record::write_atomically_as(path, 0o644, Some(0o700), |out| {
            serde_json::to_writer(&mut *out, self).map_err(std::io::Error::from)?;
            out.write_all(b"\n")
        })
    }

    /// The record at `path`; `Ok(None)` when there is none (no rollback ran this boot). A
    /// symlink there is not followed.
    pub fn read(path: &Path) -> Result<Option<Record>> {
        let mut file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let mut text = String::new();
        // A record is a few hundred bytes; anything much larger is not one.
        (&mut file)
            .take(1 << 20)
            .read_to_string(&mut text)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("parsing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_shape_is_the_documented_one() {
        let record = Record {
            result: Outcome::KeptForResume,
            duration_ms: 12,
            old_root: None,
            time: 1700000000,
            message: "m".into(),
        };
        assert_eq!(
            serde_json::to_string(&record).unwrap(),
            r#"{"result":"kept-for-resume","durationMs":12,"oldRoot":null,"time":1700000000,"message":"m"}"#
        );
        for result in [
            Outcome::Reset,
            Outcome::KeptForResume,
            Outcome::BootedOldRoot,
            Outcome::Refused,
            Outcome::Failed,
        ] {
            assert_eq!(
                serde_json::to_string(&result).unwrap(),
                format!("\"{}\"", result.as_str())
            );
        }
    }
}
