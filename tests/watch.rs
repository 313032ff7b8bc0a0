//! `rasa watch` on real btrfs with real cgroups: a writer placed in a cgroup named like a unit
//! (`system.slice/rasa-test-writer.service`) is attributed to that unit, a writer in no unit to
//! its command, a writer gone before the watcher looked to "unknown"; persisted, ignored and
//! the record's own paths stay out; the record is bounded; and a stopped watcher blocks nobody.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::{sh, skip, LoopBtrfs, RASA};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const MANIFEST: &str = r#"{
  "version": 1,
  "rollback": { "device": "/dev/null", "root": "root", "blank": null, "oldRoots": "old_roots",
                "persist": "persist", "keep": 5, "keepDays": 7 },
  "entries": [
    { "storageRoot": "/persist", "path": "/var/lib/nixos", "kind": "directory", "user": "root", "group": "root", "mode": "0755" }
  ],
  "diffIgnore": ["/var/cache/**"]
}"#;

const CGROUP2: &str = "/sys/fs/cgroup/unified";
const UNIT: &str = "rasa-test-writer.service";

/// A cgroup under cgroup2's system.slice named like a unit, removed on drop (its processes are
/// moved back to the root cgroup first, so the rmdir works even after a failed assertion).
struct UnitCgroup {
    dir: PathBuf,
    created_slice: Option<PathBuf>,
}

impl UnitCgroup {
    fn new(test: &str) -> Option<UnitCgroup> {
        if !Path::new(CGROUP2).join("cgroup.procs").exists() {
            return skip(test, &format!("no cgroup2 hierarchy at {CGROUP2}"));
        }
        let slice = Path::new(CGROUP2).join("system.slice");
        let created_slice = (!slice.exists()).then(|| slice.clone());
        let dir = slice.join(UNIT);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return skip(
                test,
                &format!("cannot create cgroup {}: {e}", dir.display()),
            );
        }
        Some(UnitCgroup { dir, created_slice })
    }

    fn unit(&self) -> String {
        self.dir.file_name().unwrap().to_string_lossy().into_owned()
    }

    fn enter(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .expect("moving the writer into its cgroup");
    }
}

impl Drop for UnitCgroup {
    fn drop(&mut self) {
        let root_procs = Path::new(CGROUP2).join("cgroup.procs");
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(&root_procs, pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(slice) = &self.created_slice {
            let _ = std::fs::remove_dir(slice);
        }
    }
}

/// A mount of the `root` subvolume, as / is mounted on a real system (not the top level).
struct RootMount(PathBuf);

impl Drop for RootMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A child process killed (and reaped) on drop, whatever happened.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The fixture: loop btrfs with `root` and `persist` subvolumes, `root` mounted on its own.
fn setup(test: &str) -> Option<(LoopBtrfs, RootMount, PathBuf)> {
    let fs = LoopBtrfs::new(test, 300)?;
    fs.subvolume("root");
    fs.subvolume("persist");
    for dir in ["etc", "var/lib/nixos", "var/cache"] {
        std::fs::create_dir_all(fs.path("root").join(dir)).unwrap();
    }
    let mnt = fs.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    sh(&format!(
        "mount -o subvol=root {} {}",
        fs.device.display(),
        mnt.display()
    ));
    let manifest = fs.dir.path().join("manifest.json");
    std::fs::write(&manifest, MANIFEST).unwrap();
    Some((fs, RootMount(mnt), manifest))
}

/// Start the watcher and wait until its mark is in place (it writes the record once then).
fn start_watch(mnt: &Path, record: &Path, manifest: &Path, extra: &[&str]) -> Running {
    start_watch_env(mnt, record, manifest, extra, &[])
}

fn start_watch_env(
    mnt: &Path,
    record: &Path,
    manifest: &Path,
    extra: &[&str],
    env: &[(&str, &Path)],
) -> Running {
    let child = Command::new(RASA)
        .arg("watch")
        .arg("--root")
        .arg(mnt)
        .arg("--record")
        .arg(record)
        .arg("--manifest")
        .arg(manifest)
        .args(extra)
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .spawn()
        .expect("starting rasa watch");
    let mut watcher = Running(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !record.exists() {
        if let Some(status) = watcher.0.try_wait().unwrap() {
            panic!("rasa watch exited before watching: {status}");
        }
        assert!(Instant::now() < deadline, "rasa watch did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    watcher
}

/// SIGTERM, then the exit status and the record it wrote last.
fn stop_watch(mut watcher: Running, record: &Path) -> Vec<Value> {
    kill(Pid::from_raw(watcher.0.id() as i32), Signal::SIGTERM).unwrap();
    let status = watcher.0.wait().unwrap();
    assert!(status.success(), "rasa watch exited with {status}");
    let text = std::fs::read_to_string(record).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A Perl process that waits for a line on stdin before running `script`, prints `done`, and
/// then waits again: one long-lived process does every write, so it is still there when the
/// watcher looks it up (a short-lived child that has exited by then is "unknown", which the
/// test shows separately). Perl is in every Debian (perl-base is essential).
fn writer(mnt: &Path, script: &str) -> (Running, ChildStdin, BufReader<ChildStdout>) {
    let mut child = Command::new("perl")
        .arg("-e")
        .arg(format!(
            "$| = 1; my $go = <STDIN>; {script}; print \"done\\n\"; my $end = <STDIN>;"
        ))
        .current_dir(mnt)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running perl");
    let stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    (Running(child), stdin, stdout)
}

fn go(stdin: &mut ChildStdin, stdout: &mut BufReader<ChildStdout>) {
    writeln!(stdin, "go").unwrap();
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done", "the writer failed");
}

/// (writer, kind, events) of each line for `path`.
fn writers_of(lines: &[Value], path: &str) -> Vec<(String, String, Vec<String>)> {
    lines[1..]
        .iter()
        .filter(|l| l["path"] == path)
        .map(|l| {
            (
                l["writer"].as_str().unwrap().to_owned(),
                l["kind"].as_str().unwrap().to_owned(),
                l["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect()
}

fn events(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Is this test process itself in a systemd unit (then its children are attributed to that)?
fn own_unit() -> Option<String> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let suffixes = [".service", ".scope", ".socket", ".mount", ".swap"];
    cgroup
        .lines()
        .filter(|l| l.starts_with("0::") || l.contains(":name=systemd:"))
        .filter_map(|l| {
            l.rsplit('/')
                .find(|p| suffixes.iter().any(|s| p.ends_with(s)))
        })
        .map(str::to_owned)
        .next()
}

#[test]
fn writes_are_attributed_to_the_unit_the_command_or_unknown() {
    let test = "writes_are_attributed_to_the_unit_the_command_or_unknown";
    let Some((fs, mount, manifest)) = setup(test) else {
        return;
    };
    let Some(cgroup) = UnitCgroup::new(test) else {
        return;
    };
    if Command::new("perl").arg("-v").output().is_err() {
        skip::<()>(
            test,
            "needs perl for the long-lived writer (apt-get install perl-base)",
        );
        return;
    }
    let mnt = mount.0.clone();
    let record = fs.dir.path().join("run/watch.jsonl");
    let watcher = start_watch(&mnt, &record, &manifest, &[]);

    // A service: creates, renames, chmods a file, makes a directory, writes persisted and
    // ignored paths (which must not appear).
    let (_unit_writer, mut stdin, mut stdout) = writer(
        &mnt,
        "sub put { open(my $f, '>', $_[0]) or die \"$_[0]: $!\"; print $f $_[1]; close $f } \
         put('etc/unit-file', 'a'); rename('etc/unit-file', 'etc/unit-renamed') or die; \
         chmod(0600, 'etc/unit-renamed') or die; mkdir('var/lib/unit-dir') or die; \
         put('var/lib/nixos/uid-map', 'p'); mkdir('var/lib/nixos/sub') or die; \
         put('var/cache/cached', 'c'); symlink('/nix/store/abc-x', 'etc/store-link') or die; \
         symlink('/persist/etc/kept', 'etc/persisted-link') or die; \
         symlink('/elsewhere', 'etc/other-link') or die",
    );
    cgroup.enter(_unit_writer.0.id());
    go(&mut stdin, &mut stdout);

    // A process in no unit: its command name. (Alive until the watcher stops, like the unit's
    // writer: a `touch` could exit before the watcher reads its cgroup, and be "unknown".)
    let (_plain_writer, mut stdin, mut stdout) =
        writer(&mnt, "open(my $f, '>', 'etc/plain-file') or die; close $f");
    go(&mut stdin, &mut stdout);

    // A writer gone before the watcher looks: the watcher is stopped (SIGSTOP) meanwhile, which
    // also shows that it never blocks a writer (notification events only).
    let watcher_pid = Pid::from_raw(watcher.0.id() as i32);
    kill(watcher_pid, Signal::SIGSTOP).unwrap();
    let mut gone = Command::new("sh")
        .arg("-c")
        .arg("echo x > etc/gone-file")
        .current_dir(&mnt)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = gone.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = gone.kill();
            let _ = kill(watcher_pid, Signal::SIGCONT);
            panic!("a writer was blocked while the watcher was stopped");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success());
    kill(watcher_pid, Signal::SIGCONT).unwrap();

    let lines = stop_watch(watcher, &record);
    drop(_unit_writer);
    let unit = cgroup.unit();
    let header = &lines[0];
    assert_eq!(header["rasaWatch"], 1);
    assert_eq!(
        header["entries"].as_u64().unwrap() as usize,
        lines.len() - 1
    );
    assert_eq!(header["droppedEvents"], 0);

    assert_eq!(
        writers_of(&lines, "/etc/unit-file"),
        vec![(
            unit.clone(),
            "unit".into(),
            events(&["create", "moveFrom", "write"])
        )]
    );
    assert_eq!(
        writers_of(&lines, "/etc/unit-renamed"),
        vec![(unit.clone(), "unit".into(), events(&["moveTo", "attrib"]))]
    );
    assert_eq!(
        writers_of(&lines, "/var/lib/unit-dir"),
        vec![(unit.clone(), "unit".into(), events(&["create"]))]
    );
    // Symlinks that `rasa diff` leaves out for their target are left out here too.
    assert_eq!(writers_of(&lines, "/etc/store-link"), vec![]);
    assert_eq!(writers_of(&lines, "/etc/persisted-link"), vec![]);
    assert_eq!(
        writers_of(&lines, "/etc/other-link"),
        vec![(unit.clone(), "unit".into(), events(&["create"]))]
    );
    let expected_plain = match own_unit() {
        Some(own) => (own, "unit".to_owned()),
        None => ("perl".to_owned(), "command".to_owned()),
    };
    let plain = writers_of(&lines, "/etc/plain-file");
    assert_eq!(plain.len(), 1, "{plain:?}");
    assert_eq!((plain[0].0.clone(), plain[0].1.clone()), expected_plain);
    let gone = writers_of(&lines, "/etc/gone-file");
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert_eq!(
        (gone[0].0.as_str(), gone[0].1.as_str()),
        ("unknown", "unknown")
    );

    for line in &lines[1..] {
        let path = line["path"].as_str().unwrap();
        for left_out in ["/var/lib/nixos", "/var/cache/", "/var/lib/rasa/watch"] {
            assert!(!path.starts_with(left_out), "{path} is recorded: {line}");
        }
    }

    // The copy inside the root: in the root subvolume itself (so it moves with it to
    // old_roots), with the same content.
    let in_root = fs.path("root/var/lib/rasa/watch/record.jsonl");
    assert_eq!(
        std::fs::read_to_string(&in_root).unwrap(),
        std::fs::read_to_string(&record).unwrap()
    );

    // End to end: `rasa diff` on that root names the unit that really wrote each path.
    let out = fs.rasa(&[
        "diff",
        "--empty",
        "--live-root",
        mnt.to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
        "--watch-record",
        record.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "rasa diff: {}", common::stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let writers = |path: &str| {
        report["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == path)
            .unwrap_or_else(|| panic!("{path} not in the diff"))["writers"]
            .clone()
    };
    assert_eq!(writers("/etc/unit-renamed"), serde_json::json!([unit]));
    assert_eq!(writers("/var/lib/unit-dir"), serde_json::json!([unit]));
}

#[test]
fn the_record_is_bounded_and_counts_what_it_drops() {
    let test = "the_record_is_bounded_and_counts_what_it_drops";
    let Some((fs, mount, manifest)) = setup(test) else {
        return;
    };
    let mnt = mount.0.clone();
    let record = fs.dir.path().join("watch.jsonl");
    // Readiness for systemd (Type=notify): READY=1 once the mark is in place.
    let notify = fs.dir.path().join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let watcher = start_watch_env(
        &mnt,
        &record,
        &manifest,
        &["--max-entries", "5"],
        &[("NOTIFY_SOCKET", &notify)],
    );
    let mut message = [0u8; 64];
    let n = systemd.recv(&mut message).expect("READY=1 from rasa watch");
    assert_eq!(&message[..n], b"READY=1");
    let out = Command::new("sh")
        .arg("-c")
        .arg("for i in $(seq 1 20); do echo $i > etc/f$i; done; for i in 1 2 3; do echo again >> etc/f1; done")
        .current_dir(&mnt)
        .status()
        .unwrap();
    assert!(out.success());
    let lines = stop_watch(watcher, &record);
    let header = &lines[0];
    assert_eq!(header["entries"], 5, "{header}");
    assert_eq!(lines.len(), 6);
    assert_eq!(header["maxEntries"], 5);
    // 20 files, each created and written, 5 of them recorded: the others' events are counted.
    assert!(header["droppedEvents"].as_u64().unwrap() >= 15, "{header}");
    // The first files are the ones kept (the kernel may have merged an entry's queued events
    // into one, so the count is not the number of system calls).
    let f1 = lines[1..].iter().find(|l| l["path"] == "/etc/f1").unwrap();
    assert_eq!(f1["events"], serde_json::json!(["create", "write"]), "{f1}");
}

#[test]
fn bad_input_is_refused_before_watching() {
    let dir = tempfile::tempdir().unwrap();
    let bad_manifest = dir.path().join("manifest.json");
    std::fs::write(&bad_manifest, "{ not json").unwrap();
    let root = dir.path().display().to_string();
    let missing = dir.path().join("missing").display().to_string();
    let manifest = bad_manifest.display().to_string();
    for (args, names) in [
        (vec!["--root", missing.as_str()], "--root"),
        (
            vec!["--root", root.as_str(), "--in-root-record", "/etc/x"],
            "--in-root-record",
        ),
        (
            vec!["--root", root.as_str(), "--manifest", manifest.as_str()],
            "manifest.json",
        ),
    ] {
        let out = Command::new(RASA)
            .arg("watch")
            .args(&args)
            .args([
                "--record",
                &dir.path().join("r.jsonl").display().to_string(),
            ])
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let stderr = common::stderr(&out);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {stderr}");
        assert!(
            stderr.contains(names) && stderr.contains("fix:"),
            "{args:?}: {stderr}"
        );
        assert!(
            !dir.path().join("r.jsonl").exists(),
            "{args:?} wrote a record"
        );
    }
}

/// The shape of a real machine: the root subvolume is `/` (here inside a private mount
/// namespace and a chroot), `--root /` with the default record and the manifest found at
/// /etc/rasa/manifest.json. The kernel names the top of another subvolume (`persist`) `/` when
/// the watcher resolves a handle from there; only the device-and-inode check keeps
/// `/persist/hidden` from being recorded as `/hidden`.
#[test]
fn with_root_slash_other_subvolumes_are_not_recorded_as_root_paths() {
    let test = "with_root_slash_other_subvolumes_are_not_recorded_as_root_paths";
    let Some((fs, mount, manifest)) = setup(test) else {
        return;
    };
    let mnt = mount.0.clone();
    std::fs::create_dir_all(mnt.join("etc/rasa")).unwrap();
    std::fs::copy(&manifest, mnt.join("etc/rasa/manifest.json")).unwrap();
    let bin_dir = Path::new(RASA).parent().unwrap();
    let mut script = String::from("set -e\n");
    for dir in ["proc", "dev", "usr", "rasa-bin", "run"] {
        std::fs::create_dir_all(mnt.join(dir)).unwrap();
    }
    for link in ["lib", "lib64", "bin", "sbin"] {
        let host = Path::new("/").join(link);
        match std::fs::read_link(&host) {
            Ok(target) => std::os::unix::fs::symlink(target, mnt.join(link)).unwrap(),
            Err(_) if host.is_dir() => {
                std::fs::create_dir_all(mnt.join(link)).unwrap();
                script.push_str(&format!(
                    "mount --bind /{link} '{}/{link}'\n",
                    mnt.display()
                ));
            }
            Err(_) => {}
        }
    }
    for (from, to) in [
        (Path::new("/proc"), "proc"),
        (Path::new("/dev"), "dev"),
        (Path::new("/usr"), "usr"),
        (bin_dir, "rasa-bin"),
    ] {
        script.push_str(&format!(
            "mount --rbind '{}' '{}/{to}'\n",
            from.display(),
            mnt.display()
        ));
    }
    script.push_str(&format!(
        "exec chroot '{}' /rasa-bin/{} watch --root / --flush-interval 1\n",
        mnt.display(),
        Path::new(RASA).file_name().unwrap().to_string_lossy()
    ));
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("NO_COLOR", "1")
        .spawn()
        .expect("unshare");
    let mut watcher = Running(child);
    let record = mnt.join("run/rasa/watch.jsonl");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !record.exists() {
        if let Some(status) = watcher.0.try_wait().unwrap() {
            panic!("rasa watch exited before watching: {status}");
        }
        assert!(Instant::now() < deadline, "rasa watch did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    sh(&format!(
        "echo a > '{m}/etc/visible' && echo b > '{t}/persist/hidden' && mkdir '{t}/persist/d' \
         && echo c > '{t}/persist/d/deep' && echo n > '{m}/var/lib/nixos/persisted'",
        m = mnt.display(),
        t = fs.top.display()
    ));
    kill(Pid::from_raw(watcher.0.id() as i32), Signal::SIGTERM).unwrap();
    let status = watcher.0.wait().unwrap();
    assert!(status.success(), "rasa watch exited with {status}");
    let lines: Vec<Value> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["root"], "/");
    let paths: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"/etc/visible"), "{paths:?}");
    for wrong in ["/hidden", "/d", "/d/deep", "/var/lib/nixos/persisted"] {
        assert!(!paths.contains(&wrong), "{wrong} recorded: {paths:?}");
    }
    assert!(
        paths
            .iter()
            .all(|p| !p.starts_with("/run/") && !p.starts_with("/rasa-bin")),
        "{paths:?}"
    );
}
