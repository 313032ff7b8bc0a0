//! Fixtures for tests on real btrfs: a loop-file filesystem per test, torn down on drop.
//!
//! These tests need root (mount, losetup, btrfs ioctls) and btrfs-progs (mkfs.btrfs). Where
//! either is missing they are skipped *visibly*: the reason goes to stderr and to
//! `target/tmp/rasa-skipped.txt`, which `cargo xtask test` prints at the end. With
//! RASA_REQUIRE_PRIVILEGED_TESTS=1 (set by CI) a skip is a failure instead, so CI can never pass
//! by skipping.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const RASA: &str = env!("CARGO_BIN_EXE_rasa");

fn skip_log() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("rasa-skipped.txt")
}

/// Record a skip and return `None` (or fail, under RASA_REQUIRE_PRIVILEGED_TESTS=1).
pub fn skip<T>(test: &str, reason: &str) -> Option<T> {
    if std::env::var_os("RASA_REQUIRE_PRIVILEGED_TESTS").is_some_and(|v| v == "1") {
        panic!("{test} cannot run: {reason} (RASA_REQUIRE_PRIVILEGED_TESTS=1 forbids skipping)");
    }
    eprintln!("SKIPPED {test}: {reason}");
    if let Ok(mut log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(skip_log())
    {
        let _ = writeln!(log, "{test}: {reason}");
    }
    None
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Run a command, panicking with its output when it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawn sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A btrfs filesystem on a loop device, with its top level (subvolid=5) mounted at `top`.
pub struct LoopBtrfs {
    pub dir: tempfile::TempDir,
    pub device: PathBuf,
    pub top: PathBuf,
}

impl LoopBtrfs {
    /// A fresh filesystem of `size_mb` MiB, or `None` when the test must be skipped.
    pub fn new(test: &str, size_mb: u64) -> Option<LoopBtrfs> {
        if !nix::unistd::geteuid().is_root() {
            return skip(test, "needs root for loop devices and mount");
        }
        if !have("mkfs.btrfs") {
            return skip(test, "needs mkfs.btrfs (apt-get install btrfs-progs)");
        }
        let dir = tempfile::Builder::new()
            .prefix("rasa-test.")
            .tempdir()
            .expect("tempdir");
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size_mb << 20)
            .unwrap();
        let device = match Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&image)
            .output()
        {
            Ok(out) if out.status.success() => {
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }
            Ok(out) => {
                return skip(
                    test,
                    &format!(
                        "losetup failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                )
            }
            Err(e) => return skip(test, &format!("losetup not runnable: {e}")),
        };
        sh(&format!("mkfs.btrfs -q -f {}", device.display()));
        let top = dir.path().join("top");
        std::fs::create_dir(&top).unwrap();
        sh(&format!(
            "mount -o subvolid=5 {} {}",
            device.display(),
            top.display()
        ));
        Some(LoopBtrfs { dir, device, top })
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.top.join(rel)
    }

    /// Run rasa with these arguments (plus `--device`, for the subcommands that take it).
    pub fn rasa(&self, args: &[&str]) -> Output {
        self.rasa_env(args, &[])
    }

    pub fn rasa_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(RASA);
        cmd.args(args)
            .arg("--device")
            .arg(&self.device)
            .env("NO_COLOR", "1")
            .env_remove("JOURNAL_STREAM");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run rasa")
    }

    pub fn subvolume(&self, rel: &str) {
        sh(&format!(
            "btrfs -q subvolume create '{}'",
            self.path(rel).display()
        ));
    }

    /// The standard layout: `root` (with content added by the caller), a read-only empty
    /// `root-blank`, and `persist`.
    pub fn standard_layout(&self) {
        self.subvolume("root");
        self.subvolume("persist");
        sh(&format!(
            "btrfs -q subvolume snapshot -r '{0}/root' '{0}/root-blank'",
            self.top.display()
        ));
    }

    /// Subvolume paths below the top level, sorted (from `btrfs subvolume list`).
    pub fn subvolumes(&self) -> Vec<String> {
        let out = sh(&format!(
            "btrfs subvolume list -o '{}' ; btrfs subvolume list '{}'",
            self.top.display(),
            self.top.display()
        ));
        let mut paths: Vec<String> = out
            .lines()
            .filter_map(|l| l.split(" path ").nth(1))
            .map(str::to_owned)
            .collect();
        paths.sort();
        paths.dedup();
        paths
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.top).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
