//! Fixtures for tests on real btrfs: a loop-file filesystem per test, torn down on drop.
//!
//! These tests need root (mount, losetup, btrfs ioctls) and btrfs-progs (mkfs.btrfs). Where
//! either is missing they are skipped *visibly*: the reason goes to stderr and to
//! `target/tmp/rasa-skipped.txt`, which `cargo xtask test` prints at the end. With
//! RASA_REQUIRE_PRIVILEGED_TESTS=1 (set by CI) a skip is a failure instead, so CI can never pass
//! by skipping.

#![allow(dead_code)]

pub mod fidelity;

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

    /// Where `rasa rollback` run through `rasa`/`rasa_env` records its outcome (and `rasa diff
    /// --prometheus` reads it).
    pub fn record_file(&self) -> PathBuf {
        self.dir.path().join("run/rollback.json")
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
            .env_remove("JOURNAL_STREAM")
            // The rollback record goes beside the disk image, not into this machine's /run.
            .env("RASA_ROLLBACK_RECORD", self.record_file());
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

/// Shell-quote a path.
pub fn quoted(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// A live root at `<top>/root` for `rasa migrate`, with the storage root `/persist` as a nested
/// subvolume (same filesystem: reflinks) or, with `cross_fs`, an ext4 filesystem mounted there
/// (byte copies).
/// The text of a manifest of the standard test layout (root, root-blank, old_roots, persist)
/// with these entries (JSON objects, comma-separated).
#[allow(dead_code)] // not every test binary writes manifests
pub fn manifest_text(entries: &str) -> String {
    format!(
        r#"{{"version": 1,
  "rollback": {{"device": "/dev/null", "root": "root", "blank": "root-blank",
    "oldRoots": "old_roots", "persist": "persist", "keep": 5, "keepDays": 7}},
  "entries": [{entries}],
  "diffIgnore": []}}"#
    )
}

pub struct LiveRoot {
    pub fs: LoopBtrfs,
    pub live: PathBuf,
    ext4: Option<PathBuf>,
}

impl LiveRoot {
    pub fn new(test: &str, cross_fs: bool) -> Option<LiveRoot> {
        let fs = LoopBtrfs::new(test, 400)?;
        fs.subvolume("root");
        let live = fs.path("root");
        let persist = live.join("persist");
        let mut ext4 = None;
        if cross_fs {
            let image = fs.dir.path().join("ext4.img");
            std::fs::File::create(&image)
                .unwrap()
                .set_len(200 << 20)
                .unwrap();
            let dev = PathBuf::from(sh(&format!("losetup -f --show {}", quoted(&image))).trim());
            sh(&format!("mkfs.ext4 -q -F {}", dev.display()));
            std::fs::create_dir(&persist).unwrap();
            sh(&format!("mount {} {}", dev.display(), quoted(&persist)));
            ext4 = Some(dev);
        } else {
            sh(&format!("btrfs -q subvolume create {}", quoted(&persist)));
        }
        Some(LiveRoot { fs, live, ext4 })
    }

    /// A manifest with these entries (JSON objects, comma-separated).
    pub fn manifest(&self, entries: &str) -> PathBuf {
        let path = self.fs.dir.path().join("manifest.json");
        std::fs::write(&path, manifest_text(entries)).unwrap();
        path
    }

    /// `rasa migrate` on this live root (add `--apply` to copy).
    pub fn migrate(&self, manifest: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new(RASA);
        cmd.arg("migrate")
            .arg("--manifest")
            .arg(manifest)
            .arg("--live-root")
            .arg(&self.live)
            .args(extra)
            .env("NO_COLOR", "1")
            .env_remove("JOURNAL_STREAM");
        cmd
    }
}

impl Drop for LiveRoot {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(self.live.join("persist"))
            .output();
        if let Some(dev) = &self.ext4 {
            let _ = Command::new("losetup").arg("-d").arg(dev).status();
        }
    }
}

/// Run `cmd` (a rasa built with failpoints, `RASA_FAILPOINT=<step>`) with the `stop` action:
/// each time the step is reached the process stops itself, `at_stop` looks at (or changes) the
/// disk, and the process goes on. Returns the exit status, the stderr text and the number of
/// stops; stdout is in `stdout` (keep it small: it is read after the end).
pub fn run_stopping_at(
    cmd: Command,
    step: &str,
    at_stop: impl FnMut(usize),
) -> (std::process::ExitStatus, String, usize) {
    let (status, text, stops, _) = run_stopping_at_with_stdout(cmd, step, at_stop);
    (status, text, stops)
}

/// A child process that is killed (even while stopped) and reaped if the test panics, so that it
/// does not keep the test's filesystems busy.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `run_stopping_at`, also returning what the command printed on stdout.
pub fn run_stopping_at_with_stdout(
    mut cmd: Command,
    step: &str,
    mut at_stop: impl FnMut(usize),
) -> (std::process::ExitStatus, String, usize, String) {
    use nix::sys::signal::{kill, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use nix::unistd::Pid;
    use std::io::BufRead;
    let mut child = KillOnDrop(Some(
        cmd.env("RASA_FAILPOINT", step)
            .env("RASA_FAILPOINT_ACTION", "stop")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run rasa"),
    ));
    let child_ref = child.0.as_mut().unwrap();
    let mut out = child_ref.stdout.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut v = String::new();
        std::io::Read::read_to_string(&mut out, &mut v).unwrap();
        v
    });
    let pid = Pid::from_raw(child_ref.id() as i32);
    let mut reader = std::io::BufReader::new(child_ref.stderr.take().unwrap());
    let (mut text, mut stops) = (String::new(), 0);
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        if line.contains("RASA-FAILPOINT-REACHED") {
            // Wait until it has really stopped, so that SIGCONT cannot come first.
            match waitpid(pid, Some(WaitPidFlag::WUNTRACED)).unwrap() {
                WaitStatus::Stopped(..) => {}
                other => panic!("expected a stop at {step}, got {other:?}"),
            }
            at_stop(stops);
            stops += 1;
            kill(pid, Signal::SIGCONT).unwrap();
        }
        text.push_str(&line);
        line.clear();
    }
    let status = child.0.take().unwrap().wait().unwrap();
    (status, text, stops, out_reader.join().unwrap())
}

/// Run `cmd` to its end and return its output and how many bytes it read with read-like system
/// calls (`rchar` of /proc/<pid>/io, read from the exited child before it is reaped).
pub fn run_counting_reads(mut cmd: Command) -> (Output, u64) {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    use std::io::Read;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run rasa");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).unwrap();
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        err.read_to_end(&mut v).unwrap();
        v
    });
    waitid(
        Id::Pid(nix::unistd::Pid::from_raw(child.id() as i32)),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
    )
    .unwrap();
    let io = std::fs::read_to_string(format!("/proc/{}/io", child.id())).unwrap();
    let rchar = io
        .lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("rchar in /proc/<pid>/io");
    let status = child.wait().unwrap();
    let output = Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    };
    (output, rchar)
}

/// The POSIX ACL entries of a `system.posix_acl_*` xattr value: (tag, permissions, id).
pub fn parse_acl(value: &[u8]) -> Vec<(u16, u32, u32)> {
    assert_eq!(&value[..4], &2u32.to_le_bytes(), "ACL xattr version 2");
    value[4..]
        .chunks_exact(8)
        .map(|e| {
            (
                u16::from_le_bytes([e[0], e[1]]),
                u32::from(u16::from_le_bytes([e[2], e[3]])),
                u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            )
        })
        .collect()
}

/// What a (non-root) user with these groups may do with the file at `path` (rwx as 0..=7), by
/// the kernel's rules: the owner class, the ACL's named users and groups limited by its mask,
/// the owning group, or other. Reads the mode and `system.posix_acl_access` from the disk.
pub fn access_of(path: &Path, uid: u32, gids: &[u32]) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).unwrap();
    let mode = meta.mode();
    if meta.uid() == uid {
        return (mode >> 6) & 7;
    }
    let acl = xattr::get(path, "system.posix_acl_access")
        .unwrap()
        .map(|v| parse_acl(&v));
    let Some(acl) = acl else {
        if gids.contains(&meta.gid()) {
            return (mode >> 3) & 7;
        }
        return mode & 7;
    };
    const USER: u16 = 2;
    const GROUP_OBJ: u16 = 4;
    const GROUP: u16 = 8;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    let mask = acl.iter().find(|e| e.0 == MASK).map_or(7, |e| e.1);
    if let Some(e) = acl.iter().find(|e| e.0 == USER && e.2 == uid) {
        return e.1 & mask;
    }
    let groups: Vec<u32> = acl
        .iter()
        .filter(|e| {
            (e.0 == GROUP_OBJ && gids.contains(&meta.gid()))
                || (e.0 == GROUP && gids.contains(&e.2))
        })
        .map(|e| e.1 & mask)
        .collect();
    if !groups.is_empty() {
        return groups.iter().fold(0, |a, p| a | p);
    }
    acl.iter().find(|e| e.0 == OTHER).map_or(0, |e| e.1)
}

/// The users and groups whose access to `path` is worth checking: its owner and group, every
/// named user and group of its ACLs, and a stranger. Root is left out (it bypasses all of it).
pub fn principals(path: &Path) -> Vec<(u32, Vec<u32>)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).unwrap();
    let mut out = vec![
        (meta.uid(), vec![meta.gid()]),
        (4242, vec![meta.gid()]),
        (4242, vec![4242]),
    ];
    for name in ["system.posix_acl_access", "system.posix_acl_default"] {
        if let Ok(Some(v)) = xattr::get(path, name) {
            for (tag, _, id) in parse_acl(&v) {
                match tag {
                    2 => out.push((id, vec![4242])),
                    8 => out.push((4242, vec![id])),
                    _ => {}
                }
            }
        }
    }
    out.retain(|(uid, _)| *uid != 0);
    out
}

/// Every path below `root` (itself included, as ""), parents before children.
pub fn tree_paths(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = root.join(&rel);
        if let Ok(meta) = std::fs::symlink_metadata(&full) {
            if meta.is_dir() {
                let mut names: Vec<_> = std::fs::read_dir(&full)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                names.sort();
                for n in names.into_iter().rev() {
                    stack.push(rel.join(n));
                }
            }
            out.push(rel);
        }
    }
    out
}
