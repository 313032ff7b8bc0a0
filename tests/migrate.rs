//! `rasa migrate` on real btrfs (and ext4, for the byte-copy path), with every attribute read
//! back independently of the copy engine: std's metadata, `getfattr`, `lsattr`.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fidelity::{assert_faithful, assert_faithful_except, build_live_tree, NOBODY};
use common::{sh, stderr, stdout, LiveRoot, RASA};

fn q(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// A live root at `<top>/root` with the storage root `/persist` as a nested subvolume (same
/// filesystem: reflinks), or with an ext4 filesystem mounted there (another filesystem): the
/// shared `common::LiveRoot`, with migrate run to completion.
struct Fixture(LiveRoot);

impl std::ops::Deref for Fixture {
    type Target = LiveRoot;
    fn deref(&self) -> &LiveRoot {
        &self.0
    }
}

impl Fixture {
    fn new(test: &str, cross_fs: bool) -> Option<Fixture> {
        LiveRoot::new(test, cross_fs).map(Fixture)
    }

    fn migrate(&self, manifest: &Path, extra: &[&str]) -> Output {
        self.migrate_env(manifest, extra, &[])
    }

    fn migrate_env(&self, manifest: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.0.migrate(manifest, extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }
}

const ENTRIES: &str = r#"
    {"storageRoot": "/persist", "path": "/srv/data", "kind": "directory", "user": "root", "group": "root", "mode": "0755"},
    {"storageRoot": "/persist", "path": "/etc/machine-id", "kind": "file", "user": "root", "group": "root", "mode": "0755"},
    {"storageRoot": "/persist", "path": "/home/nobody", "kind": "directory", "user": "nobody", "group": "nogroup", "mode": "0700"},
    {"storageRoot": "/persist", "path": "/var/lib/absent", "kind": "directory", "user": "root", "group": "root", "mode": "0755"}"#;

fn sanitize(text: &str, fixture: &Fixture) -> String {
    text.replace(&fixture.fs.dir.path().display().to_string(), "[TMP]")
}

fn fidelity(test: &str, cross_fs: bool) {
    let Some(fx) = Fixture::new(test, cross_fs) else {
        return;
    };
    build_live_tree(&fx.live);
    let manifest = fx.manifest(ENTRIES);

    let plan = fx.migrate(&manifest, &[]);
    assert_eq!(plan.status.code(), Some(0), "{}", stderr(&plan));
    assert!(
        stderr(&plan).contains("using manifest [TMP]/manifest.json (--manifest)")
            || sanitize(&stderr(&plan), &fx)
                .contains("using manifest [TMP]/manifest.json (--manifest)")
    );
    let plan_text = stdout(&plan);
    if cross_fs {
        insta::assert_snapshot!("plan_cross_fs", plan_text);
    } else {
        insta::assert_snapshot!("plan_same_fs", plan_text);
    }
    assert!(
        !fx.live.join("persist/srv").exists(),
        "the dry run changed nothing"
    );

    let applied = fx.migrate(&manifest, &["--apply", "--json"]);
    assert_eq!(applied.status.code(), Some(0), "{}", stderr(&applied));
    let json: serde_json::Value = serde_json::from_slice(&applied.stdout).unwrap();
    let data = &json["entries"][0];
    assert_eq!(data["action"], "copy");
    let result = &data["result"];
    assert_eq!(result["skippedSockets"], serde_json::json!(["data/socket"]));
    assert_eq!(result["hardLinks"], 2);
    if cross_fs {
        assert_eq!(result["reflinkedFiles"], 0);
    } else {
        assert_eq!(
            result["byteCopiedFiles"], 0,
            "same btrfs: every non-empty file is a reflink"
        );
        assert!(result["reflinkedFiles"].as_u64().unwrap() > 5);
    }

    let lost: &[char] = if cross_fs { &['C'] } else { &[] };
    assert_faithful_except(
        &fx.live.join("srv/data"),
        &fx.live.join("persist/srv/data"),
        lost,
    );
    assert_faithful(
        &fx.live.join("home/nobody"),
        &fx.live.join("persist/home/nobody"),
    );
    assert_faithful(
        &fx.live.join("etc/machine-id"),
        &fx.live.join("persist/etc/machine-id"),
    );
    if cross_fs {
        assert_eq!(result["flagsNotKept"], serde_json::json!(["data/nocow"]));
    } else {
        let lsattr = sh(&format!(
            "lsattr {}",
            q(&fx.live.join("persist/srv/data/nocow"))
        ));
        assert!(lsattr.contains('C'), "{lsattr}");
    }
    // Holes stay holes: 64 MiB apparent, a few KiB on disk.
    let sparse = std::fs::metadata(fx.live.join("persist/srv/data/sparse")).unwrap();
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "sparse file is {} blocks",
        sparse.blocks()
    );
    // The parent of a file entry gets the manifest's owner and mode (impermanence's parentDirectory).
    let etc = std::fs::metadata(fx.live.join("persist/etc")).unwrap();
    assert_eq!(etc.mode() & 0o7777, 0o755);
    // No temporary copies are left behind.
    let leftovers = sh(&format!(
        "find {} -name '*.rasa-migrate'",
        q(&fx.live.join("persist"))
    ));
    assert_eq!(leftovers, "");
    // The record of the run, for `rasa check`.
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fx.live.join("persist/.rasa/migrations.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["runs"].as_array().unwrap().len(), 1);
    assert_eq!(record["runs"][0]["entries"][0]["path"], "/srv/data");
    assert_eq!(record["runs"][0]["entries"][0]["action"], "copy");

    // Idempotent: a second run finds everything identical and copies nothing.
    let again = fx.migrate(&manifest, &["--apply"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    let text = stdout(&again);
    assert!(text.contains("0 to copy"), "{text}");
    assert_eq!(text.matches("identical").count(), 4, "{text}");
}

#[test]
fn migrate_same_btrfs_is_faithful_and_reflinks() {
    fidelity("migrate_same_btrfs_is_faithful_and_reflinks", false);
}

#[test]
fn migrate_to_ext4_is_faithful_with_byte_copies() {
    fidelity("migrate_to_ext4_is_faithful_with_byte_copies", true);
}

#[test]
fn bind_mounted_entries_are_already_persisted() {
    let Some(fx) = Fixture::new("bind_mounted_entries_are_already_persisted", false) else {
        return;
    };
    std::fs::create_dir_all(fx.live.join("persist/var/lib/app")).unwrap();
    std::fs::write(fx.live.join("persist/var/lib/app/state"), b"kept").unwrap();
    std::fs::create_dir_all(fx.live.join("var/lib/app")).unwrap();
    sh(&format!(
        "mount --bind {} {}",
        q(&fx.live.join("persist/var/lib/app")),
        q(&fx.live.join("var/lib/app"))
    ));
    let manifest = fx.manifest(
        r#"{"storageRoot": "/persist", "path": "/var/lib/app", "kind": "directory", "user": "root", "group": "root", "mode": "0755"}"#,
    );
    let out = fx.migrate(&manifest, &["--apply"]);
    sh(&format!("umount {}", q(&fx.live.join("var/lib/app"))));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    insta::assert_snapshot!(stdout(&out), @r"
    Migration done:
      already persisted        /var/lib/app  -> /persist/var/lib/app  (bind-mounted from storage (impermanence is active))
    0 to copy (0 B), 1 already persisted, 0 identical, 0 conflicts, 0 missing, 0 skipped
    ");
}

/// The live tree and its manifest, after a `migrate --apply` that the failpoint stopped; None
/// when the test is skipped (no failpoints compiled in, or no root).
fn crashed_at(test: &str, failpoint: &str) -> Option<(Fixture, PathBuf, Output)> {
    if !cfg!(feature = "failpoints") {
        return common::skip(test, "needs --features failpoints");
    }
    let fx = Fixture::new(test, false)?;
    build_live_tree(&fx.live);
    let manifest = fx.manifest(ENTRIES);
    let crashed = fx.migrate_env(&manifest, &["--apply"], &[("RASA_FAILPOINT", failpoint)]);
    Some((fx, manifest, crashed))
}

#[test]
fn crash_mid_copy_then_rerun_finishes() {
    let Some((fx, manifest, crashed)) =
        crashed_at("crash_mid_copy_then_rerun_finishes", "migrate-copied-file")
    else {
        return;
    };
    assert!(
        stderr(&crashed).contains("RASA-FAILPOINT-REACHED migrate-copied-file"),
        "{}",
        stderr(&crashed)
    );
    assert_ne!(crashed.status.code(), Some(0));
    // Nothing that looks complete: the final name does not exist, only the temporary one.
    assert!(!fx.live.join("persist/srv/data").exists());
    assert!(fx.live.join("persist/srv/.data.rasa-migrate").exists());
    assert!(!fx.live.join("persist/.rasa/migrations.json").exists());
    // The plan after the crash still says copy.
    let plan = fx.migrate(&manifest, &[]);
    assert!(
        stdout(&plan).contains("copy                     /srv/data"),
        "{}",
        stdout(&plan)
    );

    let rerun = fx.migrate(&manifest, &["--apply"]);
    assert_eq!(rerun.status.code(), Some(0), "{}", stderr(&rerun));
    assert!(!fx.live.join("persist/srv/.data.rasa-migrate").exists());
    assert_faithful(&fx.live.join("srv/data"), &fx.live.join("persist/srv/data"));
    assert_faithful(
        &fx.live.join("home/nobody"),
        &fx.live.join("persist/home/nobody"),
    );
}

#[test]
fn crash_after_rename_then_rerun_finds_it_identical() {
    let Some((fx, manifest, crashed)) = crashed_at(
        "crash_after_rename_then_rerun_finds_it_identical",
        "migrate-renamed-entry",
    ) else {
        return;
    };
    assert_ne!(crashed.status.code(), Some(0));
    assert_faithful(&fx.live.join("srv/data"), &fx.live.join("persist/srv/data"));
    let rerun = fx.migrate(&manifest, &["--apply"]);
    assert_eq!(rerun.status.code(), Some(0), "{}", stderr(&rerun));
    assert!(
        stdout(&rerun).contains("identical                /srv/data"),
        "{}",
        stdout(&rerun)
    );
    assert!(
        stdout(&rerun).contains("copied                   /etc/machine-id"),
        "{}",
        stdout(&rerun)
    );
}

fn conflict_fixture(test: &str) -> Option<(Fixture, PathBuf)> {
    let fx = Fixture::new(test, false)?;
    std::fs::create_dir_all(fx.live.join("var/lib/app")).unwrap();
    std::fs::write(fx.live.join("var/lib/app/state"), b"live version").unwrap();
    std::fs::create_dir_all(fx.live.join("persist/var/lib/app")).unwrap();
    std::fs::write(fx.live.join("persist/var/lib/app/state"), b"stored version").unwrap();
    // Same mtime on both sides, so the first difference reported is always the size (two writes
    // can straddle a timestamp tick, which made the reported reason vary between runs).
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    for side in ["var/lib/app/state", "persist/var/lib/app/state"] {
        std::fs::File::options()
            .write(true)
            .open(fx.live.join(side))
            .unwrap()
            .set_modified(when)
            .unwrap();
    }
    let manifest = fx.manifest(
        r#"{"storageRoot": "/persist", "path": "/var/lib/app", "kind": "directory", "user": "root", "group": "root", "mode": "0755"}"#,
    );
    Some((fx, manifest))
}

#[test]
fn conflict_stops_unless_a_policy_is_given() {
    let Some((fx, manifest)) = conflict_fixture("conflict_stops_unless_a_policy_is_given") else {
        return;
    };
    let stored = || std::fs::read_to_string(fx.live.join("persist/var/lib/app/state")).unwrap();
    let plan = fx.migrate(&manifest, &["--json"]);
    assert_eq!(plan.status.code(), Some(4));
    let mut json: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    json["manifest"] = "[TMP]/manifest.json".into();
    insta::assert_snapshot!(serde_json::to_string_pretty(&json).unwrap(), @r#"
    {
      "applied": false,
      "entries": [
        {
          "action": "conflict",
          "bytes": 12,
          "items": 2,
          "kind": "directory",
          "path": "/var/lib/app",
          "reason": "app/state: size differs",
          "resolution": "stop",
          "storagePath": "/persist/var/lib/app"
        }
      ],
      "manifest": "[TMP]/manifest.json",
      "manifestSource": "--manifest"
    }
    "#);
    let out = fx.migrate(&manifest, &["--apply"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    insta::assert_snapshot!(stdout(&out), @r"
    Migration done:
      conflict                 /var/lib/app  -> /persist/var/lib/app  (12 B, 2 items; app/state: size differs)
    0 to copy (0 B), 0 already persisted, 0 identical, 1 conflicts, 0 missing, 0 skipped
    Conflicts were left alone: compare the two versions, then rerun with --on-conflict keep-storage or --on-conflict replace-with-backup.
    ");
    assert_eq!(stored(), "stored version");

    let keep = fx.migrate(&manifest, &["--apply", "--on-conflict", "keep-storage"]);
    assert_eq!(keep.status.code(), Some(0), "{}", stderr(&keep));
    assert_eq!(stored(), "stored version");

    let replace = fx.migrate(
        &manifest,
        &["--apply", "--on-conflict", "replace-with-backup"],
    );
    assert_eq!(replace.status.code(), Some(0), "{}", stderr(&replace));
    assert_eq!(stored(), "live version");
    let backups: Vec<_> = std::fs::read_dir(fx.live.join("persist/var/lib"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("app.rasa-backup-"))
        .collect();
    assert_eq!(backups.len(), 1);
    assert_eq!(
        std::fs::read_to_string(
            fx.live
                .join("persist/var/lib")
                .join(&backups[0])
                .join("state")
        )
        .unwrap(),
        "stored version"
    );
}

#[test]
fn hostile_symlink_in_storage_is_refused() {
    let Some(fx) = Fixture::new("hostile_symlink_in_storage_is_refused", false) else {
        return;
    };
    build_live_tree(&fx.live);
    let outside = fx.fs.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, fx.live.join("persist/srv")).unwrap();
    let manifest = fx.manifest(ENTRIES);
    let out = fx.migrate(&manifest, &["--apply"]);
    assert_eq!(out.status.code(), Some(3));
    let err = sanitize(&stderr(&out), &fx);
    expect_test::expect![[r#"
        rasa: using manifest [TMP]/manifest.json (--manifest)
        rasa: error: /persist/srv inside the storage root /persist is a symlink to [TMP]/outside; rasa never writes through a symlink in storage, because it could point anywhere (e.g. at /etc/shadow)
        rasa:          fix: inspect it, then remove or rename it (`ls -la /persist/srv`) and rerun
        rasa:          nothing was changed
    "#]]
    .assert_eq(&err);
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written through the link"
    );
    assert!(
        !fx.live.join("persist/etc").exists(),
        "nothing changed for the other entries either"
    );
}

fn refused(test: &str, manifest_text: &str) -> Option<String> {
    let fx = Fixture::new(test, false)?;
    build_live_tree(&fx.live);
    let manifest = fx.fs.dir.path().join("manifest.json");
    std::fs::write(&manifest, manifest_text).unwrap();
    let out = fx.migrate(&manifest, &["--apply"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    assert_eq!(
        std::fs::read_dir(fx.live.join("persist")).unwrap().count(),
        0,
        "nothing changed"
    );
    Some(sanitize(&stderr(&out), &fx))
}

#[test]
fn corrupt_manifest_is_refused() {
    let Some(err) = refused(
        "corrupt_manifest_is_refused",
        "{\"version\": 1, \"entries\": [",
    ) else {
        return;
    };
    expect_test::expect![[r#"
        rasa: using manifest [TMP]/manifest.json (--manifest)
        rasa: error: [TMP]/manifest.json is not valid JSON: EOF while parsing a list at line 1 column 27
        rasa:          fix: regenerate it from the NixOS configuration (nixos-rebuild), or fix the file by hand
        rasa:          nothing was changed
    "#]]
    .assert_eq(&err);
}

#[test]
fn unknown_manifest_version_is_refused() {
    let text = r#"{"version": 2, "rollback": {}, "entries": []}"#;
    let Some(err) = refused("unknown_manifest_version_is_refused", text) else {
        return;
    };
    expect_test::expect![[r#"
        rasa: using manifest [TMP]/manifest.json (--manifest)
        rasa: error: [TMP]/manifest.json has manifest version 2, but this rasa reads version 1
        rasa:          fix: use the rasa from the same flake revision as the NixOS module that wrote the manifest
        rasa:          nothing was changed
    "#]]
    .assert_eq(&err);
}

#[test]
fn unknown_user_is_refused() {
    let text = r#"{"version": 1,
  "rollback": {"device": "/dev/null", "root": "root", "blank": null, "oldRoots": "old_roots",
    "persist": "persist", "keep": 5, "keepDays": 7},
  "entries": [
    {"storageRoot": "/persist", "path": "/srv/data", "kind": "directory", "user": "root", "group": "root", "mode": "0755"},
    {"storageRoot": "/persist", "path": "/home/ghost", "kind": "directory", "user": "rasa-no-such-user", "group": "root", "mode": "0700"}
  ]}"#;
    let Some(err) = refused("unknown_user_is_refused", text) else {
        return;
    };
    expect_test::expect![[r#"
        rasa: using manifest [TMP]/manifest.json (--manifest)
        rasa: error: the manifest gives user "rasa-no-such-user" for /home/ghost, and this system has no such user
        rasa:          fix: create the user (users.users.<name>) in the configuration you migrate from, or correct the user in environment.persistence, then rebuild
        rasa:          nothing was changed
    "#]]
    .assert_eq(&err);
}

/// Stop the copy right after its first file and look at what is on disk: nothing may carry a
/// permission bit its source does not have, and the copy's top directory must still be
/// root-only, so nothing inside is reachable by anyone else before it is complete.
#[test]
fn permissions_are_never_wider_than_the_source_mid_copy() {
    use std::io::BufRead;
    const TEST: &str = "permissions_are_never_wider_than_the_source_mid_copy";
    if !cfg!(feature = "failpoints") {
        common::skip::<()>(TEST, "needs --features failpoints");
        return;
    }
    let Some(fx) = Fixture::new(TEST, false) else {
        return;
    };
    build_live_tree(&fx.live);
    let manifest = fx.manifest(ENTRIES);
    let mut child = Command::new(RASA)
        .args(["migrate", "--apply", "--manifest"])
        .arg(&manifest)
        .arg("--live-root")
        .arg(&fx.live)
        .env("RASA_FAILPOINT", "migrate-copied-file")
        .env("RASA_FAILPOINT_ACTION", "pause")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("RASA-FAILPOINT-REACHED") {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "rasa exited before the failpoint"
        );
    }
    let temp = fx.live.join("persist/srv/.data.rasa-migrate");
    let top = std::fs::symlink_metadata(&temp).unwrap();
    assert_eq!(top.uid(), 0);
    assert_eq!(
        top.mode() & 0o077,
        0,
        "the copy in progress is root-only: {:o}",
        top.mode()
    );
    let mut seen = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let copy = if rel.as_os_str().is_empty() {
            temp.clone()
        } else {
            temp.join(&rel)
        };
        let source = fx.live.join("srv/data").join(&rel);
        let (c, s) = (
            std::fs::symlink_metadata(&copy).unwrap(),
            std::fs::symlink_metadata(&source).unwrap(),
        );
        if !c.file_type().is_symlink() {
            let extra = c.mode() & 0o7777 & !(s.mode() & 0o7777);
            assert_eq!(extra, 0, "{rel:?} has bits {extra:o} its source lacks");
        }
        seen += 1;
        if c.is_dir() {
            for e in std::fs::read_dir(&copy).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
    }
    assert!(seen >= 2, "the copy had started");
    child.kill().unwrap();
    child.wait().unwrap();
    // And the interrupted copy is finished by a rerun.
    let rerun = fx.migrate(&manifest, &["--apply"]);
    assert_eq!(rerun.status.code(), Some(0), "{}", stderr(&rerun));
    assert_faithful(
        &fx.live.join("home/nobody"),
        &fx.live.join("persist/home/nobody"),
    );
}

// ---- Safety: issue 12, items 13, 15, 16, 17, 19, 20, and neededForBoot ----

fn entry(root: &str, path: &str, kind: &str) -> String {
    format!(
        r#"{{"storageRoot": "{root}", "path": "{path}", "kind": "{kind}", "user": "root", "group": "root", "mode": "0755"}}"#
    )
}

/// Run `migrate --apply` stopped at a failpoint (SIGSTOP), call `change` while it is stopped,
/// let it go on, and return what it did; a run that does not end within a minute is killed and
/// the test fails (it hung).
fn apply_with_change_at(
    fx: &Fixture,
    manifest: &Path,
    failpoint: &str,
    change: impl FnOnce(),
) -> Output {
    use std::time::{Duration, Instant};
    let mut child = Command::new(RASA)
        .arg("migrate")
        .arg("--manifest")
        .arg(manifest)
        .arg("--live-root")
        .arg(&fx.live)
        .arg("--apply")
        .env("NO_COLOR", "1")
        .env("RASA_FAILPOINT", failpoint)
        .env("RASA_FAILPOINT_ACTION", "stop")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stopped = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()
                    .map(|r| r.trim_start().starts_with('T'))
            })
            .unwrap_or(false)
    };
    let start = Instant::now();
    while !stopped() {
        if start.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "rasa never reached the failpoint {failpoint}: {}",
                stderr(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    change();
    sh(&format!("kill -CONT {pid}"));
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("migrate --apply hung after the change: {}", stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn swap_for_fifo(path: &Path) {
    std::fs::remove_file(path).unwrap();
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
}

/// Item 13: a file swapped for a FIFO between inspection and open is refused without blocking,
/// and nothing incomplete appears under the final name.
#[test]
fn a_file_swapped_for_a_fifo_while_copied_is_refused_not_hung() {
    let test = "a_file_swapped_for_a_fifo_while_copied_is_refused_not_hung";
    if !cfg!(feature = "failpoints") {
        common::skip::<()>(test, "needs --features failpoints");
        return;
    }
    let Some(fx) = Fixture::new(test, false) else {
        return;
    };
    std::fs::create_dir_all(fx.live.join("srv/data")).unwrap();
    std::fs::write(fx.live.join("srv/data/log"), b"log line\n").unwrap();
    let manifest = fx.manifest(&entry("/persist", "/srv/data", "directory"));
    let out = apply_with_change_at(&fx, &manifest, "copy-before-opening-file", || {
        swap_for_fifo(&fx.live.join("srv/data/log"))
    });
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = sanitize(&stderr(&out), &fx);
    assert!(
        err.contains("data/log: it was replaced while being copied"),
        "{err}"
    );
    assert!(!fx.live.join("persist/srv/data").exists());
}

/// Item 17: a 2,000-level tree is planned, copied and compared under a soft limit of 256 open
/// files, and an error deep down names its path once, not once per level.
#[test]
fn a_2000_level_tree_migrates_and_errors_name_the_path_once() {
    let test = "a_2000_level_tree_migrates_and_errors_name_the_path_once";
    if !cfg!(feature = "failpoints") {
        common::skip::<()>(test, "needs --features failpoints");
        return;
    }
    let Some(fx) = Fixture::new(test, false) else {
        return;
    };
    std::fs::create_dir_all(fx.live.join("srv/deep")).unwrap();
    sh(&format!(
        "cd {} && for i in $(seq 2000); do mkdir d && cd d; done && echo bottom > f",
        q(&fx.live.join("srv/deep"))
    ));
    let manifest = fx.manifest(&entry("/persist", "/srv/deep", "directory"));
    let low_limit = |extra: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -Sn 256 && exec {RASA} migrate --manifest {} --live-root {} {extra}",
                q(&manifest),
                q(&fx.live)
            ))
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };
    // An error at the bottom (the file swapped for a FIFO) first: one path, one line.
    let out = apply_with_change_at(&fx, &manifest, "copy-before-opening-file", || {
        // Too long for one path: go down step by step.
        sh(&format!(
            "cd {} && for i in $(seq 2000); do cd d; done && rm f && mkfifo f",
            q(&fx.live.join("srv/deep"))
        ));
    });
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.len() < 10_000,
        "the error repeats itself ({} bytes): {}",
        err.len(),
        &err[..2000.min(err.len())]
    );
    assert_eq!(err.matches("copying ").count(), 1, "{err}");
    sh(&format!(
        "cd {} && for i in $(seq 2000); do cd d; done && rm f && echo bottom > f",
        q(&fx.live.join("srv/deep"))
    ));

    let out = low_limit("--apply");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let bottom = sh(&format!(
        "cd {} && for i in $(seq 2000); do cd d; done && cat f",
        q(&fx.live.join("persist/srv/deep"))
    ));
    assert_eq!(bottom, "bottom\n");
    let again = low_limit("");
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert!(stdout(&again).contains("identical"), "{}", stdout(&again));
}

/// Item 15: a tmpfs and a bind mount (same filesystem) inside an entry are left out, said so,
/// and a rerun finds the copy identical rather than in conflict.
#[test]
fn mount_points_inside_an_entry_are_left_out_and_listed() {
    mount_points_left_out(
        "mount_points_inside_an_entry_are_left_out_and_listed",
        false,
    );
}

#[test]
fn mount_points_inside_an_entry_are_left_out_when_storage_is_ext4() {
    mount_points_left_out(
        "mount_points_inside_an_entry_are_left_out_when_storage_is_ext4",
        true,
    );
}

fn mount_points_left_out(test: &str, cross_fs: bool) {
    let Some(fx) = Fixture::new(test, cross_fs) else {
        return;
    };
    let data = fx.live.join("srv/data");
    std::fs::create_dir_all(data.join("cache")).unwrap();
    std::fs::create_dir_all(data.join("share")).unwrap();
    std::fs::write(data.join("kept"), b"kept").unwrap();
    std::fs::create_dir_all(fx.live.join("elsewhere")).unwrap();
    std::fs::write(fx.live.join("elsewhere/other"), b"not ours").unwrap();
    sh(&format!(
        "mount -t tmpfs rasa-test {}",
        q(&data.join("cache"))
    ));
    std::fs::write(data.join("cache/big"), b"on tmpfs").unwrap();
    sh(&format!(
        "mount --bind {} {}",
        q(&fx.live.join("elsewhere")),
        q(&data.join("share"))
    ));
    let manifest = fx.manifest(&entry("/persist", "/srv/data", "directory"));
    let out = fx.migrate(&manifest, &["--apply"]);
    let again = fx.migrate(&manifest, &[]);
    sh(&format!("umount {}", q(&data.join("cache"))));
    sh(&format!("umount {}", q(&data.join("share"))));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("left out mount point /srv/data/cache"),
        "{text}"
    );
    assert!(
        text.contains("left out mount point /srv/data/share"),
        "{text}"
    );
    let stored = fx.live.join("persist/srv/data");
    assert_eq!(std::fs::read(stored.join("kept")).unwrap(), b"kept");
    assert!(!stored.join("cache").exists(), "the tmpfs was copied");
    assert!(!stored.join("share").exists(), "the bind mount was copied");
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert!(stdout(&again).contains("identical"), "{}", stdout(&again));
}

/// Item 16: a file entry inside a directory entry of the same storage root is covered by the
/// directory's copy: planned once, nothing fails, no temporary file inside the copy.
#[test]
fn an_entry_inside_a_directory_entry_is_covered_once() {
    covered_once("an_entry_inside_a_directory_entry_is_covered_once", false);
}

#[test]
fn an_entry_inside_a_directory_entry_is_covered_once_on_ext4() {
    covered_once(
        "an_entry_inside_a_directory_entry_is_covered_once_on_ext4",
        true,
    );
}

fn covered_once(test: &str, cross_fs: bool) {
    let Some(fx) = Fixture::new(test, cross_fs) else {
        return;
    };
    std::fs::create_dir_all(fx.live.join("srv/data/sub")).unwrap();
    std::fs::write(fx.live.join("srv/data/sub/inner"), b"inner").unwrap();
    std::fs::write(fx.live.join("srv/data/top"), b"top").unwrap();
    let manifest = fx.manifest(&format!(
        "{}, {}, {}",
        entry("/persist", "/srv/data/sub/inner", "file"),
        entry("/persist", "/srv/data", "directory"),
        entry("/persist", "/srv/data/sub", "directory"),
    ));
    let out = fx.migrate(&manifest, &["--apply"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out).replace("; copy)", "; reflink)");
    insta::allow_duplicates! {
        insta::assert_snapshot!(text, @r"
        Migration done:
          covered                  /srv/data/sub/inner  -> /persist/srv/data/sub/inner  (inside /srv/data, which holds it)
          copied                   /srv/data            -> /persist/srv/data  (8 B, 4 items; reflink)
          covered                  /srv/data/sub        -> /persist/srv/data/sub  (inside /srv/data, which holds it)
        1 to copy (8 B), 0 already persisted, 0 identical, 0 conflicts, 0 missing, 0 skipped, 2 covered by another entry
        ");
    }
    let names = sh(&format!("find {} | sort", q(&fx.live.join("persist/srv"))));
    assert!(!names.contains("rasa-migrate"), "{names}");
    assert_eq!(
        std::fs::read(fx.live.join("persist/srv/data/sub/inner")).unwrap(),
        b"inner"
    );
    let again = fx.migrate(&manifest, &["--apply"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert!(stdout(&again).contains("identical"), "{}", stdout(&again));
}

/// Item 16: with storage roots /persist and /persist/home, the entry /home of /persist is
/// stored at the other storage root: replace-with-backup must not rename it away.
#[test]
fn overlapping_storage_roots_are_never_renamed_away() {
    let Some(fx) = Fixture::new("overlapping_storage_roots_are_never_renamed_away", false) else {
        return;
    };
    std::fs::create_dir_all(fx.live.join("persist/home/alice")).unwrap();
    std::fs::write(fx.live.join("persist/home/alice/notes"), b"stored").unwrap();
    std::fs::create_dir_all(fx.live.join("home/alice")).unwrap();
    std::fs::write(fx.live.join("home/alice/notes"), b"live").unwrap();
    let manifest = fx.manifest(&format!(
        "{}, {}",
        entry("/persist", "/home", "directory"),
        entry("/persist/home", "/alice", "directory"),
    ));
    let out = fx.migrate(
        &manifest,
        &["--apply", "--on-conflict", "replace-with-backup"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        // The one rule set refuses the manifest before anything is planned.
        stderr(&out).contains(
            "storageRoot \"/persist/home\": is inside the storage root /persist; storage roots \
             must not contain each other"
        ),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(fx.live.join("persist/home/alice/notes")).unwrap(),
        b"stored"
    );
    let names = sh(&format!("ls -A {}", q(&fx.live.join("persist"))));
    assert_eq!(names, "home\n", "nothing renamed or added");
}

/// Item 19: migrate validates its manifest as `check manifest` does: a NUL byte is a clear
/// refusal (not a panic), and so is an entry equal to its storage root.
#[test]
fn manifest_with_a_nul_byte_is_refused_not_a_panic() {
    let text = r#"{"version": 1,
  "rollback": {"device": "/dev/null", "root": "root", "blank": null, "oldRoots": "old_roots",
    "persist": "persist", "keep": 5, "keepDays": 7},
  "entries": [
    {"storageRoot": "/persist", "path": "/srv/da\u0000ta", "kind": "directory", "user": "root", "group": "root", "mode": "0755"}
  ]}"#;
    let Some(err) = refused("manifest_with_a_nul_byte_is_refused_not_a_panic", text) else {
        return;
    };
    assert!(err.contains("contains a NUL byte"), "{err}");
    assert!(
        !err.contains('\0'),
        "the NUL byte is shown escaped: {err:?}"
    );
    assert!(err.contains("`rasa check manifest"), "{err}");
}

#[test]
fn entry_equal_to_its_storage_root_is_refused() {
    let text = r#"{"version": 1,
  "rollback": {"device": "/dev/null", "root": "root", "blank": null, "oldRoots": "old_roots",
    "persist": "persist", "keep": 5, "keepDays": 7},
  "entries": [
    {"storageRoot": "/persist", "path": "/persist", "kind": "directory", "user": "root", "group": "root", "mode": "0755"}
  ]}"#;
    let Some(err) = refused("entry_equal_to_its_storage_root_is_refused", text) else {
        return;
    };
    assert!(err.contains("is inside the storage root /persist"), "{err}");
}

/// Item 20: a symlinked parent on the live path (/home/alice -> /data/alice) is a problem with
/// its fix and exit 4, not a skip with exit 0.
#[test]
fn a_symlinked_parent_is_a_problem_not_a_skip() {
    let Some(fx) = Fixture::new("a_symlinked_parent_is_a_problem_not_a_skip", false) else {
        return;
    };
    std::fs::create_dir_all(fx.live.join("data/alice/.ssh")).unwrap();
    std::fs::write(fx.live.join("data/alice/.ssh/id_ed25519"), b"key").unwrap();
    std::fs::create_dir_all(fx.live.join("home")).unwrap();
    std::os::unix::fs::symlink("/data/alice", fx.live.join("home/alice")).unwrap();
    std::fs::create_dir_all(fx.live.join("srv/data")).unwrap();
    let manifest = fx.manifest(&format!(
        "{}, {}",
        entry("/persist", "/home/alice/.ssh", "directory"),
        entry("/persist", "/srv/data", "directory"),
    ));
    let out = fx.migrate(&manifest, &["--apply"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    insta::assert_snapshot!(stdout(&out), @r"
    Migration done:
      PROBLEM                  /home/alice/.ssh  -> /persist/home/alice/.ssh  (/home/alice is a symlink to /data/alice: rasa does not copy through symlinks, and the next boot erases /home/alice/.ssh (it lives on the root, not in storage))
        fix: persist the real path instead (/data/alice/.ssh in environment.persistence), or replace the symlink /home/alice with the directory it points to, then rerun
      copied                   /srv/data         -> /persist/srv/data  (0 B, 1 item; reflink)
    1 to copy (0 B), 0 already persisted, 0 identical, 0 conflicts, 0 missing, 0 skipped, 1 problems
    Problems were left alone and the next boot erases what they name: apply each fix, then rerun.
    ");
}

/// neededForBoot (issue 11, item 5): nothing anywhere to copy, so an empty directory with the
/// manifest's owner and mode is created, for the initrd to mount at the first wiping boot.
#[test]
fn needed_for_boot_entry_is_created_empty_in_storage() {
    let Some(fx) = Fixture::new("needed_for_boot_entry_is_created_empty_in_storage", false) else {
        return;
    };
    // And one inside a directory entry that is copied: created inside the finished copy.
    std::fs::create_dir_all(fx.live.join("srv/state")).unwrap();
    std::fs::write(fx.live.join("srv/state/file"), b"state").unwrap();
    let manifest = fx.manifest(
        r#"{"storageRoot": "/persist", "path": "/var/lib/nixos", "kind": "directory", "user": "nobody", "group": "root", "mode": "0750", "neededForBoot": true},
           {"storageRoot": "/persist", "path": "/var/lib/other", "kind": "directory", "user": "root", "group": "root", "mode": "0755"},
           {"storageRoot": "/persist", "path": "/srv/state/keys", "kind": "directory", "user": "nobody", "group": "root", "mode": "0700", "neededForBoot": true},
           {"storageRoot": "/persist", "path": "/srv/state", "kind": "directory", "user": "root", "group": "root", "mode": "0755"}"#,
    );
    let plan = fx.migrate(&manifest, &[]);
    assert!(stdout(&plan).contains("create empty"), "{}", stdout(&plan));
    let out = fx.migrate(&manifest, &["--apply"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let md = std::fs::symlink_metadata(fx.live.join("persist/var/lib/nixos")).unwrap();
    assert!(md.is_dir());
    assert_eq!(md.uid(), NOBODY);
    assert_eq!(md.gid(), 0);
    assert_eq!(md.permissions().mode() & 0o7777, 0o750);
    assert!(!fx.live.join("persist/var/lib/other").exists());
    let keys = std::fs::symlink_metadata(fx.live.join("persist/srv/state/keys")).unwrap();
    assert!(keys.is_dir());
    assert_eq!(keys.uid(), NOBODY);
    assert_eq!(keys.permissions().mode() & 0o7777, 0o700);
    assert_eq!(
        std::fs::read(fx.live.join("persist/srv/state/file")).unwrap(),
        b"state"
    );
    let again = fx.migrate(&manifest, &[]);
    assert!(
        stdout(&again).contains("only in storage"),
        "{}",
        stdout(&again)
    );
}

/// `rasa migrate | head`: a reader that went away is not a crash (no panic on EPIPE).
#[test]
fn closed_stdout_is_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    std::fs::create_dir_all(live.join("persist")).unwrap();
    std::fs::create_dir_all(live.join("srv/data")).unwrap();
    let manifest = dir.path().join("manifest.json");
    std::fs::write(
        &manifest,
        format!(
            r#"{{"version": 1,
  "rollback": {{"device": "/dev/null", "root": "root", "blank": null, "oldRoots": "old_roots",
    "persist": "persist", "keep": 5, "keepDays": 7}},
  "entries": [{}]}}"#,
            entry("/persist", "/srv/data", "directory")
        ),
    )
    .unwrap();
    let mut child = Command::new(RASA)
        .arg("migrate")
        .arg("--manifest")
        .arg(&manifest)
        .arg("--live-root")
        .arg(&live)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // No reader from here on: the plan's first write gets EPIPE.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

/// An entry that contains its storage root (/srv/data stored in /srv/data/store) would copy
/// storage into itself: refused, nothing changed.
#[test]
fn entry_containing_a_storage_root_is_refused() {
    let Some(fx) = Fixture::new("entry_containing_a_storage_root_is_refused", false) else {
        return;
    };
    std::fs::create_dir_all(fx.live.join("srv/data/store")).unwrap();
    std::fs::write(fx.live.join("srv/data/file"), b"data").unwrap();
    let manifest = fx.manifest(&entry("/srv/data/store", "/srv/data", "directory"));
    let out = fx.migrate(&manifest, &["--apply"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "storageRoot \"/srv/data/store\": is inside entries[0] (/srv/data), so its bind \
             mount would cover the storage"
        ),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_dir(fx.live.join("srv/data/store"))
            .unwrap()
            .count(),
        0,
        "nothing changed"
    );
}
