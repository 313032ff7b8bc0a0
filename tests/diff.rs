//! `rasa diff` on real btrfs: both engines on the same tree, their exact output, and their
//! agreement; --nix parsed by Nix; --old-root after a real rollback; refusals.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{sh, stderr, stdout, LoopBtrfs};
use expect_test::expect;

/// The test manifest, its storage root the `persist` subvolume of the test filesystem.
fn manifest_json(storage: &Path) -> String {
    r#"{
  "version": 1,
  "rollback": { "device": "/dev/null", "root": "root", "blank": "root-blank", "oldRoots": "old_roots",
                "persist": "persist", "keep": 5, "keepDays": 7 },
  "entries": [
    { "storageRoot": "@STORAGE@", "path": "/var/lib/nixos", "kind": "directory", "user": "root", "group": "root", "mode": "0755" },
    { "storageRoot": "@STORAGE@", "path": "/etc/machine-id", "kind": "file", "user": "root", "group": "root", "mode": "0755" }
  ],
  "diffIgnore": ["/var/cache/**"]
}"#
    .replace("@STORAGE@", storage.to_str().unwrap())
}

/// Write the test manifest, with the storage copies of its entries in place (as after
/// `rasa migrate --apply`).
fn stored_manifest(fs: &LoopBtrfs) -> PathBuf {
    let storage = fs.path("persist");
    std::fs::create_dir_all(storage.join("var/lib/nixos")).unwrap();
    write(&storage.join("etc/machine-id"), "0123\n");
    let manifest = fs.dir.path().join("manifest.json");
    std::fs::write(&manifest, manifest_json(&storage)).unwrap();
    manifest
}

fn write(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

/// How the blank and the root are related.
#[derive(Clone, Copy)]
enum Origin {
    /// What `rasa rollback` makes: the root is a snapshot of the blank.
    RootFromBlank,
    /// What the seed's guide does: the blank is a read-only snapshot of the root.
    BlankFromRoot,
}

/// The blank's content, the root derived from it, then a boot's worth of changes.
fn scenario(fs: &LoopBtrfs, origin: Origin) -> PathBuf {
    let base = match origin {
        Origin::RootFromBlank => "seed",
        Origin::BlankFromRoot => "root",
    };
    fs.subvolume(base);
    fs.subvolume("persist");
    let b = fs.path(base);
    for (rel, content) in [
        ("etc/keep.conf", "unchanged\n"),
        ("etc/read.conf", "only read\n"),
        ("etc/modify.conf", "old\n"),
        ("etc/delete.conf", "gone soon\n"),
        ("etc/rename-me.conf", "renamed\n"),
        ("etc/chmod.conf", "mode\n"),
        ("olddir/a", "a\n"),
        ("olddir/sub/b", "b\n"),
        ("var/lib/nixos/uid-map", "{}\n"),
    ] {
        write(&b.join(rel), content);
    }
    for dir in [
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "var/log",
        "var/cache",
        "home/alice",
        "root",
    ] {
        std::fs::create_dir_all(b.join(dir)).unwrap();
    }
    // Fixed times, so that reading a file (relatime) really updates its atime below.
    sh(&format!(
        "find '{}' -exec touch -h -d '2020-01-01 00:00:00' {{}} +",
        b.display()
    ));
    let top = fs.top.display();
    match origin {
        Origin::RootFromBlank => {
            sh(&format!(
                "btrfs -q subvolume snapshot -r {top}/seed {top}/root-blank"
            ));
            sh(&format!(
                "btrfs -q subvolume snapshot {top}/root-blank {top}/root"
            ));
            sh(&format!("btrfs -q subvolume delete {top}/seed"));
        }
        Origin::BlankFromRoot => {
            sh(&format!(
                "btrfs -q subvolume snapshot -r {top}/root {top}/root-blank"
            ));
        }
    }
    let r = fs.path("root");
    // New files and directories, some of them well-known state.
    for (rel, content) in [
        ("etc/new.conf", "new\n"),
        ("var/lib/app/state.db", "0123456789"),
        ("home/alice/notes.txt", "notes\n"),
        ("etc/ssh/ssh_host_ed25519_key", "KEY\n"),
        ("var/lib/bluetooth/AA:BB/info", "paired\n"),
        (
            "etc/NetworkManager/system-connections/home.nmconnection",
            "psk=x\n",
        ),
        ("var/lib/nixos/gid-map", "{}\n"),
        ("var/cache/fontconfig/x.cache", "cache"),
        ("root/.bash_history", "ls\n"),
        ("tmp/scratch", "t"),
        ("run/pidfile", "1"),
    ] {
        write(&r.join(rel), content);
    }
    std::fs::write(r.join("etc/modify.conf"), "new content\n").unwrap();
    std::fs::remove_file(r.join("etc/delete.conf")).unwrap();
    std::fs::rename(r.join("etc/rename-me.conf"), r.join("etc/renamed.conf")).unwrap();
    sh(&format!(
        "chmod 600 '{}'",
        r.join("etc/chmod.conf").display()
    ));
    sh(&format!("chmod 700 '{}'", r.join("var/log").display()));
    std::fs::rename(r.join("olddir"), r.join("movedir")).unwrap();
    std::os::unix::fs::symlink("/nix/store/abc-etc/static", r.join("etc/static")).unwrap();
    std::os::unix::fs::symlink("/home/alice", r.join("etc/alice-link")).unwrap();
    std::os::unix::fs::symlink(fs.path("persist/etc/machine-id"), r.join("etc/machine-id"))
        .unwrap();
    std::fs::hard_link(r.join("etc/keep.conf"), r.join("etc/keep-link.conf")).unwrap();
    std::fs::remove_file(r.join("etc/keep-link.conf")).unwrap();
    std::fs::write(
        r.join(std::ffi::OsStr::from_bytes(b"etc/caf\xff")),
        "latin-1\n",
    )
    .unwrap();
    std::fs::read(r.join("etc/read.conf")).unwrap();
    fs.subvolume("root/var/lib/machines");
    write(&r.join("var/lib/machines/inside"), "nested subvolume\n");
    sh("sync");
    stored_manifest(fs)
}

/// A test filesystem with the scenario (root made from the blank) and its manifest; `None`
/// when the test is skipped.
fn with_scenario(test: &str) -> Option<(LoopBtrfs, PathBuf)> {
    let fs = LoopBtrfs::new(test, 300)?;
    let manifest = scenario(&fs, Origin::RootFromBlank);
    Some((fs, manifest))
}

fn diff(fs: &LoopBtrfs, manifest: &Path, extra: &[&str]) -> (String, String) {
    let mut args = vec![
        "diff",
        "--manifest",
        manifest.to_str().unwrap(),
        "--ignore",
        "/root/.bash_history",
    ];
    args.extend_from_slice(extra);
    let out = fs.rasa(&args);
    assert!(
        out.status.success(),
        "rasa {args:?} failed: {}",
        stderr(&out)
    );
    (stdout(&out), stderr(&out))
}

const EXPECTED_LONG: expect_test::Expect = expect![[r#"
    new      dir                0  /etc/NetworkManager
    new      dir                0  /etc/NetworkManager/system-connections
    new      file               6  /etc/NetworkManager/system-connections/home.nmconnection
    new      symlink           11  /etc/alice-link
    new      file               8  /etc/caf\xff
    modified file               5  /etc/chmod.conf
    modified file              10  /etc/keep.conf
    modified file              12  /etc/modify.conf
    new      file               4  /etc/new.conf
    new      file               8  /etc/renamed.conf
    new      dir                0  /etc/ssh
    new      file               4  /etc/ssh/ssh_host_ed25519_key
    new      file               6  /home/alice/notes.txt
    new      dir                0  /movedir
    new      file               2  /movedir/a
    new      dir                0  /movedir/sub
    new      file               2  /movedir/sub/b
    new      dir                0  /var/lib/app
    new      file              10  /var/lib/app/state.db
    new      dir                0  /var/lib/bluetooth
    new      dir                0  /var/lib/bluetooth/AA:BB
    new      file               7  /var/lib/bluetooth/AA:BB/info
    new      dir                0  /var/lib/machines
    new      file              17  /var/lib/machines/inside
    modified dir                0  /var/log
"#]];

fn check_scenario(test: &str, origin: Origin) {
    let Some(fs) = LoopBtrfs::new(test, 300) else {
        return;
    };
    let manifest = scenario(&fs, origin);
    let (btrfs_long, btrfs_err) = diff(&fs, &manifest, &["--engine", "btrfs", "--long"]);
    let (walk_long, _) = diff(&fs, &manifest, &["--engine", "walk", "--long"]);
    let root = fs.path("root");
    let (walk_live_long, _) = diff(
        &fs,
        &manifest,
        &[
            "--engine",
            "walk",
            "--live-root",
            root.to_str().unwrap(),
            "--long",
        ],
    );
    let (auto_long, _) = diff(&fs, &manifest, &["--long"]);
    EXPECTED_LONG.assert_eq(&btrfs_long);
    assert_eq!(
        walk_long, btrfs_long,
        "the walk disagrees with the btrfs engine"
    );
    assert_eq!(
        walk_live_long, btrfs_long,
        "the walk of the mounted root disagrees"
    );
    assert_eq!(auto_long, btrfs_long);
    assert!(!btrfs_err.contains("no manifest"), "{btrfs_err}");

    // JSON: the same paths, the non-UTF-8 one losslessly.
    let (btrfs_json, _) = diff(&fs, &manifest, &["--engine", "btrfs", "--json"]);
    let (walk_json, _) = diff(&fs, &manifest, &["--engine", "walk", "--json"]);
    let strip_engine = |s: &str| s.replace("\"engine\": \"walk\"", "\"engine\": \"btrfs\"");
    assert_eq!(strip_engine(&walk_json), btrfs_json);
    let parsed: serde_json::Value = serde_json::from_str(&btrfs_json).unwrap();
    assert_eq!(parsed["engine"], "btrfs");
    assert_eq!(parsed["compared_with"], "root-blank");
    assert_eq!(parsed["paths"], 25);
    let odd = parsed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "/etc/caf\\xff")
        .unwrap();
    let bytes: Vec<u8> = odd["path_bytes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(bytes, b"/etc/caf\xff");
}

#[test]
fn engines_agree_on_a_root_made_from_the_blank() {
    check_scenario(
        "engines_agree_on_a_root_made_from_the_blank",
        Origin::RootFromBlank,
    );
}

#[test]
fn engines_agree_on_a_blank_made_from_the_root() {
    check_scenario(
        "engines_agree_on_a_blank_made_from_the_root",
        Origin::BlankFromRoot,
    );
}

/// Thousands of old and new inodes, so that the btrfs engine's search spans many leaves and
/// is split into several ranges searched by several threads; old files changed in every way
/// the engines tell apart. Both engines must give the same answer, with the expected counts.
#[test]
fn engines_agree_on_a_tree_spanning_many_leaves() {
    let Some(fs) = LoopBtrfs::new("engines_agree_on_a_tree_spanning_many_leaves", 300) else {
        return;
    };
    const DIRS: usize = 20;
    const PER_DIR: usize = 150;
    fs.subvolume("seed");
    let seed = fs.path("seed");
    for d in 0..DIRS {
        for f in 0..PER_DIR {
            write(
                &seed.join(format!("old{d:02}/f{f:03}")),
                &format!("{d} {f}\n"),
            );
        }
    }
    sh(&format!(
        "find '{}' -exec touch -h -d '2020-01-01 00:00:00' {{}} + && \
         btrfs -q subvolume snapshot -r {top}/seed {top}/root-blank && \
         btrfs -q subvolume snapshot {top}/root-blank {top}/root",
        seed.display(),
        top = fs.top.display()
    ));
    let root = fs.path("root");
    let (mut modified, mut new_files, mut new_dirs) = (0, 0, 0);
    for d in 0..DIRS {
        let dir = root.join(format!("old{d:02}"));
        for f in 0..PER_DIR {
            let file = dir.join(format!("f{f:03}"));
            match f % 10 {
                // Written in place, chmod-ed, and given a second name in a new directory:
                // the same inode, changed.
                1 => std::fs::write(&file, "rewritten\n").unwrap(),
                2 => std::fs::set_permissions(&file, PermissionsExt::from_mode(0o600)).unwrap(),
                3 => {
                    let links = root.join(format!("links{d:02}"));
                    if !links.exists() {
                        std::fs::create_dir(&links).unwrap();
                        new_dirs += 1;
                    }
                    std::fs::hard_link(&file, links.join(format!("l{f:03}"))).unwrap();
                    // Its old name is modified too (link count and ctime).
                    modified += 1;
                    new_files += 1;
                    continue;
                }
                4 => {
                    std::fs::remove_file(&file).unwrap();
                    continue;
                }
                _ => continue,
            }
            modified += 1;
        }
        // The directory's entries changed, but a directory counts as modified only for its
        // mode or owner: its entries are judged on their own.
        let fresh = root.join(format!("new{d:02}"));
        for f in 0..PER_DIR {
            write(&fresh.join(format!("n{f:03}")), "new\n");
            new_files += 1;
        }
        new_dirs += 1;
    }
    sh("sync");
    let manifest = stored_manifest(&fs);
    let (btrfs_long, _) = diff(&fs, &manifest, &["--engine", "btrfs", "--long"]);
    let (walk_long, _) = diff(&fs, &manifest, &["--engine", "walk", "--long"]);
    let count = |prefix: &str| btrfs_long.lines().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(
        (
            count("modified "),
            count("new      file"),
            count("new      dir")
        ),
        (modified, new_files, new_dirs),
        "btrfs engine:\n{btrfs_long}"
    );
    assert!(
        walk_long == btrfs_long,
        "the engines disagree on a large tree:\n{}",
        line_diff(&btrfs_long, &walk_long)
    );
}

/// The lines only one side has, for a readable failure.
fn line_diff(btrfs: &str, walk: &str) -> String {
    let a: std::collections::BTreeSet<&str> = btrfs.lines().collect();
    let b: std::collections::BTreeSet<&str> = walk.lines().collect();
    let mut out = String::new();
    for line in a.difference(&b) {
        out.push_str(&format!("only btrfs: {line}\n"));
    }
    for line in b.difference(&a) {
        out.push_str(&format!("only walk:  {line}\n"));
    }
    out
}

#[test]
fn summary_nix_and_exit_code() {
    let Some((fs, manifest)) = with_scenario("summary_nix_and_exit_code") else {
        return;
    };
    let (summary, _) = diff(&fs, &manifest, &[]);
    expect![[r#"
        25 paths (112 B) on root will be erased by the next boot [engine: btrfs, compared with root-blank]

              SIZE    PATHS      NEW MODIFIED  DIRECTORY
              68 B       12        9        3  /etc
              34 B        8        7        1  /var
               6 B        1        1        0  /home
               4 B        4        4        0  /movedir

        `rasa diff --long` lists every path; `rasa diff --nix` suggests what to persist.
        left out: what root-blank holds unchanged, 2 persisted path(s) from the manifest, symlinks into /nix/store, /proc /sys /dev /run /tmp and 0 other mount(s), paths matching /root/.bash_history /var/cache/**
    "#]]
    .assert_eq(&summary);

    let (nix, _) = diff(&fs, &manifest, &["--nix"]);
    let nix = nix.replace(fs.path("persist").to_str().unwrap(), "/persist");
    expect![[r##"
        # What `rasa diff` found on root that the next boot erases. Paste into your NixOS
        # configuration (with the impermanence module) and delete what you do not want to keep.
        environment.persistence."/persist" = {
          directories = [
            "/etc/NetworkManager/system-connections" # NetworkManager connections (Wi-Fi passwords, VPNs); rasa.presets.networkmanager keeps it
            "/movedir" # 4 paths, 4 B
            "/var/lib/app" # 2 paths, 10 B
            "/var/lib/bluetooth" # Bluetooth pairings; rasa.presets.bluetooth keeps it
            "/var/lib/machines" # 2 paths, 17 B
            "/var/log" # mode or owner differs from the blank
          ];
          files = [
            "/etc/alice-link" # 1 path, 11 B
            # left out, not UTF-8 (Nix strings cannot hold it): /etc/caf\xff
            "/etc/chmod.conf" # 1 path, 5 B
            "/etc/keep.conf" # 1 path, 10 B
            "/etc/modify.conf" # 1 path, 12 B
            "/etc/new.conf" # 1 path, 4 B
            "/etc/renamed.conf" # 1 path, 8 B
            "/etc/ssh/ssh_host_ed25519_key" # ssh host key (clients warn when it changes); rasa.presets.ssh keeps it
            "/home/alice/notes.txt" # 1 path, 6 B
          ];
        };
    "##]].assert_eq(&nix);
    let file = fs.dir.path().join("fragment.nix");
    std::fs::write(&file, format!("{{\n{nix}}}\n")).unwrap();
    let parse = Command::new("nix-instantiate")
        .arg("--parse")
        .arg(&file)
        .output();
    match parse {
        Ok(out) => assert!(
            out.status.success(),
            "nix-instantiate --parse failed: {}",
            stderr(&out)
        ),
        Err(e) => {
            common::skip::<()>(
                "summary_nix_and_exit_code (nix parse)",
                &format!("nix-instantiate not runnable ({e}); apt-get install nix-bin"),
            );
        }
    }

    // No manifest anywhere: nothing counts as persisted, and rasa says so.
    if !Path::new("/etc/rasa/manifest.json").exists()
        && !Path::new("/nix/var/nix/profiles/system/etc/rasa/manifest.json").exists()
    {
        let out = fs.rasa(&["diff", "--long"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("no manifest found"),
            "{}",
            stderr(&out)
        );
        assert!(
            stdout(&out).contains("/var/lib/nixos/gid-map"),
            "{}",
            stdout(&out)
        );
        let out = fs.rasa(&["diff"]);
        assert!(
            stdout(&out).contains("nothing persisted (no manifest)"),
            "{}",
            stdout(&out)
        );
    }
    let out = fs.rasa(&[
        "diff",
        "--manifest",
        manifest.to_str().unwrap(),
        "--exit-code",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    // Everything ignored: nothing remains, exit 0 even with --exit-code.
    let out = fs.rasa(&[
        "diff",
        "--manifest",
        manifest.to_str().unwrap(),
        "--exit-code",
        "--ignore",
        "/**",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    expect![[r#"
        0 paths (0 B) on root will be erased by the next boot [engine: btrfs, compared with root-blank]
        left out: what root-blank holds unchanged, 2 persisted path(s) from the manifest, symlinks into /nix/store, /proc /sys /dev /run /tmp and 0 other mount(s), paths matching /** /var/cache/**
    "#]].assert_eq(&stdout(&out));
}

/// Unmounts (recursively) on drop, so that a failing assertion leaves no mount behind.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-R").arg(&self.0).output();
    }
}

fn code_and_err(out: &std::process::Output) -> (Option<i32>, String) {
    (out.status.code(), stderr(out))
}

#[test]
fn old_root_shows_what_a_past_boot_erased() {
    let Some((fs, manifest)) = with_scenario("old_root_shows_what_a_past_boot_erased") else {
        return;
    };
    let m = manifest.to_str().unwrap();
    let (before, _) = diff(&fs, &manifest, &["--long"]);
    let out = fs.rasa(&["rollback"]);
    assert!(out.status.success(), "rollback failed: {}", stderr(&out));
    let names: Vec<String> = std::fs::read_dir(fs.path("old_roots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    let old = names[0].as_str();
    for engine in ["btrfs", "walk"] {
        let (after, _) = diff(
            &fs,
            &manifest,
            &["--old-root", old, "--engine", engine, "--long"],
        );
        assert_eq!(after, before, "--old-root with the {engine} engine");
    }
    let (json, _) = diff(&fs, &manifest, &["--old-root", old, "--json"]);
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed["tree"], format!("old_roots/{old}"));
    // The fresh root is the blank again: nothing to lose.
    for engine in ["btrfs", "walk"] {
        let (fresh, _) = diff(&fs, &manifest, &["--engine", engine, "--long"]);
        assert_eq!(fresh, "", "fresh root with the {engine} engine");
    }
    let (code, err) =
        code_and_err(&fs.rasa(&["diff", "--manifest", m, "--old-root", "20000101T000000Z"]));
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("no old root \"20000101T000000Z\"")
            && err.contains(old)
            && err.contains("fix:"),
        "{err}"
    );
}

#[test]
fn refusals_name_the_problem_and_the_fix() {
    let Some((fs, manifest)) = with_scenario("refusals_name_the_problem_and_the_fix") else {
        return;
    };
    let m = manifest.to_str().unwrap();
    let tmpfs = fs.dir.path().join("tmpfs");
    std::fs::create_dir(&tmpfs).unwrap();
    sh(&format!("mount -t tmpfs rasa-test '{}'", tmpfs.display()));
    let _tmpfs_guard = Unmount(tmpfs.clone());
    let t = tmpfs.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "diff",
                "--manifest",
                m,
                "--engine",
                "btrfs",
                "--live-root",
                t,
            ],
            "is not on btrfs",
        ),
        (
            vec!["diff", "--manifest", "/nonexistent/manifest.json"],
            "does not exist",
        ),
        (
            vec!["diff", "--manifest", "/etc/hostname"],
            "not valid JSON",
        ),
        (
            vec!["diff", "--manifest", m, "--ignore", "/a/["],
            "not a valid glob",
        ),
        (
            vec!["diff", "--manifest", m, "--blank", "nope"],
            "no blank subvolume \"nope\"",
        ),
    ];
    for (args, needle) in cases {
        let (code, err) = code_and_err(&fs.rasa(&args));
        assert_eq!(code, Some(3), "{args:?}: {err}");
        assert!(
            err.contains(needle) && err.contains("fix:") && err.contains("nothing was changed"),
            "{args:?}: {err}"
        );
    }
    let zeros = fs.dir.path().join("zeros.img");
    std::fs::File::create(&zeros)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let out = Command::new(common::RASA)
        .args(["diff", "--manifest", m, "--device"])
        .arg(&zeros)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let (code, err) = code_and_err(&out);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("does not hold a btrfs filesystem"), "{err}");
    sh(&format!("umount '{}'", tmpfs.display()));
}

#[test]
fn walk_works_on_tmpfs_and_mounts_are_left_out() {
    let Some((fs, manifest)) = with_scenario("walk_works_on_tmpfs_and_mounts_are_left_out") else {
        return;
    };
    // A tmpfs root: no blank, everything counts as new; a mount inside it is left out.
    let tmpfs = fs.dir.path().join("tmpfs");
    std::fs::create_dir(&tmpfs).unwrap();
    sh(&format!("mount -t tmpfs rasa-test '{}'", tmpfs.display()));
    let _tmpfs_guard = Unmount(tmpfs.clone());
    write(&tmpfs.join("etc/hostname"), "box\n");
    write(&tmpfs.join("var/lib/bluetooth/info"), "paired\n");
    std::os::unix::fs::symlink("/nix/store/abc-bashrc", tmpfs.join("etc/bashrc")).unwrap();
    std::fs::create_dir(tmpfs.join("mnt")).unwrap();
    sh(&format!(
        "mount -t tmpfs inner '{}'",
        tmpfs.join("mnt").display()
    ));
    write(&tmpfs.join("mnt/inside"), "other filesystem\n");
    let t = tmpfs.to_str().unwrap();
    for engine in [&["--engine", "walk"][..], &[]] {
        let mut args = vec!["--live-root", t, "--long"];
        args.extend_from_slice(engine);
        let (long, err) = diff(&fs, &manifest, &args);
        expect![[r#"
            new      dir                0  /etc
            new      file               4  /etc/hostname
            new      dir                0  /var
            new      dir                0  /var/lib
            new      dir                0  /var/lib/bluetooth
            new      file               7  /var/lib/bluetooth/info
        "#]]
        .assert_eq(&long);
        assert!(err.contains("everything on it counts as new"), "{err}");
    }
    sh(&format!(
        "umount '{0}/mnt' && umount '{0}'",
        tmpfs.display()
    ));

    // The root subvolume mounted elsewhere, with a bind mount on a new directory: both engines
    // leave the mount point out, and still agree.
    let live = fs.dir.path().join("live");
    std::fs::create_dir(&live).unwrap();
    std::fs::create_dir(fs.path("root/srv")).unwrap();
    write(&fs.path("root/srv/hidden"), "under the mount\n");
    sh(&format!(
        "mount -o subvol=root {} '{}'",
        fs.device.display(),
        live.display()
    ));
    let _live_guard = Unmount(live.clone());
    sh(&format!(
        "mount --bind '{}' '{}'",
        fs.path("persist").display(),
        live.join("srv").display()
    ));
    let l = live.to_str().unwrap();
    let (btrfs, _) = diff(
        &fs,
        &manifest,
        &["--live-root", l, "--engine", "btrfs", "--long"],
    );
    let (walk, _) = diff(
        &fs,
        &manifest,
        &["--live-root", l, "--engine", "walk", "--long"],
    );
    sh(&format!("umount '{0}/srv' && umount '{0}'", live.display()));
    assert_eq!(walk, btrfs);
    EXPECTED_LONG.assert_eq(&btrfs);
}

/// A root made from a blank whose content `fill` writes (through the `seed` subvolume, kept).
fn root_from_seed(fs: &LoopBtrfs, fill: impl FnOnce(&Path)) -> PathBuf {
    fs.subvolume("seed");
    fs.subvolume("persist");
    fill(&fs.path("seed"));
    sh(&format!(
        "btrfs -q subvolume snapshot -r {top}/seed {top}/root-blank && \
         btrfs -q subvolume snapshot {top}/root-blank {top}/root",
        top = fs.top.display()
    ));
    fs.path("root")
}

/// `--long` from both engines, which must agree; returns it.
fn both_engines(fs: &LoopBtrfs, manifest: &Path, extra: &[&str]) -> String {
    sh("sync");
    let mut outputs = Vec::new();
    for engine in ["btrfs", "walk"] {
        let mut args = vec!["--engine", engine, "--long"];
        args.extend_from_slice(extra);
        outputs.push(diff(fs, manifest, &args).0);
    }
    assert!(
        outputs[0] == outputs[1],
        "the engines disagree ({extra:?}):\n{}",
        line_diff(&outputs[0], &outputs[1])
    );
    outputs.swap_remove(0)
}

/// Subvolumes nested in the root (a container engine's, snapper's) leave with the root at the
/// next rollback and are deleted with it by prune: they and everything in them are erased.
/// A subvolume or a filesystem mounted from elsewhere survives and is left out.
#[test]
fn nested_subvolumes_are_erased_with_the_root() {
    let Some(fs) = LoopBtrfs::new("nested_subvolumes_are_erased_with_the_root", 300) else {
        return;
    };
    let root = root_from_seed(&fs, |seed| {
        write(&seed.join("etc/keep.conf"), "kept\n");
        for dir in ["var/lib", "srv", "mnt"] {
            std::fs::create_dir_all(seed.join(dir)).unwrap();
        }
    });
    fs.subvolume("root/var/lib/docker");
    write(&root.join("var/lib/docker/image"), "layer\n");
    std::fs::create_dir(root.join("var/lib/docker/btrfs")).unwrap();
    fs.subvolume("root/var/lib/docker/btrfs/sub");
    write(&root.join("var/lib/docker/btrfs/sub/file"), "deep\n");
    fs.subvolume("root/.snapshots");
    // Not nested in the root: a sibling subvolume, mounted inside the live root below.
    fs.subvolume("data");
    write(&fs.path("data/kept"), "survives\n");
    let manifest = stored_manifest(&fs);
    let expected = expect![[r#"
        new      dir                0  /.snapshots
        new      dir                0  /var/lib/docker
        new      dir                0  /var/lib/docker/btrfs
        new      dir                0  /var/lib/docker/btrfs/sub
        new      file               5  /var/lib/docker/btrfs/sub/file
        new      file               6  /var/lib/docker/image
    "#]];
    expected.assert_eq(&both_engines(&fs, &manifest, &[]));

    // The root mounted as the running system would have it, with a sibling subvolume on /srv
    // and a tmpfs on /mnt: those two are left out, the nested ones are not.
    let live = fs.dir.path().join("live");
    std::fs::create_dir(&live).unwrap();
    sh(&format!(
        "mount -o subvol=root {} '{}'",
        fs.device.display(),
        live.display()
    ));
    let _live_guard = Unmount(live.clone());
    sh(&format!(
        "mount -o subvol=data {} '{}' && mount -t tmpfs rasa-test '{}' && echo x > '{}'",
        fs.device.display(),
        live.join("srv").display(),
        live.join("mnt").display(),
        live.join("mnt/x").display()
    ));
    expected.assert_eq(&both_engines(
        &fs,
        &manifest,
        &["--live-root", live.to_str().unwrap()],
    ));
    // A nested subvolume mounted at its own place (snapper's /.snapshots) is still nested:
    // the mount does not keep it.
    write(&root.join(".snapshots/1/info.xml"), "<snapshot/>\n");
    sh(&format!(
        "mount -o subvol=root/.snapshots {} '{}'",
        fs.device.display(),
        live.join(".snapshots").display()
    ));
    expect![[r#"
        new      dir                0  /.snapshots
        new      dir                0  /.snapshots/1
        new      file              12  /.snapshots/1/info.xml
        new      dir                0  /var/lib/docker
        new      dir                0  /var/lib/docker/btrfs
        new      dir                0  /var/lib/docker/btrfs/sub
        new      file               5  /var/lib/docker/btrfs/sub/file
        new      file               6  /var/lib/docker/image
    "#]]
    .assert_eq(&both_engines(
        &fs,
        &manifest,
        &["--live-root", live.to_str().unwrap()],
    ));
}

/// A manifest whose entries (path, kind) keep their copies under `storage`.
fn manifest_with(fs: &LoopBtrfs, storage: &Path, entries: &[(&str, &str)]) -> PathBuf {
    let entries: Vec<serde_json::Value> = entries
        .iter()
        .map(|(path, kind)| {
            serde_json::json!({ "storageRoot": storage, "path": path, "kind": kind,
                                "user": "root", "group": "root", "mode": "0755" })
        })
        .collect();
    let manifest = serde_json::json!({
        "version": 1,
        "rollback": { "device": "/dev/null", "root": "root", "blank": "root-blank",
                      "oldRoots": "old_roots", "persist": "persist", "keep": 5, "keepDays": 7 },
        "entries": entries,
    });
    let path = fs.dir.path().join("manifest-entries.json");
    std::fs::write(&path, serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    path
}

/// Before `migrate --apply` the entries' storage copies do not exist: the next boot mounts an
/// empty copy over each path, so everything there is erased, what equals the blank included.
#[test]
fn entries_not_yet_in_storage_are_erased() {
    let Some(fs) = LoopBtrfs::new("entries_not_yet_in_storage_are_erased", 300) else {
        return;
    };
    let root = root_from_seed(&fs, |seed| {
        write(&seed.join("var/lib/app/old"), "from the blank\n");
        write(&seed.join("etc/adjtime"), "0.0 0 0.0\n");
        std::fs::create_dir_all(seed.join("var/lib/nixos")).unwrap();
    });
    write(&root.join("var/lib/app/new.db"), "state\n");
    write(&root.join("var/lib/nixos/uid-map"), "{}\n");
    let storage = fs.path("persist");
    std::fs::create_dir_all(storage.join("var/lib/nixos")).unwrap();
    // impermanence's link to a file copy: only the link is here, and it comes back.
    std::os::unix::fs::symlink(storage.join("etc/linked"), root.join("etc/linked")).unwrap();
    let manifest = manifest_with(
        &fs,
        &storage,
        &[
            ("/var/lib/app", "directory"),
            ("/etc/adjtime", "file"),
            ("/var/lib/nixos", "directory"),
            ("/etc/linked", "file"),
            ("/var/lib/absent", "directory"),
        ],
    );
    expect![[r#"
        unstored file              10  /etc/adjtime
        unstored dir                0  /var/lib/app
        unstored file               6  /var/lib/app/new.db
        unstored file              15  /var/lib/app/old
    "#]]
    .assert_eq(&both_engines(&fs, &manifest, &[]));
    let out = fs.rasa(&["diff", "--manifest", manifest.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "/var/lib/app is in the manifest but not yet in storage (run rasa migrate --apply)"
        ),
        "{}",
        stderr(&out)
    );
    assert!(
        stdout(&out).contains(
            "4 of these path(s) (31 B) are in the manifest but not yet in storage (run rasa migrate --apply): /etc/adjtime /var/lib/app"
        ),
        "{}",
        stdout(&out)
    );
    let (nix, _) = diff(&fs, &manifest, &["--nix"]);
    assert!(
        nix.contains("# /var/lib/app is in the manifest but not yet in storage")
            && !nix.contains("\"/var/lib/app\""),
        "{nix}"
    );
    // An entry where something else is mounted: what is there is not the root's.
    let live = fs.dir.path().join("live");
    std::fs::create_dir(&live).unwrap();
    sh(&format!(
        "mount -o subvol=root {} '{}'",
        fs.device.display(),
        live.display()
    ));
    let live_guard = Unmount(live.clone());
    fs.subvolume("app-data");
    write(&fs.path("app-data/db"), "elsewhere\n");
    sh(&format!(
        "mount -o subvol=app-data {} '{}'",
        fs.device.display(),
        live.join("var/lib/app").display()
    ));
    expect![[r#"
        unstored file              10  /etc/adjtime
    "#]]
    .assert_eq(&both_engines(
        &fs,
        &manifest,
        &["--live-root", live.to_str().unwrap()],
    ));
    drop(live_guard);
    // Once stored, they are persisted and left out.
    std::fs::create_dir_all(storage.join("var/lib/app")).unwrap();
    write(&storage.join("etc/adjtime"), "0.0 0 0.0\n");
    assert_eq!(both_engines(&fs, &manifest, &[]), "");
}

/// Create `levels` directories of 250-byte names below `top`, returning the deepest one open.
fn deep_chain(top: &Path, levels: usize) -> std::os::fd::OwnedFd {
    try_deep_chain(top, levels).unwrap()
}

fn try_deep_chain(top: &Path, levels: usize) -> nix::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::{open, openat, OFlag};
    use nix::sys::stat::{mkdirat, Mode};
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut dir = open(top, flags, Mode::empty())?;
    for level in 0..levels {
        let name = format!("{level:02}{}", "d".repeat(248));
        match mkdirat(&dir, name.as_str(), Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(e),
        }
        dir = openat(&dir, name.as_str(), flags, Mode::empty())?;
    }
    Ok(dir)
}

/// Write `content` to `name` in the directory `dir` (created or truncated).
fn write_at(dir: &std::os::fd::OwnedFd, name: &str, content: &str) {
    try_write_at(dir, name, content).unwrap()
}

fn try_write_at(dir: &std::os::fd::OwnedFd, name: &str, content: &str) -> std::io::Result<()> {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::Mode;
    let fd = openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )?;
    std::io::Write::write_all(&mut std::fs::File::from(fd), content.as_bytes())
}

/// Paths longer than what BTRFS_IOC_INO_LOOKUP can return (4080 bytes), both in directories
/// the blank has and in new ones: every name is reported, by both engines.
#[test]
fn paths_longer_than_ino_lookup_are_reported() {
    let Some(fs) = LoopBtrfs::new("paths_longer_than_ino_lookup_are_reported", 300) else {
        return;
    };
    const LEVELS: usize = 20; // 20 × 251 bytes: the deepest paths are over 5,000 bytes long.
    let root = root_from_seed(&fs, |seed| {
        std::fs::create_dir(seed.join("old")).unwrap();
        let bottom = deep_chain(&seed.join("old"), LEVELS);
        write_at(&bottom, "kept", "kept\n");
        write_at(&bottom, "rewritten", "before\n");
    });
    let bottom = deep_chain(&root.join("old"), LEVELS);
    write_at(&bottom, "rewritten", "after, longer\n");
    write_at(&bottom, "added", "new\n");
    std::fs::create_dir(root.join("new")).unwrap();
    let new_bottom = deep_chain(&root.join("new"), LEVELS);
    write_at(&new_bottom, "file", "new\n");
    let manifest = stored_manifest(&fs);
    let long = both_engines(&fs, &manifest, &[]);
    let mut old_chain = "/old".to_owned();
    let mut new_chain = "/new".to_owned();
    let mut expected = vec![format!("new      dir                0  {new_chain}")];
    for level in 0..LEVELS {
        let name = format!("/{level:02}{}", "d".repeat(248));
        old_chain.push_str(&name);
        new_chain.push_str(&name);
        expected.push(format!("new      dir                0  {new_chain}"));
    }
    assert!(old_chain.len() > 4080);
    expected.push(format!("new      file               4  {new_chain}/file"));
    expected.push(format!("new      file               4  {old_chain}/added"));
    expected.push(format!(
        "modified file              14  {old_chain}/rewritten"
    ));
    expected.sort();
    let mut got: Vec<String> = long.lines().map(str::to_owned).collect();
    got.sort();
    assert!(
        got == expected,
        "{}",
        line_diff(&expected.join("\n"), &got.join("\n"))
    );
}

/// With a non-empty blank, every attribute the next boot reverts is a change to report: mode,
/// owner, extended attributes, ACLs and `chattr` flags (directories included), content rewritten with its size
/// and mtime put back, a symlink's target, a file's type.
#[test]
fn attribute_changes_are_reported() {
    let Some(fs) = LoopBtrfs::new("attribute_changes_are_reported", 300) else {
        return;
    };
    let root = root_from_seed(&fs, |seed| {
        for dir in [
            "d_xattr",
            "d_acl",
            "d_default_acl",
            "d_mode",
            "d_owner",
            "d_entries",
            "d_xattr_undone",
            "d_chattr",
        ] {
            std::fs::create_dir(seed.join(dir)).unwrap();
        }
        for file in ["f_touch", "f_xattr", "f_acl", "f_type"] {
            write(&seed.join(file), "abcd");
        }
        std::os::unix::fs::symlink("old-target", seed.join("l_target")).unwrap();
        sh(&format!(
            "setfattr -n user.kept -v same '{}'",
            seed.join("d_xattr_undone").display()
        ));
    });
    let r = |p: &str| root.join(p).display().to_string();
    sh(&format!(
        "setfattr -n user.k -v v '{}' && setfacl -m u:1234:rwx '{}' && \
         setfacl -d -m u:1234:rx '{}' && chmod 700 '{}' && chown 1234:1234 '{}' && \
         echo new > '{}/file' && \
         setfattr -n user.k -v v '{}' && setfacl -m u:1234:r '{}' && \
         setfattr -n user.tmp -v x '{}' && setfattr -x user.tmp '{}' && chattr +d '{}'",
        r("d_xattr"),
        r("d_acl"),
        r("d_default_acl"),
        r("d_mode"),
        r("d_owner"),
        r("d_entries"),
        r("f_xattr"),
        r("f_acl"),
        r("d_xattr_undone"),
        r("d_xattr_undone"),
        r("d_chattr"),
    ));
    // Same size, and the mtime put back.
    std::fs::write(root.join("f_touch"), "wxyz").unwrap();
    sh(&format!(
        "touch -r '{}' '{}'",
        fs.path("root-blank/f_touch").display(),
        r("f_touch")
    ));
    std::fs::remove_file(root.join("l_target")).unwrap();
    std::os::unix::fs::symlink("new-target", root.join("l_target")).unwrap();
    std::fs::remove_file(root.join("f_type")).unwrap();
    std::fs::create_dir(root.join("f_type")).unwrap();
    let manifest = stored_manifest(&fs);
    expect![[r#"
        modified dir                0  /d_acl
        modified dir                0  /d_chattr
        modified dir                0  /d_default_acl
        new      file               4  /d_entries/file
        modified dir                0  /d_mode
        modified dir                0  /d_owner
        modified dir                0  /d_xattr
        modified file               4  /f_acl
        modified file               4  /f_touch
        new      dir                0  /f_type
        modified file               4  /f_xattr
        new      symlink           10  /l_target
    "#]]
    .assert_eq(&both_engines(&fs, &manifest, &[]));
}

/// `rasa diff | head -1`: the reader goes away early; that is not a failure, and no panic.
#[test]
fn a_closed_stdout_is_not_a_failure() {
    let Some(fs) = LoopBtrfs::new("a_closed_stdout_is_not_a_failure", 300) else {
        return;
    };
    let root = root_from_seed(&fs, |_| {});
    std::fs::create_dir(root.join("many")).unwrap();
    // Well over a pipe's 64 KiB of output.
    for i in 0..3000 {
        std::fs::write(
            root.join(format!("many/file-with-a-longish-name-{i:05}")),
            "x",
        )
        .unwrap();
    }
    sh("sync");
    let manifest = stored_manifest(&fs);
    for format in ["--long", "--json"] {
        let mut child = Command::new(common::RASA)
            .args(["diff", "--manifest", manifest.to_str().unwrap(), format])
            .arg("--device")
            .arg(&fs.device)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut first,
        )
        .unwrap();
        assert!(!first.is_empty());
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert!(
            out.status.success() && !err.contains("panicked") && !err.contains("rror"),
            "{format}: {:?} {err}",
            out.status
        );
    }
}

/// Random trees and random changes, each checked against a ground truth computed here
/// independently of both engines: a full recursive `lstat` + xattr + content comparison of the
/// live root with the blank. `RASA_DIFF_FUZZ_SEEDS=N` runs seeds 1..=N (`A..B`: A..=B; what
/// `cargo xtask bench diff-fuzz` does), `RASA_DIFF_FUZZ_SEED=S` only seed S; by default a
/// fixed pair of seeds, one for each way a root and its blank can be related.
#[test]
fn random_trees_match_the_ground_truth() {
    let seeds: Vec<u64> = if let Ok(one) = std::env::var("RASA_DIFF_FUZZ_SEED") {
        vec![one.parse().expect("RASA_DIFF_FUZZ_SEED is a number")]
    } else if let Ok(seeds) = std::env::var("RASA_DIFF_FUZZ_SEEDS") {
        // `N` (1..=N) or `A..B` (A..=B).
        let number = |s: &str| -> u64 { s.parse().expect("RASA_DIFF_FUZZ_SEEDS is N or A..B") };
        match seeds.split_once("..") {
            Some((first, last)) => (number(first)..=number(last)).collect(),
            None => (1..=number(&seeds)).collect(),
        }
    } else {
        vec![1, 2]
    };
    for seed in seeds {
        let Some(fs) = LoopBtrfs::new("random_trees_match_the_ground_truth", 300) else {
            return;
        };
        fuzz::check_seed(&fs, seed);
    }
}

mod fuzz {
    use super::*;
    use nix::dir::Dir;
    use nix::fcntl::{openat, AtFlags, OFlag};
    use nix::sys::stat::{fstatat, FileStat, Mode};
    use std::collections::BTreeMap;
    use std::os::fd::{AsFd, OwnedFd};

    const OPERATIONS: usize = 300;
    /// Names from a small set, so that creations, renames and links collide with what is there.
    fn name(rng: &mut fastrand::Rng) -> String {
        format!("n{}", rng.u32(0..24))
    }

    /// What exists below `top` (relative paths), directories and the rest, read with std::fs
    /// (but not inside a deep chain, which [`check_seed`] changes itself).
    fn scan(top: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let (mut dirs, mut others) = (vec![PathBuf::new()], Vec::new());
        let mut i = 0;
        while i < dirs.len() {
            let dir = top.join(&dirs[i]);
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let rel = dirs[i].join(entry.file_name());
                    // The deep chains (250-byte names) are changed on purpose, apart: picked
                    // here, their many levels would draw most operations into them.
                    if dirs[i].as_os_str().len() > 200 {
                        continue;
                    }
                    match entry.file_type() {
                        Ok(t) if t.is_dir() => dirs.push(rel),
                        Ok(_) => others.push(rel),
                        Err(_) => {}
                    }
                }
            }
            i += 1;
        }
        (dirs, others)
    }

    fn pick<'a, T>(rng: &mut fastrand::Rng, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[rng.usize(0..items.len())])
    }

    fn content(rng: &mut fastrand::Rng) -> Vec<u8> {
        let len = rng.usize(0..64);
        (0..len).map(|_| rng.alphanumeric() as u8).collect()
    }

    /// One random change below `top`; what it did, for the failure message. Failures (a rename
    /// into its own subtree, a link across subvolumes, ...) are part of the game: the tree is
    /// whatever the filesystem accepted.
    fn operate(fs: &LoopBtrfs, top: &Path, rng: &mut fastrand::Rng, allow_deep: bool) -> String {
        let (dirs, others) = scan(top);
        let dir = pick(rng, &dirs).unwrap().clone();
        let any: Vec<PathBuf> = dirs[1..].iter().chain(&others).cloned().collect();
        let target = pick(rng, &any).cloned();
        let fresh = dir.join(name(rng));
        let p = |rel: &Path| top.join(rel);
        let op = rng.u32(0..100);
        let (what, result): (String, std::io::Result<()>) = match (op, &target) {
            (0..=19, _) => (
                format!("write {}", fresh.display()),
                std::fs::write(p(&fresh), content(rng)),
            ),
            (20..=29, _) => (
                format!("mkdir {}", fresh.display()),
                std::fs::create_dir(p(&fresh)),
            ),
            (30..=37, Some(t)) => (
                format!("delete {}", t.display()),
                if p(t).is_dir() && !p(t).is_symlink() {
                    // Whole trees now and then; mostly empty directories, so the tree grows.
                    if rng.u32(0..10) == 0 {
                        std::fs::remove_dir_all(p(t))
                    } else {
                        std::fs::remove_dir(p(t))
                    }
                } else {
                    std::fs::remove_file(p(t))
                },
            ),
            (38..=47, Some(t)) => (
                format!("rename {} {}", t.display(), fresh.display()),
                std::fs::rename(p(t), p(&fresh)),
            ),
            (48..=55, Some(t)) => {
                let mode = *pick(rng, &[0o700, 0o755, 0o644, 0o600, 0o4755, 0o1777]).unwrap();
                (
                    format!("chmod {mode:o} {}", t.display()),
                    if p(t).is_symlink() {
                        Ok(())
                    } else {
                        std::fs::set_permissions(p(t), PermissionsExt::from_mode(mode))
                    },
                )
            }
            (56..=61, Some(t)) => {
                let id = *pick(rng, &[0, 1000, 1234]).unwrap();
                (
                    format!("chown {id} {}", t.display()),
                    std::os::unix::fs::lchown(p(t), Some(id), Some(id)),
                )
            }
            (62..=69, Some(t)) => {
                let key = format!("user.k{}", rng.u32(0..3));
                let value = content(rng);
                (
                    format!("setfattr {key} {}", t.display()),
                    if p(t).is_symlink() {
                        Ok(())
                    } else if rng.bool() {
                        xattr::set(p(t), &key, &value)
                    } else {
                        xattr::remove(p(t), &key).or(Ok(()))
                    },
                )
            }
            (70..=72, Some(t)) => {
                let user = *pick(rng, &["u:1234:rwx", "u:1000:r", "g:1234:rx"]).unwrap();
                // A default ACL (directories only) now and then.
                let flag = if rng.bool() { "-m" } else { "-dm" };
                let out = Command::new("setfacl")
                    .args([flag, user])
                    .arg(p(t))
                    .output();
                (
                    format!("setfacl {flag} {user} {}", t.display()),
                    out.map(|_| ()),
                )
            }
            (73..=77, Some(t)) => (
                format!("link {} {}", t.display(), fresh.display()),
                std::fs::hard_link(p(t), p(&fresh)),
            ),
            (78..=82, _) => {
                let link_to = format!("t{}", rng.u32(0..5));
                (
                    format!("symlink {link_to} {}", fresh.display()),
                    std::os::unix::fs::symlink(&link_to, p(&fresh)),
                )
            }
            (83..=84, _) => (
                format!("subvolume {}", fresh.display()),
                Command::new("btrfs")
                    .args(["-q", "subvolume", "create"])
                    .arg(p(&fresh))
                    .output()
                    .map(|_| ()),
            ),
            (85, _) if allow_deep => {
                // Over 4,080 bytes below the top (INO_LOOKUP's limit), a file at the bottom.
                let text = String::from_utf8(content(rng)).unwrap();
                let result = try_deep_chain(&p(&dir), 17)
                    .map_err(std::io::Error::from)
                    .and_then(|bottom| try_write_at(&bottom, "deep", &text));
                (format!("deep chain in {}", dir.display()), result)
            }
            (86..=93, Some(t)) if p(t).is_file() && !p(t).is_symlink() => {
                // Rewritten in place, same size, and (sometimes) the mtime put back.
                let before = std::fs::symlink_metadata(p(t)).unwrap();
                let mut data = std::fs::read(p(t)).unwrap();
                for b in &mut data {
                    *b = rng.alphanumeric() as u8;
                }
                let result = std::fs::write(p(t), &data);
                let restore = rng.bool();
                if restore {
                    let mtime = before.modified().unwrap();
                    std::fs::File::options()
                        .write(true)
                        .open(p(t))
                        .unwrap()
                        .set_modified(mtime)
                        .unwrap();
                }
                (
                    format!("rewrite {} (mtime restored: {restore})", t.display()),
                    result,
                )
            }
            (94..=96, Some(t)) if !p(t).is_symlink() => {
                let flag = *pick(rng, &["+d", "-d", "+A"]).unwrap();
                let out = Command::new("chattr").arg(flag).arg(p(t)).output();
                (format!("chattr {flag} {}", t.display()), out.map(|_| ()))
            }
            (97..=99, Some(t)) if p(t).is_file() && !p(t).is_symlink() => (
                format!("touch {}", t.display()),
                std::fs::File::options()
                    .write(true)
                    .open(p(t))
                    .and_then(|f| {
                        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1))
                    }),
            ),
            _ => ("nothing".to_owned(), Ok(())),
        };
        let _ = fs;
        match result {
            Ok(()) => what,
            Err(e) => format!("{what}: {e}"),
        }
    }

    /// What the next boot erases, by the plain definition: every live path whose counterpart
    /// in the blank is missing, of another type, another inode, or differs in mode, owner,
    /// extended attributes (ACLs included), `chattr` flags, and for anything but a directory
    /// in size, mtime,
    /// ctime, content or symlink target. Inside a nested subvolume everything is new.
    /// Directory times and sizes follow their entries, which are judged on their own.
    pub fn ground_truth(live: &Path, blank: &Path) -> BTreeMap<Vec<u8>, &'static str> {
        let open = |path: &Path| {
            nix::fcntl::open(
                path,
                OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .unwrap()
        };
        let live_dir = open(live);
        let dev = nix::sys::stat::fstat(&live_dir).unwrap().st_dev;
        let mut out = BTreeMap::new();
        visit(live_dir, Some(open(blank)), Vec::new(), dev, &mut out);
        out
    }

    fn xattrs(dir: &OwnedFd, name: &std::ffi::OsStr) -> Vec<(std::ffi::OsString, Vec<u8>)> {
        // The l*xattr calls through /proc/self/fd: the path stays short however deep the file.
        let path = Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
        let mut all: Vec<_> = xattr::list(&path)
            .unwrap()
            .map(|k| {
                let v = xattr::get(&path, &k).unwrap().unwrap_or_default();
                (k, v)
            })
            .collect();
        all.sort();
        all
    }

    /// The `chattr` flags, as `lsattr` prints them (through this process's /proc fd entry, so
    /// the path stays short however deep the file).
    fn flags(dir: &OwnedFd, name: &std::ffi::OsStr) -> String {
        let path = Path::new(&format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            dir.as_raw_fd()
        ))
        .join(name);
        let out = Command::new("lsattr")
            .arg("-d")
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "lsattr: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    fn read_at(dir: &OwnedFd, name: &std::ffi::OsStr) -> Vec<u8> {
        let fd = openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut data).unwrap();
        data
    }

    use std::os::fd::AsRawFd;

    fn visit(
        live: OwnedFd,
        blank: Option<OwnedFd>,
        path: Vec<u8>,
        root_dev: u64,
        out: &mut BTreeMap<Vec<u8>, &'static str>,
    ) {
        let mut names: Vec<std::ffi::OsString> = Dir::from_fd(live.try_clone().unwrap())
            .unwrap()
            .iter()
            .map(|e| std::ffi::OsStr::from_bytes(e.unwrap().file_name().to_bytes()).to_owned())
            .filter(|n| n != "." && n != "..")
            .collect();
        names.sort();
        for name in names {
            let l = fstatat(&live, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW).unwrap();
            let is_dir = l.st_mode & nix::libc::S_IFMT == nix::libc::S_IFDIR;
            // btrfs's placeholder for a subvolume the blank had: empty, nothing to lose.
            if is_dir && l.st_ino == 2 {
                continue;
            }
            let mut full = path.clone();
            full.push(b'/');
            full.extend_from_slice(name.as_bytes());
            let in_root = l.st_dev == root_dev;
            let b: Option<FileStat> = blank
                .as_ref()
                .filter(|_| in_root)
                .and_then(|b| fstatat(b, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW).ok())
                .filter(|b| b.st_mode & nix::libc::S_IFMT == l.st_mode & nix::libc::S_IFMT)
                .filter(|b| b.st_ino == l.st_ino);
            let status = match &b {
                None => Some("new"),
                Some(b) => {
                    let blank = blank.as_ref().unwrap();
                    let mut differs = b.st_mode != l.st_mode
                        || b.st_uid != l.st_uid
                        || b.st_gid != l.st_gid
                        || xattrs(&live, &name) != xattrs(blank, &name);
                    let kind = l.st_mode & nix::libc::S_IFMT;
                    if !differs && (kind == nix::libc::S_IFDIR || kind == nix::libc::S_IFREG) {
                        differs = flags(&live, &name) != flags(blank, &name);
                    }
                    if !is_dir {
                        differs |= b.st_size != l.st_size
                            || (b.st_mtime, b.st_mtime_nsec) != (l.st_mtime, l.st_mtime_nsec)
                            || (b.st_ctime, b.st_ctime_nsec) != (l.st_ctime, l.st_ctime_nsec);
                        let kind = l.st_mode & nix::libc::S_IFMT;
                        if kind == nix::libc::S_IFREG {
                            differs |= read_at(&live, &name) != read_at(blank, &name);
                        } else if kind == nix::libc::S_IFLNK {
                            differs |= nix::fcntl::readlinkat(&live, name.as_os_str()).unwrap()
                                != nix::fcntl::readlinkat(blank, name.as_os_str()).unwrap();
                        }
                    }
                    differs.then_some("modified")
                }
            };
            if let Some(status) = status {
                out.insert(full.clone(), status);
            }
            if is_dir {
                let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                let child = openat(&live, name.as_os_str(), flags, Mode::empty()).unwrap();
                let blank_child = b
                    .and(blank.as_ref())
                    .and_then(|blank| openat(blank, name.as_os_str(), flags, Mode::empty()).ok());
                visit(child, blank_child, full, root_dev, out);
            }
        }
        let _ = live.as_fd();
    }

    pub fn check_seed(fs: &LoopBtrfs, seed: u64) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut log = Vec::new();
        let root_from_blank = seed % 2 == 1;
        let base = if root_from_blank { "seed" } else { "root" };
        fs.subvolume(base);
        fs.subvolume("persist");
        // The blank's tree: the same operations on an empty one, fewer of them.
        for _ in 0..OPERATIONS / 2 {
            let what = operate(fs, &fs.path(base), &mut rng, true);
            log.push(format!("blank: {what}"));
        }
        // Paths longer than INO_LOOKUP returns, in the blank and then changed in the root.
        let deep_bottom = deep_chain(&fs.path(base), 17);
        write_at(&deep_bottom, "deep-old", "from the blank");
        write_at(&deep_bottom, "deep-kept", "from the blank");
        drop(deep_bottom);
        log.push("blank: deep chain at the top".to_owned());
        let top = fs.top.display();
        if root_from_blank {
            sh(&format!(
                "btrfs -q subvolume snapshot -r {top}/seed {top}/root-blank && \
                 btrfs -q subvolume snapshot {top}/root-blank {top}/root"
            ));
        } else {
            sh(&format!(
                "btrfs -q subvolume snapshot -r {top}/root {top}/root-blank"
            ));
        }
        for _ in 0..OPERATIONS {
            let what = operate(fs, &fs.path("root"), &mut rng, true);
            log.push(format!("root: {what}"));
        }
        if rng.bool() {
            let bottom = deep_chain(&fs.path("root"), 17);
            write_at(&bottom, "deep-old", "rewritten in the root");
            write_at(&bottom, "deep-new", "new in the root");
            // A directory of the blank, over 4,080 bytes deep, changed in its attributes.
            let dir = std::fs::File::from(bottom);
            xattr::FileExt::set_xattr(&dir, "user.deep", b"changed").unwrap();
            log.push("root: deep chain at the top changed".to_owned());
        }
        let manifest = stored_manifest(fs);
        sh("sync");
        let truth = ground_truth(&fs.path("root"), &fs.path("root-blank"));
        let modified = truth.values().filter(|s| **s == "modified").count();
        let failed = log
            .iter()
            .filter(|l| l.contains(": ") && l.matches(": ").count() > 1)
            .count();
        eprintln!(
            "seed {seed}: {} operations ({failed} refused by the filesystem), {} paths erased \
             ({modified} modified), the longest {} bytes",
            log.len(),
            truth.len(),
            truth.keys().map(Vec::len).max().unwrap_or(0)
        );
        if std::env::var_os("RASA_DIFF_FUZZ_VERBOSE").is_some() {
            eprintln!("{}", log.join("\n"));
        }
        let truth_text: String = truth
            .iter()
            .map(|(path, status)| format!("{status} {}\n", String::from_utf8_lossy(path)))
            .collect();
        for engine in ["btrfs", "walk"] {
            let (json, _) = diff(fs, &manifest, &["--engine", engine, "--json"]);
            let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
            let reported: String = parsed["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    format!(
                        "{} {}\n",
                        e["status"].as_str().unwrap(),
                        e["path"].as_str().unwrap()
                    )
                })
                .collect();
            assert!(
                reported == truth_text,
                "seed {seed}, {engine} engine, against the ground truth:\n{}\noperations:\n{}",
                line_diff(&truth_text, &reported)
                    .replace("only btrfs:", "only truth:")
                    .replace("only walk: ", &format!("only {engine}:")),
                log.join("\n")
            );
        }
    }
}

/// A `rasa watch` record in the documented format (docs/watch.md), written by hand.
fn watch_record(lines: &[(&str, &str, &str)]) -> String {
    let mut text = format!(
        r#"{{"rasaWatch":1,"root":"/","bootId":"test","started":1,"updated":2,"entries":{},"maxEntries":100000,"droppedEvents":0,"queueOverflows":0}}"#,
        lines.len()
    );
    for (path, writer, kind) in lines {
        text.push('\n');
        text.push_str(
            &serde_json::json!({
                "path": path, "writer": writer, "kind": kind,
                "first": 1, "last": 2, "count": 1, "events": ["create"]
            })
            .to_string(),
        );
    }
    text.push('\n');
    text
}

const RECORDED: &[(&str, &str, &str)] = &[
    ("/etc/new.conf", "my editor", "command"),
    ("/etc/new.conf", "nixos-activation.service", "unit"),
    ("/var/lib/app/state.db", "app.service", "unit"),
    ("/var/lib/bluetooth", "bluetooth.service", "unit"),
    ("/var/lib/bluetooth/AA:BB", "bluetooth.service", "unit"),
    ("/var/lib/bluetooth/AA:BB/info", "bluetooth.service", "unit"),
    // Gone by now: named in the record, not in the diff.
    ("/etc/delete.conf", "app.service", "unit"),
];

#[test]
fn a_watch_record_names_who_wrote_each_path() {
    let Some((fs, manifest)) = with_scenario("a_watch_record_names_who_wrote_each_path") else {
        return;
    };
    let record = fs.dir.path().join("watch.jsonl");
    std::fs::write(&record, watch_record(RECORDED)).unwrap();
    let r = record.to_str().unwrap();

    let (long, _) = diff(&fs, &manifest, &["--long", "--watch-record", r]);
    let picked: Vec<&str> = long
        .lines()
        .filter(|l| {
            l.contains("/etc/new.conf") || l.contains("bluetooth") || l.contains("/etc/keep.conf")
        })
        .collect();
    expect![[r#"
        [
            "modified file              10  -  /etc/keep.conf",
            "new      file               4  my\\x20editor,nixos-activation.service  /etc/new.conf",
            "new      dir                0  bluetooth.service  /var/lib/bluetooth",
            "new      dir                0  bluetooth.service  /var/lib/bluetooth/AA:BB",
            "new      file               7  bluetooth.service  /var/lib/bluetooth/AA:BB/info",
        ]
    "#]]
    .assert_debug_eq(&picked);
    // Without the record, the output is the one every other test pins.
    let (plain, _) = diff(&fs, &manifest, &["--long", "--no-watch-record"]);
    EXPECTED_LONG.assert_eq(&plain);

    let (json, _) = diff(&fs, &manifest, &["--json", "--watch-record", r]);
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed["watch_record"], r);
    let entries = parsed["entries"].as_array().unwrap();
    let writers_of = |path: &str| {
        entries
            .iter()
            .find(|e| e["path"] == path)
            .map(|e| e["writers"].clone())
            .unwrap()
    };
    assert_eq!(
        writers_of("/etc/new.conf"),
        serde_json::json!(["my editor", "nixos-activation.service"])
    );
    assert_eq!(writers_of("/etc/keep.conf"), serde_json::json!([]));
    let (plain_json, _) = diff(&fs, &manifest, &["--json"]);
    assert!(!plain_json.contains("writers") && !plain_json.contains("watch_record"));

    let (summary, _) = diff(&fs, &manifest, &["--watch-record", r]);
    let summary = summary.replace(r, "<record>");
    expect![[r#"
        25 paths (112 B) on root will be erased by the next boot [engine: btrfs, compared with root-blank]

              SIZE    PATHS      NEW MODIFIED  DIRECTORY
              68 B       12        9        3  /etc
              34 B        8        7        1  /var
               6 B        1        1        0  /home
               4 B        4        4        0  /movedir

              SIZE    PATHS      NEW MODIFIED  WRITER (from <record>)
              91 B       20       16        4  (not recorded)
              10 B        1        1        0  app.service
               7 B        3        3        0  bluetooth.service
               4 B        1        1        0  my editor
               4 B        1        1        0  nixos-activation.service

        `rasa diff --long` lists every path; `rasa diff --nix` suggests what to persist.
        left out: what root-blank holds unchanged, 2 persisted path(s) from the manifest, symlinks into /nix/store, /proc /sys /dev /run /tmp and 0 other mount(s), paths matching /root/.bash_history /var/cache/**
    "#]]
    .assert_eq(&summary);

    let (nix, _) = diff(&fs, &manifest, &["--nix", "--watch-record", r]);
    let nix = nix.replace(fs.path("persist").to_str().unwrap(), "/persist");
    expect![[r##"
        # What `rasa diff` found on root that the next boot erases. Paste into your NixOS
        # configuration (with the impermanence module) and delete what you do not want to keep.
        environment.persistence."/persist" = {
          directories = [
            # written by app.service
            "/var/lib/app" # 2 paths, 10 B
            # written by bluetooth.service
            "/var/lib/bluetooth" # Bluetooth pairings; rasa.presets.bluetooth keeps it
            # written by (not recorded)
            "/etc/NetworkManager/system-connections" # NetworkManager connections (Wi-Fi passwords, VPNs); rasa.presets.networkmanager keeps it
            "/movedir" # 4 paths, 4 B
            "/var/lib/machines" # 2 paths, 17 B
            "/var/log" # mode or owner differs from the blank
          ];
          files = [
            # written by my editor, nixos-activation.service
            "/etc/new.conf" # 1 path, 4 B
            # written by (not recorded)
            "/etc/alice-link" # 1 path, 11 B
            # left out, not UTF-8 (Nix strings cannot hold it): /etc/caf\xff
            "/etc/chmod.conf" # 1 path, 5 B
            "/etc/keep.conf" # 1 path, 10 B
            "/etc/modify.conf" # 1 path, 12 B
            "/etc/renamed.conf" # 1 path, 8 B
            "/etc/ssh/ssh_host_ed25519_key" # ssh host key (clients warn when it changes); rasa.presets.ssh keeps it
            "/home/alice/notes.txt" # 1 path, 6 B
          ];
        };
    "##]].assert_eq(&nix);

    // A file that is not a record is refused, naming it.
    std::fs::write(&record, "not json\n").unwrap();
    let (code, err) = code_and_err(&fs.rasa(&[
        "diff",
        "--manifest",
        manifest.to_str().unwrap(),
        "--watch-record",
        r,
    ]));
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("watch record") && err.contains(r), "{err}");
}

#[test]
fn an_old_root_carries_its_watch_record() {
    let Some((fs, manifest)) = with_scenario("an_old_root_carries_its_watch_record") else {
        return;
    };
    let in_root = fs.path("root/var/lib/rasa/watch/record.jsonl");
    std::fs::create_dir_all(in_root.parent().unwrap()).unwrap();
    std::fs::write(&in_root, watch_record(RECORDED)).unwrap();
    let out = fs.rasa(&["rollback"]);
    assert!(out.status.success(), "rollback failed: {}", stderr(&out));
    let old = std::fs::read_dir(fs.path("old_roots"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    let old = old.to_str().unwrap();
    let (json, _) = diff(&fs, &manifest, &["--old-root", old, "--json"]);
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        parsed["watch_record"],
        format!("old_roots/{old}/var/lib/rasa/watch/record.jsonl")
    );
    let entry = parsed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "/var/lib/app/state.db")
        .unwrap();
    assert_eq!(entry["writers"], serde_json::json!(["app.service"]));
    // The fresh root has no record of its own yet: no writers column.
    let (fresh, _) = diff(&fs, &manifest, &["--json"]);
    assert!(!fresh.contains("watch_record"), "{fresh}");
}

/// A metric sample: its name, its labels (name, unescaped value) and its value.
type Sample = (String, Vec<(String, String)>, f64);

/// Parse the Prometheus text exposition format strictly enough to catch what a collector
/// rejects: metric and label names, HELP and TYPE before a family's samples, label values'
/// escapes, numeric values. Returns (metric, labels, value) for each sample.
fn parse_exposition(text: &str) -> Vec<Sample> {
    fn is_name(s: &str, colon: bool) -> bool {
        let mut chars = s.chars();
        let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
        chars.next().is_some_and(ok_first) && chars.all(|c| ok_first(c) || c.is_ascii_digit())
    }
    let mut helped = std::collections::HashSet::new();
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    assert!(text.ends_with('\n'), "the file must end with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(is_name(name, true) && !help.is_empty(), "{line}");
            assert!(helped.insert(name.to_owned()), "second HELP: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(is_name(name, true), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(typed.insert(name.to_owned()), "second TYPE: {line}");
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line: {line:?}"
        );
        let name_end = line.find(['{', ' ']).expect("a sample");
        let name = &line[..name_end];
        assert!(is_name(name, true), "bad metric name: {line}");
        assert!(
            helped.contains(name) && typed.contains(name),
            "no HELP/TYPE before {line}"
        );
        let mut labels = Vec::new();
        let mut rest = &line[name_end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            loop {
                let (start, _) = *chars.peek().expect("unterminated labels");
                let eq = inner[start..].find('=').expect("label=") + start;
                let label = &inner[start..eq];
                assert!(is_name(label, false), "bad label name {label:?}: {line}");
                while chars.next().is_some_and(|(i, _)| i < eq) {}
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                let mut value = String::new();
                loop {
                    match chars.next().expect("unterminated value").1 {
                        '\\' => match chars.next().expect("escape").1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            c => panic!("bad escape \\{c}: {line}"),
                        },
                        '"' => break,
                        '\n' => panic!("raw newline: {line}"),
                        c => value.push(c),
                    }
                }
                labels.push((label.to_owned(), value));
                match chars.next().expect("after a label").1 {
                    ',' => continue,
                    '}' => {
                        let at = chars.peek().map_or(inner.len(), |(i, _)| *i);
                        rest = &inner[at..];
                        break;
                    }
                    c => panic!("unexpected {c:?}: {line}"),
                }
            }
        }
        let value = rest.strip_prefix(' ').expect("space before the value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        samples.push((name.to_owned(), labels, value));
    }
    samples
}

#[test]
fn prometheus_file_is_valid_and_replaced_atomically() {
    let Some((fs, manifest)) = with_scenario("prometheus_file_is_valid_and_replaced_atomically")
    else {
        return;
    };
    let record = fs.dir.path().join("watch.jsonl");
    std::fs::write(
        &record,
        watch_record(&[
            ("/etc/new.conf", "we\"ird\\name", "command"),
            ("/var/lib/app/state.db", "app.service", "unit"),
        ]),
    )
    .unwrap();
    let collector = fs.dir.path().join("textfile");
    std::fs::create_dir(&collector).unwrap();
    let prom = collector.join("rasa.prom");
    // What stood there (a symlink to elsewhere) is replaced, never written through.
    let elsewhere = fs.dir.path().join("elsewhere");
    std::fs::write(&elsewhere, "untouched").unwrap();
    std::os::unix::fs::symlink(&elsewhere, &prom).unwrap();
    let (stdout, _) = diff(
        &fs,
        &manifest,
        &[
            "--prometheus",
            prom.to_str().unwrap(),
            "--watch-record",
            record.to_str().unwrap(),
        ],
    );
    assert_eq!(stdout, "", "the metrics go to the file only");
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "untouched");
    let md = std::fs::symlink_metadata(&prom).unwrap();
    assert!(md.is_file());
    assert_eq!(md.permissions().mode() & 0o777, 0o644);
    let leftovers: Vec<_> = std::fs::read_dir(&collector)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["rasa.prom"]);

    let text = std::fs::read_to_string(&prom).unwrap();
    let samples = parse_exposition(&text);
    let value = |metric: &str, unit: Option<&str>| {
        samples
            .iter()
            .find(|(m, labels, _)| {
                m == metric
                    && unit.is_none_or(|u| labels.iter().any(|(k, v)| k == "unit" && v == u))
            })
            .unwrap_or_else(|| panic!("no {metric} {unit:?} in\n{text}"))
            .2
    };
    assert_eq!(value("rasa_unpersisted_paths", Some("we\"ird\\name")), 1.0);
    assert_eq!(value("rasa_unpersisted_bytes", Some("we\"ird\\name")), 4.0);
    assert_eq!(value("rasa_unpersisted_paths", Some("app.service")), 1.0);
    assert_eq!(
        value("rasa_unpersisted_paths", Some("(not recorded)")),
        23.0
    );
    assert_eq!(value("rasa_unpersisted_paths_all", None), 25.0);
    assert_eq!(value("rasa_watch_record_present", None), 1.0);
    assert_eq!(value("rasa_old_roots", None), 0.0);
    assert!(samples
        .iter()
        .filter(|(m, _, _)| m.starts_with("rasa_unpersisted_paths"))
        .all(|(_, labels, _)| labels.iter().any(|(k, v)| k == "tree" && v == "root")));
    // No rollback has recorded anything yet: its metrics are left out, not made up.
    assert!(
        !samples
            .iter()
            .any(|(m, _, _)| m.starts_with("rasa_last_rollback")),
        "{text}"
    );

    // After a rollback the old root is counted, and a second write replaces the first.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let out = fs.rasa(&["rollback"]);
    assert!(out.status.success(), "rollback failed: {}", stderr(&out));
    diff(&fs, &manifest, &["--prometheus", prom.to_str().unwrap()]);
    let text = std::fs::read_to_string(&prom).unwrap();
    let samples = parse_exposition(&text);
    // The last rollback's result, duration and time, from the record it left.
    let results: Vec<_> = samples
        .iter()
        .filter(|(m, _, _)| m == "rasa_last_rollback_result")
        .map(|(_, labels, v)| (labels.clone(), *v))
        .collect();
    assert_eq!(
        results,
        [(vec![("result".to_string(), "reset".to_string())], 1.0)],
        "{text}"
    );
    let one = |metric: &str| {
        samples
            .iter()
            .find(|(m, _, _)| m == metric)
            .unwrap_or_else(|| panic!("no {metric} in\n{text}"))
            .2
    };
    let duration = one("rasa_last_rollback_duration_seconds");
    assert!(duration > 0.0 && duration < 60.0, "{text}");
    let stamp = one("rasa_last_rollback_timestamp_seconds");
    assert!(
        stamp >= before as f64 && stamp <= before as f64 + 120.0,
        "{text}"
    );
    let old_roots = samples
        .iter()
        .find(|(m, _, _)| m == "rasa_old_roots")
        .unwrap();
    assert_eq!(old_roots.2, 1.0);
    let present = samples
        .iter()
        .find(|(m, _, _)| m == "rasa_watch_record_present")
        .unwrap();
    assert_eq!(present.2, 0.0);

    // A record that is not one: a warning, and the rollback metrics left out; the rest written.
    std::fs::write(fs.record_file(), "{not json").unwrap();
    let (_, err) = diff(&fs, &manifest, &["--prometheus", prom.to_str().unwrap()]);
    assert!(
        err.contains("leaving out the last rollback's metrics"),
        "{err}"
    );
    let text = std::fs::read_to_string(&prom).unwrap();
    let unreadable = parse_exposition(&text);
    assert!(
        !unreadable
            .iter()
            .any(|(m, _, _)| m.starts_with("rasa_last_rollback")),
        "{text}"
    );
    assert!(unreadable.iter().any(|(m, _, _)| m == "rasa_old_roots"));

    // A file in a directory that is not there: refused before anything is done.
    let missing = fs.dir.path().join("no-such-dir/rasa.prom");
    let (code, err) = code_and_err(&fs.rasa(&[
        "diff",
        "--manifest",
        manifest.to_str().unwrap(),
        "--prometheus",
        missing.to_str().unwrap(),
    ]));
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("no-such-dir") && err.contains("not a directory") && err.contains("fix:"),
        "{err}"
    );
    assert!(!missing.parent().unwrap().exists());
}

/// Without a watch record, the manifest's `services` (what the module's state check found: a
/// unit and where it keeps its state) still say whose state a path is; with a record, the
/// record wins for the paths it names.
#[test]
fn the_manifests_services_name_the_unit_of_a_path_without_a_record() {
    let Some((fs, manifest)) = with_scenario("the_manifests_services_name_the_unit") else {
        return;
    };
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    value["services"] = serde_json::json!([
        {"unit": "bluetooth.service", "paths": ["/var/lib/bluetooth"]},
        {"unit": "editor-sync.service", "paths": ["/etc/new.conf"]}
    ]);
    let with_services = fs.dir.path().join("manifest-with-services.json");
    std::fs::write(&with_services, value.to_string()).unwrap();

    let (json, _) = diff(&fs, &with_services, &["--json", "--no-watch-record"]);
    assert!(!json.contains("writers"), "--no-watch-record names nobody");
    let (json, _) = diff(&fs, &with_services, &["--json"]);
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(parsed.get("watch_record").is_none(), "no record was read");
    let writers_of = |parsed: &serde_json::Value, path: &str| {
        parsed["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == path)
            .map(|e| e["writers"].clone())
            .unwrap()
    };
    assert_eq!(
        writers_of(&parsed, "/var/lib/bluetooth/AA:BB/info"),
        serde_json::json!(["bluetooth.service"])
    );
    assert_eq!(
        writers_of(&parsed, "/etc/new.conf"),
        serde_json::json!(["editor-sync.service"])
    );
    assert_eq!(writers_of(&parsed, "/etc/keep.conf"), serde_json::json!([]));
    let (summary, _) = diff(&fs, &with_services, &[]);
    assert!(
        summary.contains("WRITER (from the manifest's services)"),
        "{summary}"
    );

    // A record names /etc/new.conf's writers itself; the manifest fills in the rest.
    let record = fs.dir.path().join("watch.jsonl");
    std::fs::write(&record, watch_record(RECORDED)).unwrap();
    let r = record.to_str().unwrap();
    let (json, _) = diff(&fs, &with_services, &["--json", "--watch-record", r]);
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed["watch_record"], r);
    assert_eq!(
        writers_of(&parsed, "/etc/new.conf"),
        serde_json::json!(["my editor", "nixos-activation.service"])
    );
}
