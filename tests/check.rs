//! `rasa check manifest` (as the Nix build would run it: unprivileged, offline) and
//! `rasa check system` on a real loop btrfs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{sh, stderr, stdout, LoopBtrfs, RASA};

fn rasa(args: &[&str]) -> Output {
    Command::new(RASA)
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap()
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/manifest.example.json")
}

#[test]
fn check_manifest_accepts_the_committed_example() {
    let out = rasa(&["check", "manifest", example().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).ends_with("manifest.example.json: valid manifest (version 1)\n"));
}

#[test]
fn check_manifest_needs_no_root() {
    if !nix::unistd::geteuid().is_root() {
        // Already unprivileged: the other tests cover it.
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    sh(&format!("chmod 755 {}", dir.path().display()));
    let file = dir.path().join("manifest.json");
    std::fs::copy(example(), &file).unwrap();
    sh(&format!("chmod 644 {}", file.display()));
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            RASA,
            "check",
            "manifest",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn check_manifest_reports_each_problem_and_exits_4() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.json");
    std::fs::write(
        &file,
        r#"{"version": 1,
  "rollback": {"device": "/dev/mapper/cryptroot", "root": "root", "blank": "root-blank",
    "oldRoots": "old_roots", "persist": "persist", "keep": 5, "keepDays": 7},
  "entries": [
    {"storageRoot": "/persist", "path": "/etc/ssh/../shadow", "kind": "file", "user": "root", "group": "root", "mode": "0755"},
    {"storageRoot": "/persist", "path": "/var/log", "kind": "directory", "user": "root", "group": "root", "mode": "0755"},
    {"storageRoot": "/persist", "path": "/var/log", "kind": "directory", "user": "root", "group": "root", "mode": "0755"},
    {"storageRoot": "/persist", "path": "/nix/var", "kind": "directory", "user": "root", "group": "root", "mode": "0755"},
    {"storageRoot": "/persist", "path": "/home/alice", "kind": "directory", "user": "1000", "group": "users", "mode": "0700"}
  ]}"#,
    )
    .unwrap();
    let out = rasa(&["check", "manifest", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    let text = stdout(&out).replace(&dir.path().display().to_string(), "[TMP]");
    insta::assert_snapshot!(text, @r#"
    [TMP]/bad.json: entries[0] (/etc/ssh/../shadow): path "/etc/ssh/../shadow" contains '..'
    [TMP]/bad.json: entries[2] (/var/log): duplicate of entries[1]
    [TMP]/bad.json: entries[3] (/nix/var): /nix/var is under /nix or /boot, which survive every boot by themselves
    [TMP]/bad.json: entries[4] (/home/alice): user "1000" is a number; give users and groups by name
    [TMP]/bad.json: 4 problems found
    "#);

    let json = rasa(&["check", "manifest", "--json", file.to_str().unwrap()]);
    assert_eq!(json.status.code(), Some(4));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["problems"].as_array().unwrap().len(), 4);
}

/// The one rule set (src/rules.rs, tests/rules-cases.json) behind `check manifest`: names
/// that collide or that rasa reserves for its temporaries (rollback or setup would delete the
/// persistent subvolume), runtime filesystems, storage roots inside entries or each other.
#[test]
fn check_manifest_refuses_collisions_reserved_names_and_runtime_paths() {
    let dir = tempfile::tempdir().unwrap();
    let check = |rollback: &str, entries: &str| {
        let file = dir.path().join("m.json");
        std::fs::write(
            &file,
            format!(
                r#"{{"version": 1, "rollback": {{"device": "/dev/mapper/cryptroot", "keep": 5, "keepDays": 7, {rollback}}}, "entries": [{entries}]}}"#
            ),
        )
        .unwrap();
        let out = rasa(&["check", "manifest", file.to_str().unwrap()]);
        (out.status.code(), stdout(&out))
    };
    let names = |root: &str, blank: &str, persist: &str| {
        format!(
            r#""root": "{root}", "blank": "{blank}", "oldRoots": "old_roots", "persist": "{persist}""#
        )
    };
    let entry = |root: &str, path: &str| {
        format!(
            r#"{{"storageRoot": "{root}", "path": "{path}", "kind": "directory", "user": "root", "group": "root", "mode": "0755"}}"#
        )
    };
    let ok = entry("/persist", "/var/lib/nixos");
    assert_eq!(
        check(&names("root", "root-blank", "persist"), &ok).0,
        Some(0)
    );
    for (rollback, entries, phrase) in [
        (
            names("root", "root-blank", "root"),
            ok.clone(),
            "both name \"root\"",
        ),
        (
            names("root", "root-blank", "root.rasa-new"),
            ok.clone(),
            "ends in .rasa-new",
        ),
        (
            names("root", "root-blank", "root-blank.rasa-new"),
            ok.clone(),
            "ends in .rasa-new",
        ),
        (
            names("root", "root-blank", "persist"),
            entry("/persist", "/proc/sys"),
            "runtime filesystem",
        ),
        (
            names("root", "root-blank", "persist"),
            entry("/persist", "/run/keys"),
            "runtime filesystem",
        ),
        (
            names("root", "root-blank", "persist"),
            format!("{ok}, {}", entry("/persist/home", "/home")),
            "storage roots must not contain each other",
        ),
        (
            names("root", "root-blank", "persist"),
            format!(
                "{}, {}",
                entry("/persist", "/srv"),
                entry("/srv/persist", "/etc")
            ),
            "bind mount would cover the storage",
        ),
    ] {
        let (code, text) = check(&rollback, &entries);
        assert_eq!(code, Some(4), "{rollback} {entries}: {text}");
        assert!(text.contains(phrase), "{phrase:?} not in: {text}");
    }
}

/// A large hostile manifest (tens of thousands of directory entries, deep nesting) is checked
/// in seconds: the rules sort and sweep instead of comparing every pair of entries.
#[test]
fn check_manifest_stays_fast_on_a_large_hostile_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.json");
    let mut entries = Vec::new();
    let mut deep = String::new();
    for i in 0..1500 {
        deep.push_str("/d");
        entries.push(format!(
            r#"{{"storageRoot": "/persist{}", "path": "{deep}", "kind": "directory", "user": "root", "group": "root", "mode": "0755"}}"#,
            i % 2
        ));
    }
    for i in 0..40_000 {
        entries.push(format!(
            r#"{{"storageRoot": "/persist", "path": "/srv/{i}", "kind": "directory", "user": "root", "group": "root", "mode": "0755"}}"#
        ));
    }
    std::fs::write(
        &file,
        format!(
            r#"{{"version": 1, "rollback": {{"device": "/dev/x", "root": "root", "blank": "root-blank", "oldRoots": "old_roots", "persist": "persist", "keep": 5, "keepDays": 7}}, "entries": [{}]}}"#,
            entries.join(",")
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = rasa(&["check", "manifest", "--json", file.to_str().unwrap()]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["problems"].as_array().unwrap().len(), 1499);
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
}

#[test]
fn check_manifest_refuses_unreadable_and_non_json_with_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.json");
    std::fs::write(&file, "version = 1\n").unwrap();
    let out = rasa(&["check", "manifest", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out).replace(&dir.path().display().to_string(), "[TMP]");
    expect_test::expect![[r#"
        rasa: error: [TMP]/broken.json is not valid JSON: expected value at line 1 column 1
        rasa:          fix: regenerate it from the NixOS configuration, or fix the file by hand
        rasa:          nothing was changed
    "#]]
    .assert_eq(&err);
    let missing = rasa(&["check", "manifest", "/nonexistent/manifest.json"]);
    assert_eq!(missing.status.code(), Some(3));
    assert!(stderr(&missing).contains("cannot read manifest /nonexistent/manifest.json"));
}

/// A machine: the standard layout, a live root with the persist subvolume mounted at /persist.
struct Machine {
    fs: LoopBtrfs,
    live: PathBuf,
    manifest: PathBuf,
}

impl Machine {
    fn new(test: &str) -> Option<Machine> {
        let fs = LoopBtrfs::new(test, 300)?;
        fs.standard_layout();
        std::fs::create_dir(fs.path("old_roots")).unwrap();
        fs.subvolume("old_roots/20260101T000000Z");
        fs.subvolume("old_roots/20260102T000000Z");
        let live = fs.dir.path().join("live");
        std::fs::create_dir_all(live.join("persist")).unwrap();
        sh(&format!(
            "mount --bind {} {}",
            fs.path("persist").display(),
            live.join("persist").display()
        ));
        std::fs::create_dir_all(live.join("var/lib/app")).unwrap();
        std::fs::write(live.join("var/lib/app/state"), b"state").unwrap();
        std::fs::create_dir_all(live.join("etc")).unwrap();
        std::fs::write(live.join("etc/machine-id"), b"abc\n").unwrap();
        let manifest = fs.dir.path().join("manifest.json");
        std::fs::write(
            &manifest,
            r#"{"version": 1,
  "rollback": {"device": "/dev/null", "root": "root", "blank": "root-blank",
    "oldRoots": "old_roots", "persist": "persist", "keep": 5, "keepDays": 7},
  "entries": [
    {"storageRoot": "/persist", "path": "/var/lib/app", "kind": "directory", "user": "root", "group": "root", "mode": "0755"},
    {"storageRoot": "/persist", "path": "/etc/machine-id", "kind": "file", "user": "root", "group": "root", "mode": "0755"},
    {"storageRoot": "/persist", "path": "/var/lib/not-yet", "kind": "directory", "user": "root", "group": "root", "mode": "0755"}
  ]}"#,
        )
        .unwrap();
        Some(Machine { fs, live, manifest })
    }

    fn check(&self, extra: &[&str]) -> Output {
        let mut args = vec![
            "check",
            "system",
            "--manifest",
            self.manifest.to_str().unwrap(),
            "--live-root",
            self.live.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.fs.rasa(&args)
    }

    fn report(&self, out: &Output) -> String {
        let text = stdout(out)
            .replace(&self.fs.dir.path().display().to_string(), "[TMP]")
            .replace(&self.fs.device.display().to_string(), "[DEVICE]");
        // The time of the migration run changes with every run.
        text.lines()
            .map(|l| match l.find("into /persist: ") {
                Some(i) => format!("{}[TIME]{}", &l[..i + 15], &l[i + 31..]),
                None => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(self.live.join("persist"))
            .output();
    }
}

#[test]
fn check_system_reports_unmigrated_state_then_passes_after_migrate() {
    let Some(m) = Machine::new("check_system_reports_unmigrated_state_then_passes_after_migrate")
    else {
        return;
    };
    let before = m.check(&[]);
    assert_eq!(before.status.code(), Some(4), "{}", stderr(&before));
    insta::assert_snapshot!("system_before_migrate", m.report(&before));

    let migrate = Command::new(RASA)
        .args(["migrate", "--apply", "--manifest"])
        .arg(&m.manifest)
        .arg("--live-root")
        .arg(&m.live)
        .output()
        .unwrap();
    assert_eq!(migrate.status.code(), Some(0), "{}", stderr(&migrate));

    let after = m.check(&[]);
    assert_eq!(after.status.code(), Some(0), "{}", stderr(&after));
    insta::assert_snapshot!("system_after_migrate", m.report(&after));

    let json = m.check(&["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert!(v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["status"] != "fail"));
}

#[test]
fn check_system_finds_a_bad_blank_and_an_unmounted_storage_root() {
    let Some(m) = Machine::new("check_system_finds_a_bad_blank_and_an_unmounted_storage_root")
    else {
        return;
    };
    // A blank that is writable and has content, and a storage root that is a plain directory.
    sh(&format!(
        "btrfs -q property set -ts {} ro false",
        m.fs.path("root-blank").display()
    ));
    std::fs::write(m.fs.path("root-blank/leftover"), b"x").unwrap();
    sh(&format!("umount {}", m.live.join("persist").display()));
    // users.mutableUsers = true, as NixOS's activation script hands it to update-users-groups.
    let store = m.live.join("nix/store");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(
        store.join("abc-users-groups.json"),
        r#"{"mutableUsers": true, "users": []}"#,
    )
    .unwrap();
    let profile = m.live.join("nix/var/nix/profiles/system");
    std::fs::create_dir_all(&profile).unwrap();
    std::fs::write(
        profile.join("activate"),
        "#!/bin/sh\nperl update-users-groups.pl /nix/store/abc-users-groups.json\n",
    )
    .unwrap();
    let out = m.check(&[]);
    assert_eq!(out.status.code(), Some(4));
    insta::assert_snapshot!("system_bad_blank_unmounted_storage", m.report(&out));

    sh(&format!(
        "btrfs -q property set -ts {} ro true",
        m.fs.path("root-blank").display()
    ));
    let out = m.check(&[]);
    assert!(
        stdout(&out)
            .contains("✗ the blank root-blank is read-only but not empty (1 entry, e.g. leftover)"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn check_system_on_a_device_without_btrfs() {
    let Some(m) = Machine::new("check_system_on_a_device_without_btrfs") else {
        return;
    };
    let image = m.fs.dir.path().join("not-btrfs.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let out = Command::new(RASA)
        .args(["check", "system", "--manifest"])
        .arg(&m.manifest)
        .arg("--device")
        .arg(&image)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let text = stdout(&out).replace(&m.fs.dir.path().display().to_string(), "[TMP]");
    insta::assert_snapshot!(text, @r"
    ✓ manifest [TMP]/manifest.json is valid (--manifest)
    ✗ [TMP]/not-btrfs.img does not hold a btrfs filesystem
        fix: pass the unlocked btrfs device with --device (for LUKS: /dev/mapper/<name>)
    1 passed, 1 failed, 0 warnings
    ");
}

// ---- check system: the live paths of entries (issue 12 item 20, neededForBoot) ----

fn migrate_apply(m: &Machine) -> Output {
    Command::new(RASA)
        .args(["migrate", "--apply", "--manifest"])
        .arg(&m.manifest)
        .arg("--live-root")
        .arg(&m.live)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn with_entries(m: &Machine, entries: &str) {
    std::fs::write(&m.manifest, common::manifest_text(entries)).unwrap();
}

/// A symlinked parent (/home/alice -> /data/alice) is a failure with the fix, not an entry
/// that "exists nowhere yet": the next boot erases what is behind it.
#[test]
fn check_system_fails_a_symlink_on_an_entry_path() {
    let Some(m) = Machine::new("check_system_fails_a_symlink_on_an_entry_path") else {
        return;
    };
    std::fs::create_dir_all(m.live.join("data/alice/.ssh")).unwrap();
    std::fs::write(m.live.join("data/alice/.ssh/id_ed25519"), b"key").unwrap();
    std::fs::create_dir_all(m.live.join("home")).unwrap();
    std::os::unix::fs::symlink("/data/alice", m.live.join("home/alice")).unwrap();
    with_entries(
        &m,
        r#"{"storageRoot": "/persist", "path": "/var/lib/app", "kind": "directory", "user": "root", "group": "root", "mode": "0755"},
           {"storageRoot": "/persist", "path": "/home/alice/.ssh", "kind": "directory", "user": "root", "group": "root", "mode": "0700"}"#,
    );
    // Everything else is migrated, so the symlink is the only thing wrong.
    let migrated = migrate_apply(&m);
    assert_eq!(migrated.status.code(), Some(4), "{}", stderr(&migrated));
    let out = m.check(&[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let report = m.report(&out);
    assert!(
        report.contains(
            "✗ manifest entry /home/alice/.ssh: /home/alice is a symlink to /data/alice; rasa \
             does not follow it, and the next boot erases what is there"
        ),
        "{report}"
    );
    assert!(
        report.contains("fix: persist the real path (the symlink's target) instead"),
        "{report}"
    );
    assert!(!report.contains("exist nowhere yet"), "{report}");
}

/// An entry the initrd mounts (neededForBoot) must have its storage copy before the first
/// wiping boot, even when there is nothing to copy; migrate creates it.
#[test]
fn check_system_fails_while_a_needed_for_boot_copy_is_missing() {
    let Some(m) = Machine::new("check_system_fails_while_a_needed_for_boot_copy_is_missing") else {
        return;
    };
    with_entries(
        &m,
        r#"{"storageRoot": "/persist", "path": "/var/lib/app", "kind": "directory", "user": "root", "group": "root", "mode": "0755"},
           {"storageRoot": "/persist", "path": "/var/lib/nixos", "kind": "directory", "user": "root", "group": "root", "mode": "0755", "neededForBoot": true}"#,
    );
    let app = migrate_apply(&m);
    assert_eq!(app.status.code(), Some(0), "{}", stderr(&app));
    // As an older migrate (or a hand-made copy) would have left it: the needed path missing.
    let _ = std::fs::remove_dir(m.live.join("persist/var/lib/nixos"));
    let out = m.check(&[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let report = m.report(&out);
    assert!(
        report.contains(
            "✗ /var/lib/nixos is needed for boot (the initrd mounts it before activation) but \
             /persist/var/lib/nixos does not exist"
        ),
        "{report}"
    );
    let migrated = migrate_apply(&m);
    assert_eq!(migrated.status.code(), Some(0), "{}", stderr(&migrated));
    let out = m.check(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", m.report(&out));
}

/// The NixOS profile is a chain of absolute symlinks (system -> system-2-link ->
/// /nix/store/...-nixos-system): under --live-root they must be resolved inside the live root,
/// not on the machine running rasa, or the users.mutableUsers warning is never given.
#[test]
fn check_system_reads_the_profile_through_its_symlinks_inside_the_live_root() {
    let Some(m) =
        Machine::new("check_system_reads_the_profile_through_its_symlinks_inside_the_live_root")
    else {
        return;
    };
    let store = m.live.join("nix/store");
    std::fs::create_dir_all(store.join("abc-nixos-system")).unwrap();
    std::fs::write(
        store.join("abc-users-groups.json"),
        r#"{"mutableUsers": true, "users": []}"#,
    )
    .unwrap();
    std::fs::write(
        store.join("abc-nixos-system/activate"),
        "#!/bin/sh\nperl update-users-groups.pl /nix/store/abc-users-groups.json\n",
    )
    .unwrap();
    let profiles = m.live.join("nix/var/nix/profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    std::os::unix::fs::symlink(
        "/nix/store/abc-nixos-system",
        profiles.join("system-2-link"),
    )
    .unwrap();
    std::os::unix::fs::symlink("system-2-link", profiles.join("system")).unwrap();
    let out = m.check(&[]);
    let report = m.report(&out);
    assert!(
        report.contains("! users.mutableUsers is true but /etc/shadow is not persisted"),
        "{report}"
    );
}

/// A closed stdout (`rasa check manifest … | head -c1`) ends rasa quietly, not with a panic.
#[test]
fn check_manifest_on_a_closed_stdout_is_not_a_crash() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(common::RASA)
        .args(["check", "manifest"])
        .arg(example())
        .stdout(writer)
        .output()
        .unwrap();
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(141), "{}", stderr(&out));
}

// ---- check system: uid/gid drift (issue 13 part 4) ----

fn write_map(dir: &Path, file: &str, json: &str) {
    std::fs::create_dir_all(dir.join("var/lib/nixos")).unwrap();
    std::fs::write(dir.join("var/lib/nixos").join(file), json).unwrap();
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

/// /var/lib/nixos was not kept: the boot kept as an old root gave acme uid/gid 999, this boot
/// gave acme 995 and 999 to nginx. acme's stored state (still 999) is named file by file, with
/// the chown that gives it back; files whose owner still maps to its user are not.
#[test]
fn check_system_names_every_stored_file_whose_owner_drifted() {
    let Some(m) = Machine::new("check_system_names_every_stored_file_whose_owner_drifted") else {
        return;
    };
    with_entries(
        &m,
        r#"{"storageRoot": "/persist", "path": "/var/lib/acme", "kind": "directory", "user": "acme", "group": "acme", "mode": "0755"},
           {"storageRoot": "/persist", "path": "/home/alice", "kind": "directory", "user": "alice", "group": "users", "mode": "0700"},
           {"storageRoot": "/persist", "path": "/var/lib/private/dyn", "kind": "directory", "user": "root", "group": "root", "mode": "0700"}"#,
    );
    // The module's state check names the unit whose state /var/lib/acme is.
    let text = std::fs::read_to_string(&m.manifest).unwrap();
    let text = text.trim_end().strip_suffix('}').unwrap().to_owned()
        + r#", "services": [{"unit": "acme-example.org.service", "paths": ["/var/lib/acme", "/var/lib/acme/example.org"]}]}"#;
    std::fs::write(&m.manifest, text).unwrap();
    let old_root = m.fs.path("old_roots/20260102T000000Z");
    write_map(
        &old_root,
        "uid-map",
        r#"{"acme":999,"alice":1000,"root":0}"#,
    );
    write_map(&old_root, "gid-map", r#"{"acme":999,"root":0,"users":100}"#);
    write_map(
        &m.live,
        "uid-map",
        r#"{"acme":995,"alice":1000,"nginx":999,"root":0}"#,
    );
    write_map(
        &m.live,
        "gid-map",
        r#"{"acme":995,"nginx":999,"root":0,"users":100}"#,
    );
    let store = m.live.join("persist");
    std::fs::create_dir_all(store.join("var/lib/acme/certs")).unwrap();
    std::fs::write(store.join("var/lib/acme/certs/cert.pem"), b"cert").unwrap();
    std::fs::write(store.join("var/lib/acme/account.key"), b"key").unwrap();
    std::fs::create_dir_all(store.join("home/alice")).unwrap();
    std::fs::write(store.join("home/alice/notes"), b"mine").unwrap();
    // A DynamicUser service's files: ids no map has ever named are nobody's drift.
    std::fs::create_dir_all(store.join("var/lib/private/dyn")).unwrap();
    std::fs::write(store.join("var/lib/private/dyn/db"), b"d").unwrap();
    for p in [
        "var/lib/acme",
        "var/lib/acme/certs",
        "var/lib/acme/certs/cert.pem",
        "var/lib/acme/account.key",
    ] {
        chown(&store.join(p), 999, 999);
    }
    for p in ["home/alice", "home/alice/notes"] {
        chown(&store.join(p), 1000, 100);
    }
    chown(&store.join("var/lib/private/dyn/db"), 61_200, 61_200);

    let out = m.check(&[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let report = m.report(&out);
    let drift: Vec<&str> = report
        .lines()
        .filter(|l| {
            l.contains("owned by uid") || l.contains("owned by gid") || l.contains("give them back")
        })
        .collect();
    expect_test::expect![[r#"
        ✗ 4 stored files (state of acme-example.org.service) owned by uid 999, which was acme's in old root 20260102T000000Z; acme is now uid 995, and uid 999 is now nginx's: /persist/var/lib/acme, /persist/var/lib/acme/account.key, /persist/var/lib/acme/certs, /persist/var/lib/acme/certs/cert.pem
            fix: give them back to acme: find /persist -xdev -uid 999 -exec chown -h 995 {} +; keep /var/lib/nixos (rasa.presets.essential, needed for boot) so that ids stay the same across boots
        ✗ 4 stored files (state of acme-example.org.service) owned by gid 999, which was acme's in old root 20260102T000000Z; acme is now gid 995, and gid 999 is now nginx's: /persist/var/lib/acme, /persist/var/lib/acme/account.key, /persist/var/lib/acme/certs, /persist/var/lib/acme/certs/cert.pem
            fix: give them back to acme: find /persist -xdev -gid 999 -exec chgrp -h 995 {} +; keep /var/lib/nixos (rasa.presets.essential, needed for boot) so that ids stay the same across boots"#]]
    .assert_eq(&drift.join("\n"));
    assert!(!report.contains("/persist/home/alice/notes"), "{report}");
    assert!(
        !report.contains("/persist/var/lib/private/dyn/db"),
        "{report}"
    );

    // JSON names every file.
    let json = m.check(&["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let paths: Vec<&serde_json::Value> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["message"].as_str().unwrap().contains("owned by uid 999"))
        .flat_map(|c| c["paths"].as_array().unwrap())
        .collect();
    assert_eq!(paths.len(), 4, "{v}");

    // The fix it gives, applied: nothing drifts any more.
    sh(&format!(
        "find {} -xdev -uid 999 -exec chown -h 995 {{}} + && find {} -xdev -gid 999 -exec chgrp -h 995 {{}} +",
        store.display(),
        store.display()
    ));
    let out = m.check(&[]);
    let report = m.report(&out);
    assert!(
        report.contains("stored files match the uid/gid maps (1 earlier map compared)"),
        "{report}"
    );
    assert!(!report.contains("owned by uid"), "{report}");
}

/// Without an earlier map, the owner a manifest entry declares is what the stored directory
/// belonged to; and a live root without maps is said to be unchecked, not passed.
#[test]
fn check_system_compares_a_declared_owner_with_the_current_map() {
    let Some(m) = Machine::new("check_system_compares_a_declared_owner_with_the_current_map")
    else {
        return;
    };
    with_entries(
        &m,
        r#"{"storageRoot": "/persist", "path": "/var/lib/tailscale", "kind": "directory", "user": "tailscale", "group": "root", "mode": "0700"}"#,
    );
    let store = m.live.join("persist");
    std::fs::create_dir_all(store.join("var/lib/tailscale")).unwrap();
    chown(&store.join("var/lib/tailscale"), 990, 0);
    let out = m.check(&[]);
    assert!(
        m.report(&out).contains(
            "· no /var/lib/nixos/uid-map or gid-map on the live root: uid/gid drift not checked"
        ),
        "{}",
        m.report(&out)
    );
    write_map(&m.live, "uid-map", r#"{"root":0,"tailscale":991}"#);
    let out = m.check(&[]);
    assert_eq!(out.status.code(), Some(4), "{}", m.report(&out));
    assert!(
        m.report(&out).contains(
            "✗ 1 stored file owned by uid 990, which was tailscale's in the manifest entry \
             /var/lib/tailscale; tailscale is now uid 991: /persist/var/lib/tailscale"
        ),
        "{}",
        m.report(&out)
    );
}

/// The manifest's services (the module's state check): state on the root that nothing persists
/// is named by unit; persisted state, state on a file system of its own and state that does not
/// exist are not.
#[test]
fn check_system_names_the_units_whose_state_the_next_boot_erases() {
    let Some(m) = Machine::new("check_system_names_the_units_whose_state_the_next_boot_erases")
    else {
        return;
    };
    with_entries(
        &m,
        r#"{"storageRoot": "/persist", "path": "/var/lib/app", "kind": "directory", "user": "root", "group": "root", "mode": "0755"}"#,
    );
    let text = std::fs::read_to_string(&m.manifest).unwrap();
    let text = text.trim_end().strip_suffix('}').unwrap().to_owned()
        + r#", "services": [
            {"unit": "app.service", "paths": ["/var/lib/app"]},
            {"unit": "tailscaled.service", "paths": ["/var/lib/tailscale"]},
            {"unit": "kuma.service", "paths": ["/var/lib/private/uptime-kuma"]},
            {"unit": "mounted.service", "paths": ["/srv/mounted"]},
            {"unit": "absent.service", "paths": ["/var/lib/absent"]}]}"#;
    std::fs::write(&m.manifest, text).unwrap();
    std::fs::create_dir_all(m.live.join("var/lib/tailscale")).unwrap();
    std::fs::write(m.live.join("var/lib/tailscale/tailscaled.state"), b"k").unwrap();
    std::fs::create_dir_all(m.live.join("var/lib/private/uptime-kuma")).unwrap();
    // A file system of its own (a tmpfs) at /srv/mounted.
    std::fs::create_dir_all(m.live.join("srv/mounted")).unwrap();
    sh(&format!(
        "mount -t tmpfs none {}",
        m.live.join("srv/mounted").display()
    ));
    let out = m.check(&[]);
    let _ = Command::new("umount")
        .arg(m.live.join("srv/mounted"))
        .output();
    let report = m.report(&out);
    let lines: Vec<&str> = report.lines().filter(|l| l.contains("unit")).collect();
    expect_test::expect![[r#"
        · state of 2 units is on the root and not persisted, so the next boot erases it: tailscaled.service (/var/lib/tailscale); kuma.service (/var/lib/private/uptime-kuma)"#]]
    .assert_eq(&lines.join("\n"));
}
