//! `cargo xtask bench migrate`: `rasa migrate --apply` against `cp -a` and `rsync -aHAX`,
//! copying 1.3 GB in 20,000 files from the live root into storage, on the same btrfs (another
//! subvolume: reflinks) and onto another filesystem (ext4 on a second loop file: byte copies).
//!
//! The data set is generated once into a loop-file image under target/bench-migrate/ and reused
//! by later runs (delete that directory to regenerate). Every timed run includes a final `sync`,
//! because rasa syncs each entry before publishing it and `cp`/`rsync` would otherwise be timed
//! without writing anything back. The source is read once before timing, so every tool starts
//! from the same warm page cache. Each tool runs `--rounds` times (default 5), interleaved, and
//! the median is reported.
//!
//! `cargo xtask bench migrate --rerun-sparse [--rounds N]` measures only the rerun of a 256 GiB
//! sparse VM image with 64 MiB of data, already stored once on the same btrfs (a reflink) and on
//! ext4 (a byte copy that keeps the holes): the dry run that compares it with its stored copy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::sh;

use crate::project_root;

const FILES: u64 = 20_000;
const TOTAL_BYTES: u64 = 1_300_000_000;
const MARKER: &str = ".bench-data-complete";

/// A loop device attached to an image, detached (and its mounts undone) on drop.
struct Loop {
    device: String,
    mounts: Vec<PathBuf>,
}

impl Loop {
    fn attach(image: &Path) -> Result<Loop> {
        let device = sh(&format!("losetup -f --show '{}'", image.display()))?
            .trim()
            .to_owned();
        Ok(Loop {
            device,
            mounts: Vec::new(),
        })
    }
    fn mount(&mut self, options: &str, at: &Path) -> Result<()> {
        std::fs::create_dir_all(at)?;
        sh(&format!(
            "mount {options} {} '{}'",
            self.device,
            at.display()
        ))?;
        self.mounts.push(at.to_path_buf());
        Ok(())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg(m).output();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
    }
}

/// xorshift64*: deterministic, fast, incompressible enough for a copy benchmark.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// 20,000 files in 200 directories: most small, some medium, a few large, 1.3 GB in all.
fn generate(root: &Path) -> Result<()> {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut sizes: Vec<u64> = (0..FILES)
        .map(|_| {
            let r = rng.next() % 1000;
            let span = |lo: u64, hi: u64, x: u64| lo + x % (hi - lo);
            let x = rng.next();
            if r < 800 {
                span(512, 16 << 10, x)
            } else if r < 980 {
                span(16 << 10, 512 << 10, x)
            } else {
                span(512 << 10, 8 << 20, x)
            }
        })
        .collect();
    let sum: u64 = sizes.iter().sum();
    // Scale to the exact total.
    for s in &mut sizes {
        *s = *s * TOTAL_BYTES / sum;
    }
    let scaled: u64 = sizes.iter().sum();
    sizes[0] += TOTAL_BYTES - scaled;
    let mut buffer = vec![0u8; 8 << 20];
    for (i, size) in sizes.iter().enumerate() {
        let dir = root.join(format!("d{:02}/e{:02}", i % 20, (i / 20) % 10));
        if i < 200 {
            std::fs::create_dir_all(&dir)?;
        }
        let n = *size as usize;
        let filled = n.min(buffer.len());
        for chunk in buffer[..filled].chunks_mut(8) {
            let v = rng.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        let mut written = 0;
        let mut file = std::fs::File::create(dir.join(format!("f{i:05}.dat")))?;
        while written < n {
            let k = (n - written).min(buffer.len());
            std::io::Write::write_all(&mut file, &buffer[..k])?;
            written += k;
        }
    }
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn timed(cmd: &str) -> Result<Duration> {
    let start = Instant::now();
    sh(&format!("{cmd} && sync"))?;
    Ok(start.elapsed())
}

pub fn run(args: &[String]) -> Result<()> {
    let rounds: usize = match args.iter().position(|a| a == "--rounds") {
        Some(i) => args
            .get(i + 1)
            .context("--rounds needs a number")?
            .parse()?,
        None => 5,
    };
    if !crate::deps::nix_is_root() {
        bail!("the migrate benchmark needs root (loop devices, mount)");
    }
    crate::deps::apt(&["btrfs-progs", "rsync", "e2fsprogs", "coreutils"])?;
    let root = project_root();
    let rasa = super::release_rasa()?;
    let work = root.join("target/bench-migrate");
    std::fs::create_dir_all(&work)?;
    if args.iter().any(|a| a == "--rerun-sparse") {
        return rerun_sparse(&rasa, &work, rounds);
    }
    let btrfs_image = work.join("btrfs.img");
    let ext4_image = work.join("ext4.img");

    let fresh = !btrfs_image.exists();
    if fresh {
        std::fs::File::create(&btrfs_image)?.set_len(8 << 30)?;
        std::fs::File::create(&ext4_image)?.set_len(6 << 30)?;
    }
    let mut fs = Loop::attach(&btrfs_image)?;
    if fresh {
        sh(&format!("mkfs.btrfs -q -f {}", fs.device))?;
    }
    let top = work.join("top");
    fs.mount("-o subvolid=5", &top)?;
    for subvolume in ["root", "persist"] {
        if !top.join(subvolume).exists() {
            sh(&format!(
                "btrfs -q subvolume create '{}'",
                top.join(subvolume).display()
            ))?;
        }
    }
    let live = top.join("root");
    let data = live.join("srv/bench");
    if !data.join(MARKER).exists() {
        eprintln!("xtask: generating 1.3 GB in 20,000 files (once; reused by later runs)");
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data)?;
        generate(&data)?;
        std::fs::write(data.join(MARKER), b"")?;
        sh("sync")?;
    }
    let mut ext4 = Loop::attach(&ext4_image)?;
    if fresh {
        sh(&format!("mkfs.ext4 -q -F {}", ext4.device))?;
    }
    let ext4_mnt = work.join("ext4");
    ext4.mount("", &ext4_mnt)?;

    let stat = sh(&format!(
        "find '{}' -type f | wc -l; du -sb --apparent-size '{}' | cut -f1",
        data.display(),
        data.display()
    ))?;
    eprintln!("xtask: data set: {} files, bytes", stat.replace('\n', " "));
    // Warm the page cache so every tool starts from the same state.
    sh(&format!(
        "find '{}' -type f -exec cat {{}} + > /dev/null",
        data.display()
    ))?;

    let manifest = work.join("manifest.json");
    std::fs::write(
        &manifest,
        r#"{"version": 1,
  "rollback": {"device": "/dev/null", "root": "root", "blank": "root-blank",
    "oldRoots": "old_roots", "persist": "persist", "keep": 5, "keepDays": 7},
  "entries": [{"storageRoot": "/persist", "path": "/srv/bench", "kind": "directory",
               "user": "root", "group": "root", "mode": "0755"}]}"#,
    )?;
    // The storage root, as rasa sees it under --live-root: the persist subvolume (same
    // filesystem) or the ext4 filesystem, bind-mounted at <live>/persist.
    let storage = live.join("persist");
    std::fs::create_dir_all(&storage)?;

    let mut results = Vec::new();
    for (label, target) in [
        ("same btrfs (another subvolume)", top.join("persist")),
        ("another filesystem (ext4)", ext4_mnt.clone()),
    ] {
        sh(&format!(
            "mount --bind '{}' '{}'",
            target.display(),
            storage.display()
        ))?;
        let clean = || -> Result<()> {
            sh(&format!(
                "rm -rf '{0}/srv' '{0}/.rasa' '{0}/cp' '{0}/rsync'",
                storage.display()
            ))?;
            sh("sync")?;
            Ok(())
        };
        let tools: [(&str, String); 3] = [
            (
                "rasa migrate --apply",
                format!(
                    "'{}' migrate --apply --manifest '{}' --live-root '{}' > /dev/null 2>&1",
                    rasa.display(),
                    manifest.display(),
                    live.display()
                ),
            ),
            (
                "cp -a",
                format!(
                    "mkdir '{0}/cp' && cp -a '{1}' '{0}/cp/'",
                    storage.display(),
                    data.display()
                ),
            ),
            (
                "rsync -aHAX",
                format!(
                    "mkdir '{0}/rsync' && rsync -aHAX '{1}' '{0}/rsync/'",
                    storage.display(),
                    data.display()
                ),
            ),
        ];
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); tools.len()];
        let result = (|| -> Result<()> {
            for round in 0..rounds {
                for (i, (name, cmd)) in tools.iter().enumerate() {
                    clean()?;
                    let t = timed(cmd)?;
                    eprintln!(
                        "xtask: {label}: round {}: {name}: {:.2} s",
                        round + 1,
                        t.as_secs_f64()
                    );
                    times[i].push(t);
                }
            }
            // Check rasa's copy is complete (the last round's copies were cleaned; redo one).
            clean()?;
            sh(&tools[0].1)?;
            let n = sh(&format!(
                "find '{}/srv/bench' -type f | wc -l",
                storage.display()
            ))?;
            if n.trim().parse::<u64>()? != FILES + 1 {
                bail!("rasa copied {} files, expected {}", n.trim(), FILES + 1);
            }
            clean()
        })();
        let _ = sh(&format!("umount '{}'", storage.display()));
        result?;
        let medians: Vec<Duration> = times.into_iter().map(median).collect();
        results.push((label, medians));
    }

    println!("\n| destination | rasa migrate --apply | cp -a | rsync -aHAX | rasa / cp -a | rsync / rasa |");
    println!("|---|---|---|---|---|---|");
    for (label, m) in &results {
        let (r, c, s) = (m[0].as_secs_f64(), m[1].as_secs_f64(), m[2].as_secs_f64());
        println!(
            "| {label} | {r:.2} s | {c:.2} s | {s:.2} s | {:.2}x | {:.1}x |",
            r / c,
            s / r
        );
    }
    println!(
        "\n1.3 GB in 20,000 files (+1 marker), median of {rounds} interleaved rounds, each \
         including a final sync; page cache warm."
    );
    Ok(())
}

const GIB: u64 = 1 << 30;

/// The rerun of a sparse 256 GiB image with 64 MiB of data, against its copy on the same btrfs
/// (shared extents: nothing to read) and on ext4 (the data is read, the holes are not).
fn rerun_sparse(rasa: &Path, work: &Path, rounds: usize) -> Result<()> {
    let dir = work.join("rerun-sparse");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (btrfs_image, ext4_image) = (dir.join("btrfs.img"), dir.join("ext4.img"));
    std::fs::File::create(&btrfs_image)?.set_len(2 * GIB)?;
    std::fs::File::create(&ext4_image)?.set_len(GIB)?;
    let mut fs = Loop::attach(&btrfs_image)?;
    sh(&format!("mkfs.btrfs -q -f {}", fs.device))?;
    let top = dir.join("top");
    fs.mount("-o subvolid=5", &top)?;
    let live = top.join("root");
    sh(&format!("btrfs -q subvolume create '{}'", live.display()))?;
    sh(&format!(
        "btrfs -q subvolume create '{}'",
        live.join("persist").display()
    ))?;
    let mut ext4 = Loop::attach(&ext4_image)?;
    sh(&format!("mkfs.ext4 -q -F {}", ext4.device))?;
    ext4.mount("", &live.join("ext4"))?;

    let image = live.join("srv/vm/disk.img");
    std::fs::create_dir_all(image.parent().unwrap())?;
    let file = std::fs::File::create(&image)?;
    file.set_len(256 * GIB)?;
    let mut rng = Rng(0x5EED_5BA2_5E00_0001);
    let mut piece = vec![0u8; 4 << 20];
    for i in 0..16u64 {
        for chunk in piece.chunks_mut(8) {
            chunk.copy_from_slice(&rng.next().to_le_bytes());
        }
        std::os::unix::fs::FileExt::write_all_at(&file, &piece, i * 16 * GIB)?;
    }
    drop(file);

    let mut results = Vec::new();
    for (label, storage) in [
        ("same btrfs (reflinked copy)", "/persist"),
        ("ext4 (byte copy, holes kept)", "/ext4"),
    ] {
        let manifest = dir.join(format!("manifest{}.json", storage.replace('/', "-")));
        std::fs::write(
            &manifest,
            format!(
                r#"{{"version": 1,
  "rollback": {{"device": "/dev/null", "root": "root", "blank": "root-blank",
    "oldRoots": "old_roots", "persist": "persist", "keep": 5, "keepDays": 7}},
  "entries": [{{"storageRoot": "{storage}", "path": "/srv/vm/disk.img", "kind": "file",
               "user": "root", "group": "root", "mode": "0755"}}]}}"#
            ),
        )?;
        let migrate = format!(
            "'{}' migrate --manifest '{}' --live-root '{}'",
            rasa.display(),
            manifest.display(),
            live.display()
        );
        sh(&format!("{migrate} --apply > /dev/null 2>&1 && sync"))?;
        let mut times = Vec::new();
        for round in 0..rounds {
            let start = Instant::now();
            let out = sh(&format!("{migrate} 2>/dev/null"))?;
            let t = start.elapsed();
            if !out.contains("identical                /srv/vm/disk.img") {
                bail!("the rerun did not find the copy identical:\n{out}");
            }
            eprintln!(
                "xtask: {label}: round {}: {:.1} ms",
                round + 1,
                t.as_secs_f64() * 1000.0
            );
            times.push(t);
        }
        results.push((label, median(times)));
    }
    println!("\n| stored copy | rerun (`rasa migrate`, dry run), median |");
    println!("|---|---|");
    for (label, t) in &results {
        println!("| {label} | {:.1} ms |", t.as_secs_f64() * 1000.0);
    }
    println!(
        "\nA 256 GiB sparse file with 64 MiB of data in 16 pieces, median of {rounds} runs, page \
         cache warm."
    );
    Ok(())
}
