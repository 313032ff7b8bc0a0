//! `cargo xtask bench rollback`: rasa's critical path against seed 000's recursive shell delete,
//! on a root holding 2,000 nested subvolumes and 100,000 small files, in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::sh;
use crate::deps;

const SUBVOLUMES: usize = 2000;
const FILES: usize = 100_000;
const RUNS: usize = 3;

/// Seed 000's rollback, verbatim but for the device and mount point.
const SEED_000: &str = r#"
set -eu
mount -o subvol=/ "$DEV" "$MNT"
delete_subvolume_recursively() {
    IFS=$'\n'
    for x in $(btrfs subvolume list -o "$1" | cut -f 9- -d ' '); do
        delete_subvolume_recursively "$MNT/$x"
    done
    btrfs subvolume delete "$1" >/dev/null
}
delete_subvolume_recursively "$MNT/root"
btrfs subvolume create "$MNT/root" >/dev/null
umount "$MNT"
"#;

struct Fs {
    dir: PathBuf,
    device: String,
    top: PathBuf,
}

impl Fs {
    fn new(dir: &Path) -> Result<Fs> {
        let image = dir.join("bench.img");
        let _ = std::fs::remove_file(&image);
        sh(&format!("truncate -s 4G '{}'", image.display()))?;
        let device = sh(&format!("losetup -f --show '{}'", image.display()))?
            .trim()
            .to_owned();
        sh(&format!("mkfs.btrfs -q -f {device}"))?;
        let top = dir.join("top");
        std::fs::create_dir_all(&top)?;
        sh(&format!("mount -o subvolid=5 {device} '{}'", top.display()))?;
        sh(&format!(
            "btrfs -q subvolume create '{0}/root' && btrfs -q subvolume create '{0}/persist' \
             && btrfs -q subvolume snapshot -r '{0}/root' '{0}/root-blank'",
            top.display()
        ))?;
        Ok(Fs {
            dir: dir.to_path_buf(),
            device,
            top,
        })
    }

    fn populate(&self) -> Result<String> {
        let script = crate::project_root().join("bench/make_tree.py");
        let out = sh(&format!(
            "python3 '{}' '{}/root' {SUBVOLUMES} {FILES}",
            script.display(),
            self.top.display()
        ))?;
        // Start each timed run from a committed, cold-ish state, like a boot does.
        sh(&format!(
            "sync && btrfs filesystem sync '{}' && echo 3 > /proc/sys/vm/drop_caches",
            self.top.display()
        ))?;
        Ok(out.trim().to_owned())
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        let _ = sh(&format!("umount '{}'", self.top.display()));
        let _ = sh(&format!("losetup -d {}", self.device));
        let _ = std::fs::remove_file(self.dir.join("bench.img"));
    }
}

/// Run a command to completion, failing with its stderr; return its wall time and stderr.
fn timed(cmd: &mut Command) -> Result<(f64, String)> {
    let started = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let wall = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("{cmd:?} failed: {stderr}");
    }
    Ok((wall, stderr))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

pub fn run(_args: &[String]) -> Result<()> {
    if !deps::nix_is_root() {
        bail!("the rollback benchmark needs root (loop devices, mount)");
    }
    deps::apt(&["btrfs-progs", "python3"])?;
    let root = crate::project_root();
    deps::run(
        Command::new("cargo")
            .args(["build", "--quiet", "--release", "-p", "rasa"])
            .current_dir(&root),
    )?;
    let rasa = root.join("target/release/rasa");
    let work = root.join("target/bench-rollback");
    std::fs::create_dir_all(&work)?;
    let fs = Fs::new(&work)?;

    let mut rasa_wall = Vec::new();
    let mut rasa_logged = Vec::new();
    let mut prune_wall = Vec::new();
    let mut tree = String::new();
    for run in 0..RUNS {
        tree = fs.populate()?;
        let (wall, log) = timed(
            Command::new(&rasa)
                .args([
                    "rollback",
                    "--device",
                    &fs.device,
                    "--keep",
                    "0",
                    "--keep-days",
                    "0",
                ])
                .env("NO_COLOR", "1"),
        )?;
        let logged_ms: f64 = log
            .lines()
            .find_map(|l| l.split("new root in place in ").nth(1))
            .and_then(|rest| rest.trim_end_matches(" ms").parse().ok())
            .context("rasa did not log its duration")?;
        // The deferred part: deleting the retired root's 2,000 subvolumes after boot.
        let (prune, _) = timed(Command::new(&rasa).args([
            "prune",
            "--device",
            &fs.device,
            "--keep",
            "0",
            "--keep-days",
            "0",
        ]))?;
        eprintln!(
            "run {run}: rasa rollback {:.1} ms wall ({logged_ms:.1} ms logged), prune {:.2} s",
            wall * 1e3,
            prune
        );
        rasa_wall.push(wall);
        rasa_logged.push(logged_ms / 1e3);
        prune_wall.push(prune);
    }

    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    fs.populate()?;
    let (seed, _) = timed(
        Command::new("bash")
            .arg("-c")
            .arg(SEED_000)
            .env("DEV", &fs.device)
            .env("MNT", &mnt),
    )?;
    eprintln!("seed 000 script: {seed:.2} s");

    let rasa_median = median(rasa_wall.clone());
    println!("\nRollback of a root with {tree} (loop-file btrfs, {RUNS} rasa runs, median):\n");
    println!("| what | time | note |");
    println!("|---|---|---|");
    println!("| `rasa rollback` (whole process: mount, 3 steps, sync, unmount) | {:.1} ms | boot waits for this |", rasa_median * 1e3);
    println!(
        "| `rasa rollback`, its own log line (snapshot + 2 renames + sync) | {:.1} ms | |",
        median(rasa_logged) * 1e3
    );
    println!("| seed 000 recursive shell delete + create | {seed:.2} s | boot waits for this |");
    println!(
        "| `rasa prune` of that old root (after boot, stage 2) | {:.2} s | boot does not wait |",
        median(prune_wall)
    );
    println!(
        "\nrasa's critical path is {:.0}x faster than seed 000's script.",
        seed / rasa_median
    );
    Ok(())
}
