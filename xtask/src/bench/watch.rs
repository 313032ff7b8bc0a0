//! `cargo xtask bench watch [--files N] [--runs N]`: what `rasa watch` costs a writer. The same
//! write-heavy workload (N small files created, written and then renamed, in 100 directories,
//! default 50,000) runs on the root subvolume of a loop-file btrfs, alternately without and
//! with `rasa watch` marking that filesystem. It prints the median times, the slowdown, the
//! watcher's peak RSS (VmHWM) and what its record says (lines kept, events dropped past the
//! cap, kernel queue overflows).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::sh;
use crate::deps;

const DIRS: usize = 100;

/// The loop file, its top level and its root subvolume mounted; all undone on drop.
struct Fixture {
    device: String,
    top: PathBuf,
    root: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.root).status();
        let _ = Command::new("umount").arg(&self.top).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// The watcher, killed on drop if something failed before it was stopped.
struct Watcher(Child);

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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

/// Create, write and rename `files` files under `dir/srv/bench` (a path the watcher records:
/// not a runtime directory), then remove them (untimed).
fn workload(dir: &Path, files: usize) -> Result<(Duration, Duration)> {
    let base = dir.join("srv/bench");
    sh("sync")?;
    let cpu = cpu_time("self")?;
    let started = Instant::now();
    for d in 0..DIRS {
        std::fs::create_dir_all(base.join(format!("d{d:03}")))?;
    }
    for f in 0..files {
        let sub = base.join(format!("d{:03}", f % DIRS));
        let path = sub.join(format!("f{f}"));
        std::fs::write(&path, b"small state\n")?;
        std::fs::rename(&path, sub.join(format!("f{f}.renamed")))?;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time("self")? - cpu;
    std::fs::remove_dir_all(&base)?;
    sh("sync")?;
    Ok((elapsed, cpu))
}

/// User plus system CPU time of a process (`self` or a pid), from /proc/<pid>/stat (fields 14
/// and 15, in clock ticks of 10 ms). The kernel's fanotify work for an event is done in the
/// writer's system call, so it shows in the writer's system time; CPU time also hides most of
/// what other tenants of a shared machine do to wall-clock time.
fn cpu_time(pid: &str) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

fn vm_hwm_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/<pid>/status")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn run(args: &[String]) -> Result<()> {
    if !deps::nix_is_root() {
        bail!("the watch benchmark needs root (loop devices, mount, fanotify)");
    }
    let files = arg_value(args, "--files", 50_000)?;
    let runs = arg_value(args, "--runs", 5)?.max(1);
    deps::apt(&["btrfs-progs"])?;
    let project = crate::project_root();
    let rasa = super::release_rasa()?;

    let dir = project.join("target/bench-watch");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("disk.img");
    std::fs::File::create(&image)?.set_len(4 << 30)?;
    let device = sh(&format!("losetup -f --show '{}'", image.display()))?;
    let top = dir.join("top");
    let root = dir.join("root");
    std::fs::create_dir(&top)?;
    std::fs::create_dir(&root)?;
    let fixture = Fixture {
        device: device.clone(),
        top: top.clone(),
        root: root.clone(),
    };
    sh(&format!("mkfs.btrfs -q -f {device}"))?;
    sh(&format!("mount -o subvolid=5 {device} '{}'", top.display()))?;
    sh(&format!(
        "btrfs -q subvolume create '{0}/root' && btrfs -q subvolume create '{0}/persist'",
        top.display()
    ))?;
    sh(&format!(
        "mount -o subvol=root {device} '{}'",
        root.display()
    ))?;
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        r#"{"version": 1, "rollback": {"device": "/dev/null", "root": "root", "blank": null,
            "oldRoots": "old_roots", "persist": "persist", "keep": 1, "keepDays": 1},
            "entries": [], "diffIgnore": []}"#,
    )?;
    let record = dir.join("watch.jsonl");

    // A warm-up run that is not counted (directory creation, first allocations).
    workload(&root, files / 10)?;
    let mut without = Vec::new();
    let mut with = Vec::new();
    let mut peaks = Vec::new();
    let mut watcher_cpu = Vec::new();
    let mut headers = Vec::new();
    for run in 0..runs {
        eprintln!(
            "xtask: run {}/{runs}: {files} files without the watcher",
            run + 1
        );
        without.push(workload(&root, files)?);
        eprintln!(
            "xtask: run {}/{runs}: {files} files with the watcher",
            run + 1
        );
        let _ = std::fs::remove_file(&record);
        let mut watcher = Watcher(
            Command::new(&rasa)
                .arg("watch")
                .arg("--root")
                .arg(&root)
                .arg("--record")
                .arg(&record)
                .arg("--manifest")
                .arg(&manifest)
                .args(["--flush-interval", "1"])
                .env("NO_COLOR", "1")
                .spawn()
                .context("starting rasa watch")?,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !record.exists() {
            if Instant::now() > deadline || watcher.0.try_wait()?.is_some() {
                bail!("rasa watch did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        with.push(workload(&root, files)?);
        let pid = watcher.0.id();
        // The peak so far, just before the stop: with --flush-interval 1 the record has been
        // written (and its memory used) during the run already.
        std::thread::sleep(Duration::from_millis(1500));
        peaks.push(vm_hwm_kib(pid)?);
        watcher_cpu.push(cpu_time(&pid.to_string())?);
        sh(&format!("kill -TERM {pid}"))?;
        let status = watcher.0.wait()?;
        if !status.success() {
            bail!("rasa watch exited with {status}");
        }
        let text = std::fs::read_to_string(&record)?;
        let header: serde_json::Value =
            serde_json::from_str(text.lines().next().context("empty record")?)?;
        headers.push(header);
    }
    drop(fixture);

    let ms = |v: &[Duration]| v.iter().map(|d| d.as_millis()).collect::<Vec<_>>();
    let slowdown = |a: Duration, b: Duration| (b.as_secs_f64() / a.as_secs_f64() - 1.0) * 100.0;
    let wall = |v: &[(Duration, Duration)]| v.iter().map(|r| r.0).collect::<Vec<_>>();
    let cpu = |v: &[(Duration, Duration)]| v.iter().map(|r| r.1).collect::<Vec<_>>();
    println!("workload: {files} files created, written and renamed in {DIRS} directories, {runs} runs each, alternating");
    for (what, a, b) in [
        ("wall-clock", wall(&without), wall(&with)),
        ("writer CPU (user+sys)", cpu(&without), cpu(&with)),
    ] {
        let (ma, mb) = (median(a.clone()), median(b.clone()));
        println!(
            "{what}: without {ma:?} (runs {:?} ms), with {mb:?} (runs {:?} ms): {:+.1}%",
            ms(&a),
            ms(&b),
            slowdown(ma, mb)
        );
    }
    println!("watcher CPU (user+sys) per run: {:?} ms", ms(&watcher_cpu));
    println!(
        "watcher peak RSS (VmHWM): {} KiB (per run: {peaks:?})",
        peaks.iter().max().copied().unwrap_or(0)
    );
    for header in headers {
        println!(
            "record: entries {} (cap {}), dropped past the cap {}, queue overflows {}",
            header["entries"],
            header["maxEntries"],
            header["droppedEvents"],
            header["queueOverflows"]
        );
    }
    Ok(())
}
