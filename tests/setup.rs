//! `rasa setup` on real btrfs in loop files: the root subvolume is mounted as the "live root".

mod common;

use std::path::PathBuf;

use common::{sh, stderr, stdout, LoopBtrfs};
use expect_test::expect;

/// The filesystem with `root` (holding some state) mounted at `<tmp>/live`.
struct Live {
    fs: LoopBtrfs,
    live: PathBuf,
}

impl Live {
    fn new(test: &str, subvol: &str) -> Option<Live> {
        let fs = LoopBtrfs::new(test, 256)?;
        fs.subvolume("root");
        sh(&format!(
            "cd '{}' && mkdir -p etc var/lib && echo id > etc/machine-id",
            fs.path("root").display()
        ));
        fs.subvolume("root/var/lib/machines");
        let live = fs.dir.path().join("live");
        std::fs::create_dir(&live).unwrap();
        if subvol == "/" {
            sh(&format!(
                "mount -o subvolid=5 {} '{}'",
                fs.device.display(),
                live.display()
            ));
        } else {
            sh(&format!(
                "mount -o subvol={subvol} {} '{}'",
                fs.device.display(),
                live.display()
            ));
        }
        Some(Live { fs, live })
    }

    fn setup(&self, extra: &[&str]) -> std::process::Output {
        let mut args = vec!["setup", "--live-root", self.live.to_str().unwrap()];
        args.extend_from_slice(extra);
        std::process::Command::new(common::RASA)
            .args(&args)
            .env("NO_COLOR", "1")
            .env_remove("JOURNAL_STREAM")
            .output()
            .unwrap()
    }

    fn redact(&self, text: &str) -> String {
        text.replace(&self.fs.device.display().to_string(), "<DEVICE>")
            .replace(&self.live.display().to_string(), "<LIVE>")
    }

    /// Everything at the top level, with types and read-only flags: what setup may change.
    fn state(&self) -> String {
        let listing = sh(&format!(
            "cd '{}' && find . -printf '%p %y %m\\n' | sort",
            self.fs.top.display()
        ));
        let ro = sh(&format!(
            "for s in $(btrfs subvolume list -o '{0}' | awk '{{print $NF}}'); do echo \"$s $(btrfs property get -ts '{0}/'$s ro)\"; done",
            self.fs.top.display()
        ));
        format!("{listing}\n{ro}")
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.live)
            .status();
    }
}

#[test]
fn setup_plans_then_creates_what_is_missing_and_is_idempotent() {
    let Some(live) = Live::new("setup_plans_then_creates", "root") else {
        return;
    };
    let root_before = sh(&format!(
        "cd '{}' && find . -printf '%p %y %m %s\\n' | sort",
        live.fs.path("root").display()
    ));
    let before = live.state();

    let dry = live.setup(&["--log", "log"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert_eq!(live.state(), before, "the dry run changed something");
    expect![[r#"
        dry run: rasa setup on <DEVICE> (root subvolume "root"):
          + persist      would create (persistent subvolume)
          + root-blank   would create (read-only empty blank)
          + old_roots    would create (old-roots directory)
          + log          would create (log subvolume)
        run again with --apply to create what is missing.

        Add to your NixOS configuration (the mounts must be there in the initrd):

        {
          fileSystems."/persist" = {
            device = "<DEVICE>";
            fsType = "btrfs";
            options = [ "subvol=persist" "compress=zstd" "noatime" ];
            neededForBoot = true;
          };
          fileSystems."/var/log" = {
            device = "<DEVICE>";
            fsType = "btrfs";
            options = [ "subvol=log" "compress=zstd" "noatime" ];
            neededForBoot = true;
          };
        }

    "#]]
    .assert_eq(&live.redact(&stdout(&dry)));

    let applied = live.setup(&["--log", "log", "--apply"]);
    assert!(applied.status.success(), "{}", stderr(&applied));
    let after = live.state();
    expect![[r#"
        . d 755
        ./log d 755
        ./old_roots d 700
        ./persist d 755
        ./root d 755
        ./root-blank d 755
        ./root/etc d 755
        ./root/etc/machine-id f 644
        ./root/var d 755
        ./root/var/lib d 755
        ./root/var/lib/machines d 755

        root ro=false
        persist ro=false
        root-blank ro=true
        log ro=false
    "#]]
    .assert_eq(&after);
    // The blank is empty, and the live root is exactly as it was.
    assert_eq!(
        std::fs::read_dir(live.fs.path("root-blank"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        sh(&format!(
            "cd '{}' && find . -printf '%p %y %m %s\\n' | sort",
            live.fs.path("root").display()
        )),
        root_before
    );

    // A rerun finds everything in place and changes nothing.
    let again = live.setup(&["--log", "log", "--apply", "--json"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(live.state(), after);
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    let actions: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["exists"; 4]);

    // The printed configuration is Nix.
    let nix = report["nix"].as_str().unwrap();
    let parsed = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf '%s' '{}' | nix-instantiate --parse -",
            nix.replace('\'', "'\\''")
        ))
        .output();
    match parsed {
        Ok(out) if out.status.success() => {}
        Ok(out) if String::from_utf8_lossy(&out.stderr).contains("not found") => {
            common::skip::<()>(
                "setup_snippet_parses",
                "nix-instantiate not installed (apt-get install nix-bin)",
            );
        }
        other => panic!("the fileSystems snippet does not parse: {other:?}"),
    }
}

#[test]
fn setup_keeps_an_existing_blank_and_repairs_nothing_it_should_not() {
    let Some(live) = Live::new("setup_keeps_an_existing_blank", "root") else {
        return;
    };
    live.fs.subvolume("persist");
    sh(&format!(
        "echo keep > '{}'",
        live.fs.path("persist/data").display()
    ));
    sh(&format!(
        "btrfs -q subvolume snapshot -r '{0}/root' '{0}/root-blank'",
        live.fs.top.display()
    ));
    let out = live.setup(&["--apply"]);
    assert!(out.status.success(), "{}", stderr(&out));
    expect![[r#"
        rasa setup on <DEVICE> (root subvolume "root"):
          = persist      exists (persistent subvolume)
          = root-blank   exists (read-only empty blank): not empty (2 entries): every boot will start with them
          + old_roots    created (old-roots directory)
    "#]]
    .assert_eq(&live.redact(stdout(&out).split("\nAdd to").next().unwrap()));
    assert_eq!(
        std::fs::read_to_string(live.fs.path("persist/data")).unwrap(),
        "keep\n"
    );
}

fn refused(live: &Live, extra: &[&str]) -> String {
    let before = live.state();
    let out = live.setup(extra);
    assert_eq!(
        out.status.code(),
        Some(3),
        "expected a refusal: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(live.state(), before, "a refusal changed the filesystem");
    live.redact(&stderr(&out))
}

#[test]
fn setup_refuses_collisions_with_non_subvolumes_and_changes_nothing() {
    let Some(live) = Live::new("setup_refuses_collisions", "root") else {
        return;
    };
    std::fs::create_dir(live.fs.path("persist")).unwrap();
    expect![[r#"
        rasa: mounted the top level of <DEVICE> privately
        rasa: error: "persist" already exists at the top level and is a plain directory, not the persistent subvolume rasa needs
        rasa:          fix: move "persist" away, or choose another name
        rasa:          nothing was changed
    "#]]
    .assert_eq(&refused(&live, &["--apply"]));
    std::fs::remove_dir(live.fs.path("persist")).unwrap();

    std::fs::write(live.fs.path("root-blank"), "not a subvolume").unwrap();
    expect![[r#"
        rasa: mounted the top level of <DEVICE> privately
        rasa: error: "root-blank" already exists at the top level and is not a directory, not the read-only empty blank rasa needs
        rasa:          fix: move "root-blank" away, or choose another name
        rasa:          nothing was changed
    "#]]
    .assert_eq(&refused(&live, &["--apply"]));
    std::fs::remove_file(live.fs.path("root-blank")).unwrap();

    live.fs.subvolume("old_roots");
    expect![[r#"
        rasa: mounted the top level of <DEVICE> privately
        rasa: error: "old_roots" already exists at the top level and is a subvolume, not the old-roots directory rasa needs
        rasa:          fix: rename it, or pass another name with --old-roots (old roots must sit in a plain directory)
        rasa:          nothing was changed
    "#]]
    .assert_eq(&refused(&live, &["--apply"]));
    sh(&format!(
        "btrfs -q subvolume delete '{}'",
        live.fs.path("old_roots").display()
    ));

    live.fs.subvolume("root-blank");
    expect![[r#"
        rasa: mounted the top level of <DEVICE> privately
        rasa: error: the blank "root-blank" exists but is writable
        rasa:          fix: if it is what every boot should start from, make it read-only: `btrfs property set <top>/root-blank ro true`
        rasa:          nothing was changed
    "#]]
    .assert_eq(&refused(&live, &["--apply"]));
}

#[test]
fn setup_refuses_a_root_that_is_not_the_named_subvolume_or_not_btrfs() {
    let Some(live) = Live::new(
        "setup_refuses_a_root_that_is_not_the_named_subvolume",
        "root",
    ) else {
        return;
    };
    expect![[r#"
        rasa: error: <LIVE> is mounted from the btrfs subvolume "/root", not from a top-level subvolume named "@"
        rasa:          fix: pass --root root if that is your root subvolume
        rasa:          nothing was changed
    "#]]
    .assert_eq(&refused(&live, &["--root", "@"]));

    let Some(top) = Live::new("setup_refuses_the_top_level_as_root", "/") else {
        return;
    };
    expect![[r#"
        rasa: error: <LIVE> is mounted from the btrfs subvolume "/", not from a top-level subvolume named "root"
        rasa:          fix: the root is the top level itself: move it into a subvolume first (see docs/guide.md), rasa cannot reset the top level
        rasa:          nothing was changed
    "#]]
    .assert_eq(&refused(&top, &[]));

    let tmpfs = live.fs.dir.path().join("tmpfs");
    std::fs::create_dir(&tmpfs).unwrap();
    sh(&format!("mount -t tmpfs none '{}'", tmpfs.display()));
    let out = std::process::Command::new(common::RASA)
        .args(["setup", "--live-root", tmpfs.to_str().unwrap()])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    sh(&format!("umount '{}'", tmpfs.display()));
    assert_eq!(out.status.code(), Some(3));
    expect![[r#"
        rasa: error: <TMPFS> is not a btrfs mount (it is tmpfs); rasa needs the root on a btrfs subvolume
        rasa:          fix: install onto btrfs first (see docs/guide.md, "Fresh install")
        rasa:          nothing was changed
    "#]]
    .assert_eq(&stderr(&out).replace(&tmpfs.display().to_string(), "<TMPFS>"));
}

/// A persistent subvolume named like setup's temporary blank (`<blank>.rasa-new`): setup used
/// to take it for its own leftover and delete it. The rules reserve the name: refused, and
/// nothing changed.
#[test]
fn setup_refuses_a_persist_named_like_its_temporary_and_deletes_nothing() {
    let Some(live) = Live::new("setup_refuses_reserved_persist", "root") else {
        return;
    };
    live.fs.subvolume("root-blank.rasa-new");
    std::fs::write(live.fs.path("root-blank.rasa-new/precious"), "data").unwrap();
    let before = live.state();
    let out = live.setup(&["--persist", "root-blank.rasa-new", "--apply"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("ends in .rasa-new"),
        "{}",
        stderr(&out)
    );
    assert_eq!(live.state(), before);
    assert!(live.fs.path("root-blank.rasa-new/precious").exists());
    // --log is one more name under the same rules.
    let out = live.setup(&["--log", "persist"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("both name"), "{}", stderr(&out));
}

/// What would make the first rollback refuse (/nix inside the root, the root as the default
/// subvolume) is said by setup already, not only at that boot.
#[test]
fn setup_warns_about_what_rollback_would_refuse() {
    let Some(live) = Live::new("setup_warns_rollback_refusals", "root") else {
        return;
    };
    std::fs::create_dir_all(live.fs.path("root/nix/store/abc-glibc")).unwrap();
    sh(&format!(
        "btrfs subvolume set-default '{}'",
        live.fs.path("root").display()
    ));
    let out = live.setup(&["--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings = report["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0]
        .as_str()
        .unwrap()
        .starts_with("/nix is part of the root subvolume"));
    assert!(warnings[1].as_str().unwrap().contains("default subvolume"));
}

/// The initrd mounts a neededForBoot entry (/var/lib/nixos) before activation could create its
/// storage copy: setup reports the copies that are missing (migrate creates them), and a
/// symlink on the way there is not followed into something that only looks like the copy.
#[test]
fn setup_reports_missing_needed_for_boot_copies() {
    let Some(live) = Live::new("setup_needed_for_boot", "root") else {
        return;
    };
    let manifest = live.fs.dir.path().join("manifest.json");
    std::fs::write(
        &manifest,
        r#"{"version": 1,
  "rollback": {"device": "/dev/null", "root": "root", "blank": "root-blank",
    "oldRoots": "old_roots", "persist": "persist", "keep": 5, "keepDays": 7},
  "entries": [
    {"storageRoot": "/persist", "path": "/var/lib/nixos", "kind": "directory", "user": "root", "group": "root", "mode": "0755", "neededForBoot": true},
    {"storageRoot": "/persist", "path": "/etc/ssh", "kind": "directory", "user": "root", "group": "root", "mode": "0755"}
  ]}"#,
    )
    .unwrap();
    let warnings = |live: &Live| -> Vec<String> {
        let out = live.setup(&["--json", "--manifest", manifest.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        report["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap().to_owned())
            .collect()
    };
    let expected = "the initrd mounts /var/lib/nixos from /persist/var/lib/nixos (neededForBoot), \
                    which does not exist yet: `rasa migrate --apply` creates it before the first \
                    wiping boot";
    // /etc/ssh is missing too, but nothing mounts it before activation: not reported.
    assert_eq!(warnings(&live), vec![expected.to_owned()]);

    // A symlink in the storage path pointing at a directory that has var/lib/nixos.
    std::fs::create_dir_all(live.live.join("elsewhere/lib/nixos")).unwrap();
    std::fs::create_dir_all(live.live.join("persist")).unwrap();
    std::os::unix::fs::symlink(live.live.join("elsewhere"), live.live.join("persist/var")).unwrap();
    assert_eq!(warnings(&live), vec![expected.to_owned()]);

    std::fs::remove_file(live.live.join("persist/var")).unwrap();
    std::fs::create_dir_all(live.live.join("persist/var/lib/nixos")).unwrap();
    assert_eq!(warnings(&live), Vec::<String>::new());
}
