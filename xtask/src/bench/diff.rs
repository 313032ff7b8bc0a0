//! `cargo xtask bench diff [--files N] [--dirs N] [--runs N] [--no-fs-diff] [--no-tmpfs]`:
//! `rasa diff` (each engine) against seed 004's `fs-diff.sh` and plain `find`, in one hyperfine
//! run, on a loop-file btrfs whose root holds N new files (default 100,000 in 200 directories)
//! that the blank does not; then the peak memory (max RSS) and wall time of single runs of the
//! btrfs engine's summary, `--long` and `--json`. Then the walk engine against `find` on a tmpfs
//! copy of the same tree, where the walk is meant to run. At 1,000,000 files fs-diff.sh takes
//! half a minute a run: `--no-fs-diff` leaves it out, `--runs` lowers hyperfine's minimum.
//! `--baseline PATH` measures another `rasa` binary (an earlier commit's) beside this one.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::sh;
use crate::deps;

/// Seed 004's script, adapted only in its paths (and without `sudo`: the benchmark runs as
/// root). It runs from inside the root, because its `[ -L "$path" ]` tests use the relative
/// paths `find-new` prints.
const FS_DIFF: &str = r#"#!/usr/bin/env bash
# fs-diff.sh
set -euo pipefail

OLD_TRANSID=$(btrfs subvolume find-new @TOP@/root-blank 9999999)
OLD_TRANSID=${OLD_TRANSID#transid marker was }

btrfs subvolume find-new "@TOP@/root" "$OLD_TRANSID" |
sed '$d' |
cut -f17- -d' ' |
sort |
uniq |
while read path; do
  if [ -L "$path" ]; then
    : # The path is a symbolic link, so is probably handled by NixOS already
  elif [ -d "$path" ]; then
    : # The path is a directory, ignore
  else
    echo "$path"
  fi
done
"#;

struct Fixture {
    dir: PathBuf,
    device: String,
    top: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.top).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn arg_value(args: &[String], flag: &str, default: usize) -> Result<usize> {
    match args.iter().position(|a| a == flag) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{flag} needs a number"))?
            .parse()
            .with_context(|| format!("{flag} needs a number")),
        None => Ok(default),
    }
}

pub fn run(args: &[String]) -> Result<()> {
    if !deps::nix_is_root() {
        bail!("the diff benchmark needs root (loop devices, mount, btrfs tree search)");
    }
    let files = arg_value(args, "--files", 100_000)?;
    let dirs = arg_value(args, "--dirs", 200)?.max(1);
    let runs = arg_value(args, "--runs", 10)?.max(2);
    let with_fs_diff = !args.iter().any(|a| a == "--no-fs-diff");
    let with_tmpfs = !args.iter().any(|a| a == "--no-tmpfs");
    deps::apt(&["btrfs-progs", "hyperfine"])?;
    let root = crate::project_root();
    let rasa = super::release_rasa()?;

    let dir = root.join("target/bench-diff");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("disk.img");
    // About 1 KiB of metadata per small file, plus room.
    std::fs::File::create(&image)?.set_len(((files as u64) << 11).max(2 << 30))?;
    let device = sh(&format!("losetup -f --show '{}'", image.display()))?;
    let top = dir.join("top");
    std::fs::create_dir(&top)?;
    let fixture = Fixture {
        dir: dir.clone(),
        device: device.clone(),
        top: top.clone(),
    };
    sh(&format!("mkfs.btrfs -q -f {device}"))?;
    sh(&format!("mount -o subvolid=5 {device} '{}'", top.display()))?;
    let t = top.display();
    sh(&format!(
        "btrfs -q subvolume create {t}/root && mkdir -p {t}/root/etc {t}/root/var/lib && \
         echo host > {t}/root/etc/hostname && btrfs -q subvolume snapshot -r {t}/root {t}/root-blank"
    ))?;
    eprintln!("xtask: creating {files} new files in {dirs} directories");
    let per_dir = files.div_ceil(dirs);
    let mut made = 0;
    for d in 0..dirs {
        let sub = top.join(format!("root/var/lib/app{d:03}"));
        std::fs::create_dir(&sub)?;
        for f in 0..per_dir {
            if made == files {
                break;
            }
            // Non-empty, so that find-new (which reports extents) sees every file.
            std::fs::write(sub.join(format!("state-{f:05}")), format!("{d} {f}\n"))?;
            made += 1;
        }
    }
    sh("sync")?;

    let script = dir.join("fs-diff.sh");
    std::fs::write(&script, FS_DIFF.replace("@TOP@", &t.to_string()))?;
    let manifest = dir.join("manifest.json");
    let diff_cmd = |rasa: &str, engine: &str| {
        format!(
            "{rasa} diff --device {device} --engine {engine} --long --manifest {}",
            manifest.display()
        )
    };
    let rasa_cmd = |engine: &str| diff_cmd(&rasa.display().to_string(), engine);
    // Another build (say, the previous commit's) measured beside this one.
    let baseline = args
        .iter()
        .position(|a| a == "--baseline")
        .and_then(|i| args.get(i + 1))
        .cloned();
    std::fs::write(
        dir.join("manifest.json"),
        r#"{"version":1,"rollback":{"device":"/dev/null","root":"root","blank":"root-blank","oldRoots":"old_roots","persist":"persist","keep":5,"keepDays":7},"entries":[]}"#,
    )?;
    // Check that every contender finds the files before timing them.
    let counted = |cmd: &str| -> Result<usize> {
        Ok(sh(&format!("cd {t}/root && {cmd} 2>/dev/null | wc -l"))?.parse()?)
    };
    eprintln!(
        "xtask: lines printed: rasa btrfs {}, rasa walk {}, fs-diff.sh {}, find {}",
        counted(&rasa_cmd("btrfs"))?,
        counted(&rasa_cmd("walk"))?,
        if with_fs_diff {
            counted(&format!("bash {}", script.display()))?.to_string()
        } else {
            "(left out)".to_owned()
        },
        counted(&format!("find {t}/root"))?
    );
    // Peak memory: one run of each output of the btrfs engine under /usr/bin/time.
    println!("| `rasa diff --engine btrfs` output | wall [s] | max RSS [MB] |");
    println!("|:---|---:|---:|");
    let mut measured_cmds = Vec::new();
    for (build, rasa) in [
        ("", Some(rasa.display().to_string())),
        ("baseline ", baseline.clone()),
    ] {
        let Some(rasa) = rasa else { continue };
        let long = diff_cmd(&rasa, "btrfs");
        let summary = long.replace(" --long", "");
        measured_cmds.push((format!("{build}summary"), summary.clone()));
        measured_cmds.push((format!("{build}--long"), long));
        measured_cmds.push((format!("{build}--json"), format!("{summary} --json")));
    }
    measured_cmds.push(("find".to_owned(), format!("find {t}/root")));
    for (name, cmd) in measured_cmds {
        let measured = sh(&format!(
            "/usr/bin/time -f '%e %M' sh -c '{cmd} >/dev/null 2>/dev/null' 2>&1 | tail -1"
        ))?;
        let mut fields = measured.split_whitespace();
        let (wall, kib) = (fields.next().unwrap_or("?"), fields.next().unwrap_or("0"));
        println!(
            "| {name} | {wall} | {:.1} |",
            kib.parse::<f64>().unwrap_or(0.0) / 1024.0
        );
    }
    let markdown = dir.join("results.md");
    let json = dir.join("results.json");
    let mut hyperfine = Command::new("hyperfine");
    if with_fs_diff {
        hyperfine
            .args(["-n", "fs-diff.sh (seed 004)"])
            .arg(format!("cd {t}/root && bash {}", script.display()));
    }
    deps::run(
        hyperfine
            .args(["--warmup", "2", "--style", "basic"])
            .args(["--min-runs", &runs.to_string()])
            .arg("--export-markdown")
            .arg(&markdown)
            .arg("--export-json")
            .arg(&json)
            .args(["-n", "rasa diff --engine btrfs"])
            .arg(rasa_cmd("btrfs"))
            .args(["-n", "rasa diff --engine walk"])
            .arg(rasa_cmd("walk"))
            .args(baseline.iter().flat_map(|b| {
                [
                    "-n".to_owned(),
                    "baseline rasa diff --engine btrfs".to_owned(),
                    diff_cmd(b, "btrfs"),
                ]
            }))
            .args(["-n", "find"])
            .arg(format!("find {t}/root"))
            // What rasa prints per path (type and size) needs a stat of every entry, which
            // plain find does not do: this is find doing the same work, for context.
            .args(["-n", "find -printf '%y %s %p'"])
            .arg(format!("find {t}/root -printf '%y %s %p\\n'")),
    )?;
    let table = std::fs::read_to_string(&markdown)?;
    println!("\n{table}");
    // The machine this runs on is shared: a neighbour's I/O can stall a run for seconds, which
    // wrecks the mean. The median says what a run usually costs.
    let medians = medians(&std::fs::read_to_string(&json)?);
    let of = |name: &str| medians.iter().find(|(n, _)| n == name).map(|(_, m)| *m);
    if let Some(find) = of("find") {
        let fs_diff = of("fs-diff.sh (seed 004)");
        println!("| Command | Median [ms] | vs fs-diff.sh | vs find |");
        println!("|:---|---:|---:|---:|");
        for (name, median) in &medians {
            println!(
                "| `{name}` | {:.1} | {} | {:.2}x |",
                median * 1e3,
                fs_diff.map_or("-".to_owned(), |f| format!("{:.1}x faster", f / median)),
                median / find
            );
        }
    }
    println!(
        "({files} new files in {dirs} directories; kernel {})",
        sh("uname -r")?
    );

    if !with_tmpfs {
        return Ok(());
    }
    // The walk exists for roots that are not btrfs: time it where it is meant to run, on a
    // tmpfs holding the same tree, against find there.
    let tmpfs = dir.join("tmpfs");
    std::fs::create_dir(&tmpfs)?;
    sh(&format!("mount -t tmpfs rasa-bench '{}'", tmpfs.display()))?;
    let tmpfs_mount = Unmount(tmpfs.clone());
    sh(&format!("cp -a {t}/root/. '{}'", tmpfs.display()))?;
    let m = tmpfs.display();
    let walk_tmpfs = format!("{} --live-root {m}", rasa_cmd("walk"));
    eprintln!(
        "xtask: on tmpfs, lines printed: rasa walk {}, find {}",
        counted(&walk_tmpfs)?,
        counted(&format!("find {m}"))?
    );
    let markdown = dir.join("results-tmpfs.md");
    deps::run(
        Command::new("hyperfine")
            .args(["--warmup", "2", "--min-runs", "10", "--style", "basic"])
            .arg("--export-markdown")
            .arg(&markdown)
            .args(["-n", "rasa diff --engine walk (tmpfs)"])
            .arg(&walk_tmpfs)
            .args(["-n", "find (tmpfs)"])
            .arg(format!("find {m}"))
            .args(["-n", "find -printf '%y %s %p' (tmpfs)"])
            .arg(format!("find {m} -printf '%y %s %p\\n'")),
    )?;
    println!("\n{}", std::fs::read_to_string(&markdown)?);
    drop(tmpfs_mount);
    drop(fixture);
    Ok(())
}

/// Unmounts on the way out, before the fixture removes the directory.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// (command name, median seconds) from hyperfine's JSON, without a JSON parser in xtask.
fn medians(json: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let mut rest = json;
    while let Some(at) = rest.find("\"command\": \"") {
        rest = &rest[at + 12..];
        let Some(end) = rest.find('"') else { break };
        let name = rest[..end].to_owned();
        let Some(m) = rest.find("\"median\": ") else {
            break;
        };
        let tail = &rest[m + 10..];
        let number: String = tail
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == 'e' || *c == '-')
            .collect();
        if let Ok(value) = number.parse() {
            out.push((name, value));
        }
    }
    out
}

/// `cargo xtask bench diff-fuzz [--seeds N | --seed S]`: the random-tree test of
/// tests/diff.rs (both engines against a ground truth) over many seeds instead of the two
/// that every test run checks. A failure names its seed; `--seed S` replays just that one.
pub fn fuzz(args: &[String]) -> Result<()> {
    if !deps::nix_is_root() {
        bail!("the diff fuzz run needs root (loop devices, mount, btrfs tree search)");
    }
    deps::apt(&["btrfs-progs", "acl", "attr"])?;
    let mut cmd = Command::new("cargo");
    cmd.args([
        "test",
        "-p",
        "rasa",
        "--features",
        "failpoints",
        "--test",
        "diff",
        "random_trees_match_the_ground_truth",
        "--",
        "--exact",
        "--nocapture",
    ])
    .current_dir(crate::project_root())
    // A run that skipped (no root, no loop device) must not look like a pass.
    .env("RASA_REQUIRE_PRIVILEGED_TESTS", "1");
    let seeds = if args.iter().any(|a| a == "--seed") {
        let seed = arg_value(args, "--seed", 1)?;
        cmd.env("RASA_DIFF_FUZZ_SEED", seed.to_string());
        1
    } else {
        let seeds = arg_value(args, "--seeds", 200)?;
        cmd.env("RASA_DIFF_FUZZ_SEEDS", seeds.to_string());
        seeds
    };
    let started = std::time::Instant::now();
    deps::run(&mut cmd)?;
    println!(
        "diff-fuzz: {seeds} seed(s), both engines matched the ground truth, in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
