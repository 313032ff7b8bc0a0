//! `rasa restore` and `rasa old-roots list --has / show / mount / umount` on real btrfs: old
//! roots made by `rasa rollback` (with a fixed clock, so their names are known), the live root
//! at `<top>/root` given with `--live-root`.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fidelity::{assert_faithful, build_live_tree};
use common::{quoted as q, sh, stderr, stdout, LoopBtrfs, RASA};

/// 2026-11-22 19:30:00 UTC: the first old root's name, then one a day.
const T1: u64 = 1_795_375_800;
const N1: &str = "20261122T193000Z";
const N2: &str = "20261123T193000Z";
const N3: &str = "20261124T193000Z";

struct Fx {
    fs: LoopBtrfs,
    manifest: PathBuf,
    /// Where `old-roots mount` mounts in this test; unmounted on drop.
    mounts: PathBuf,
}

impl Fx {
    fn new(test: &str) -> Option<Fx> {
        let fs = LoopBtrfs::new(test, 600)?;
        fs.standard_layout();
        let manifest = fs.dir.path().join("manifest.json");
        let mounts = fs.dir.path().join("old-roots-mounts");
        let fx = Fx {
            fs,
            manifest,
            mounts,
        };
        fx.write_manifest("");
        Some(fx)
    }

    fn write_manifest(&self, entries: &str) {
        std::fs::write(&self.manifest, common::manifest_text(entries)).unwrap();
    }

    fn live(&self) -> PathBuf {
        self.fs.path("root")
    }

    fn old(&self, name: &str) -> PathBuf {
        self.fs.path("old_roots").join(name)
    }

    /// Retire the root as the boot on day `day` (0, 1, 2: names N1, N2, N3) would.
    fn rollback(&self, day: u64) {
        let now = (T1 + day * 86_400).to_string();
        let out = self.fs.rasa_env(&["rollback"], &[("RASA_TEST_NOW", &now)]);
        assert!(out.status.success(), "{}", stderr(&out));
    }

    fn restore_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(RASA);
        cmd.arg("restore")
            .args(args)
            .arg("--live-root")
            .arg(self.live())
            .arg("--manifest")
            .arg(&self.manifest)
            .arg("--device")
            .arg(&self.fs.device)
            .env("NO_COLOR", "1")
            .env_remove("JOURNAL_STREAM");
        cmd
    }

    fn restore(&self, args: &[&str]) -> Output {
        self.restore_cmd(args).output().unwrap()
    }

    fn json(&self, args: &[&str]) -> (Option<i32>, serde_json::Value) {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.restore(&all);
        let value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&out), stderr(&out)));
        (out.status.code(), value)
    }

    fn write(&self, rel: &str, content: &str) {
        let path = self.live().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
}

impl Drop for Fx {
    fn drop(&mut self) {
        if self.mounts.exists() {
            let _ = Command::new("umount")
                .arg("-R")
                .arg("--lazy")
                .arg(&self.mounts)
                .output();
            for e in std::fs::read_dir(&self.mounts).into_iter().flatten() {
                let _ = Command::new("umount")
                    .arg("--lazy")
                    .arg(e.unwrap().path())
                    .output();
            }
        }
    }
}

/// Every name, type, mode, owner, size and mtime under a directory, and every file's hash:
/// what "nothing changed" is checked on.
fn fingerprint(dir: &Path) -> String {
    sh(&format!(
        "cd {} && find . -printf '%p %y %m %U:%G %s %T@ %l\\n' | sort && find . -type f -print0 | sort -z | xargs -0r sha256sum",
        q(dir)
    ))
}

#[test]
fn restore_is_faithful_and_says_which_old_root() {
    let Some(fx) = Fx::new("restore_is_faithful") else {
        return;
    };
    build_live_tree(&fx.live());
    // A parent that is not the default 0755 root:root, to be made as it was.
    sh(&format!(
        "chmod 0750 {0} && chown 0:65534 {0}",
        q(&fx.live().join("srv"))
    ));
    fx.rollback(0);
    assert!(
        !fx.live().join("srv").exists(),
        "the rollback left a blank root"
    );
    let before = fingerprint(&fx.live());

    let paths = ["/srv/data", "/etc/machine-id", "/home/nobody"];
    let plan = fx.restore(&paths);
    assert_eq!(plan.status.code(), Some(0), "{}", stderr(&plan));
    let text = stdout(&plan);
    assert!(
        text.contains(&format!(
            "/srv/data: from old root {N1} (the newest old root that holds it)"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "old_roots/{N1}/srv/data -> /srv/data: a directory"
        )),
        "{text}"
    );
    assert!(text.contains("would copy (nothing is there now)"), "{text}");
    assert!(text.contains("dry run: nothing was changed"), "{text}");
    assert_eq!(
        fingerprint(&fx.live()),
        before,
        "the dry run changed nothing"
    );

    let mut args = paths.to_vec();
    args.push("--apply");
    let (code, json) = fx.json(&args);
    assert_eq!(code, Some(0), "{json}");
    let data = &json["entries"][0];
    assert_eq!(data["action"], "copy");
    assert_eq!(data["from"], N1);
    assert_eq!(data["newestHolding"], true);
    assert_eq!(data["destination"], "/srv/data");
    assert!(data["bytes"].as_u64().unwrap() > 300_000, "{data}");
    assert_eq!(
        data["result"]["skippedSockets"],
        serde_json::json!(["data/socket"])
    );
    assert_eq!(data["result"]["hardLinks"], 2);

    // The same comparison as migrate's: owner, mode, times, xattrs, ACLs, capabilities, chattr
    // flags, hard links, device nodes, fifos, symlinks as links, odd names, content.
    assert_faithful(&fx.old(N1).join("srv/data"), &fx.live().join("srv/data"));
    assert_faithful(
        &fx.old(N1).join("etc/machine-id"),
        &fx.live().join("etc/machine-id"),
    );
    assert_faithful(
        &fx.old(N1).join("home/nobody"),
        &fx.live().join("home/nobody"),
    );
    // Holes stay holes.
    let sparse = std::fs::metadata(fx.live().join("srv/data/sparse")).unwrap();
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "{} blocks",
        sparse.blocks()
    );
    // A missing parent is made as the old root had it, never wider.
    for dir in ["srv", "home", "etc"] {
        let old = std::fs::metadata(fx.old(N1).join(dir)).unwrap();
        let new = std::fs::metadata(fx.live().join(dir)).unwrap();
        assert_eq!(
            (new.mode(), new.uid(), new.gid()),
            (old.mode(), old.uid(), old.gid()),
            "{dir}"
        );
    }
    let leftovers = sh(&format!("find {} -name '*.rasa-restore'", q(&fx.live())));
    assert_eq!(leftovers, "");

    // Again: everything is identical, nothing to do.
    let (code, json) = fx.json(&args);
    assert_eq!(code, Some(0), "{json}");
    for entry in json["entries"].as_array().unwrap() {
        assert_eq!(entry["action"], "identical", "{entry}");
    }
}

/// Three boots: /etc/foo was "v1" in the first, "v2" in the second, absent in the third.
fn three_boots(fx: &Fx) {
    fx.write("etc/foo", "v1\n");
    fx.rollback(0);
    fx.write("etc/foo", "v2\n");
    fx.rollback(1);
    fx.write("etc/other", "x\n");
    fx.rollback(2);
}

#[test]
fn without_from_the_newest_old_root_holding_the_path_is_used() {
    let Some(fx) = Fx::new("restore_newest") else {
        return;
    };
    three_boots(&fx);
    let (code, json) = fx.json(&["/etc/foo"]);
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["entries"][0]["from"], N2, "{json}");
    let out = fx.restore(&["/etc/foo", "--apply"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("from old root {N2} (the newest")));
    assert_eq!(
        std::fs::read_to_string(fx.live().join("etc/foo")).unwrap(),
        "v2\n"
    );

    // A path given twice, or inside another given path, is restored once, with it.
    std::fs::remove_file(fx.live().join("etc/foo")).unwrap();
    let (code, json) = fx.json(&["/etc", "/etc/foo", "/etc", "--apply"]);
    assert_eq!(code, Some(4), "/etc is there and differs: {json}");
    let entries = json["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{json}");
    assert_eq!(entries[0]["action"], "conflict", "{json}");
    assert_eq!(entries[1]["action"], "covered", "{json}");

    // Nowhere: exit 4, and it says so.
    let out = fx.restore(&["/etc/never-was"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("NOT FOUND: not in any old root (of 3 old roots looked at)"),
        "{}",
        stdout(&out)
    );
    // An old root that does not exist, or a relative path: refused, exit 3.
    let out = fx.restore(&["/etc/foo", "--from", "20991231T000000Z"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("(it holds: {N3}, {N2}, {N1})")));
    let out = fx.restore(&["etc/foo"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not an absolute path"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn from_and_conflicts_are_handled_like_migrate() {
    let Some(fx) = Fx::new("restore_conflicts") else {
        return;
    };
    three_boots(&fx);
    fx.write("etc/foo", "v2\n");
    let live_before = fingerprint(&fx.live());

    // --from an older root whose version differs from the live one: a conflict.
    let out = fx.restore(&["/etc/foo", "--from", N1]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("/etc/foo: from old root {N1}\n")),
        "{text}"
    );
    assert!(
        text.contains("CONFLICT: /etc/foo holds a regular file of 3 B that differs"),
        "{text}"
    );
    let out = fx.restore(&["/etc/foo", "--from", N1, "--apply"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let out = fx.restore(&[
        "/etc/foo",
        "--from",
        N1,
        "--apply",
        "--on-conflict",
        "keep-storage",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        fingerprint(&fx.live()),
        live_before,
        "stop and keep change nothing"
    );

    let (code, json) = fx.json(&[
        "/etc/foo",
        "--from",
        N1,
        "--apply",
        "--on-conflict",
        "replace-with-backup",
    ]);
    assert_eq!(code, Some(0), "{json}");
    let entry = &json["entries"][0];
    assert_eq!(entry["action"], "conflict");
    assert_eq!(entry["resolution"], "replace-with-backup");
    let backup = entry["backup"].as_str().unwrap();
    assert!(backup.starts_with("/etc/foo.rasa-backup-"), "{backup}");
    assert_eq!(
        std::fs::read_to_string(fx.live().join("etc/foo")).unwrap(),
        "v1\n"
    );
    assert_eq!(
        std::fs::read_to_string(fx.live().join(backup.trim_start_matches('/'))).unwrap(),
        "v2\n"
    );
    // The same root again: identical now.
    let (code, json) = fx.json(&["/etc/foo", "--from", N1]);
    assert_eq!(code, Some(0));
    assert_eq!(json["entries"][0]["action"], "identical");
}

#[test]
fn persist_copies_into_storage_and_prints_the_line_to_add() {
    let Some(fx) = Fx::new("restore_persist") else {
        return;
    };
    fx.write("var/lib/foo/state.db", "state\n");
    fx.write("etc/foo.conf", "conf\n");
    fx.rollback(0);
    std::fs::create_dir(fx.live().join("persist")).unwrap();
    let out = fx.restore(&["/var/lib/foo", "/etc/foo.conf", "--persist", "--apply"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "old_roots/{N1}/var/lib/foo -> /persist/var/lib/foo: a directory"
        )),
        "{text}"
    );
    assert!(
        text.contains(
            "add to your configuration and rebuild:\n  rasa.directories = [ \"/var/lib/foo\" ];\n  rasa.files = [ \"/etc/foo.conf\" ];\n"
        ),
        "{text}"
    );
    // (Compared before anything reads the copy: reading moves its atime.)
    assert_faithful(
        &fx.old(N1).join("var/lib/foo"),
        &fx.live().join("persist/var/lib/foo"),
    );
    assert_eq!(
        std::fs::read_to_string(fx.live().join("persist/var/lib/foo/state.db")).unwrap(),
        "state\n"
    );
    assert!(
        !fx.live().join("var/lib/foo").exists(),
        "not to the live path"
    );
    assert!(
        !fx.live().join("etc/foo.conf").exists(),
        "not to the live path"
    );
}

#[test]
fn a_persisted_path_is_served_from_storage_not_the_old_root() {
    let Some(fx) = Fx::new("restore_persisted") else {
        return;
    };
    // The old root has something at the persisted path (a leftover from before migrate).
    fx.write("var/lib/bar/x", "stale copy on the root\n");
    fx.rollback(0);
    // Storage holds the entry; the user deleted x from it (through the bind mount).
    std::fs::create_dir_all(fx.live().join("persist/var/lib/bar")).unwrap();
    fx.write_manifest(
        r#"{"storageRoot": "/persist", "path": "/var/lib/bar", "kind": "directory", "user": "root", "group": "root", "mode": "0755"}"#,
    );
    let before = fingerprint(&fx.live());
    for path in ["/var/lib/bar/x", "/var/lib/bar"] {
        let out = fx.restore(&[path, "--apply"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(
            text.contains("not restored: persisted by the manifest entry /var/lib/bar and served from storage"),
            "{text}"
        );
    }
    // A directory holding a persisted entry is not restored over it either.
    let out = fx.restore(&[
        "/var/lib",
        "--apply",
        "--on-conflict",
        "replace-with-backup",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("PROBLEM: it holds paths the manifest persists (/var/lib/bar)"),
        "{}",
        stdout(&out)
    );
    assert_eq!(fingerprint(&fx.live()), before, "nothing was copied");
}

#[test]
fn a_symlink_in_the_old_root_is_never_followed() {
    let Some(fx) = Fx::new("restore_symlink") else {
        return;
    };
    // In the old root, /home/alice is a symlink to /srv/alice (absolute: followed on the
    // running system it would leave the old root).
    fx.write("srv/alice/notes", "in the old root\n");
    std::fs::create_dir_all(fx.live().join("home")).unwrap();
    std::os::unix::fs::symlink("/srv/alice", fx.live().join("home/alice")).unwrap();
    fx.rollback(0);
    // A decoy where the symlink points on the machine running rasa.
    let before = fingerprint(&fx.live());

    let out = fx.restore(&["/home/alice/notes", "--from", N1, "--apply"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "PROBLEM: in the old root {N1}: /home/alice is a symlink to /srv/alice there (not followed)"
        )),
        "{text}"
    );
    let out = fx.restore(&["/home/alice/notes", "--apply"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("passed over {N1}: /home/alice is a symlink")));
    assert_eq!(fingerprint(&fx.live()), before, "nothing was copied");

    // The symlink itself is restored as a symlink, not as what it points to.
    let out = fx.restore(&["/home/alice", "--apply"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let link = fx.live().join("home/alice");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("/srv/alice"));

    // A symlink on the live side is never written through either.
    fx.write("srv/alice/notes2", "x");
    std::fs::remove_dir_all(fx.live().join("srv")).unwrap();
    let elsewhere = fx.fs.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, fx.live().join("srv")).unwrap();
    let out = fx.restore(&["/srv/alice/notes", "--apply"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("rasa never writes through a symlink"),
        "{}",
        stdout(&out)
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

#[test]
fn the_copy_appears_under_its_name_only_when_complete() {
    let Some(fx) = Fx::new("restore_atomic") else {
        return;
    };
    build_live_tree(&fx.live());
    fx.rollback(0);
    let final_path = fx.live().join("srv/data");
    let temp = fx.live().join("srv/.data.rasa-restore");
    let mut seen_temp = 0;
    let (status, err, stops) = common::run_stopping_at(
        fx.restore_cmd(&["/srv/data", "--apply"]),
        "restore-copied-file",
        |_| {
            assert!(
                !final_path.exists(),
                "a half copy is visible under the final name"
            );
            if temp.exists() {
                seen_temp += 1;
            }
        },
    );
    assert!(status.success(), "{err}");
    assert!(stops > 5, "{stops} files");
    assert_eq!(seen_temp, stops, "every file goes into the temporary copy");
    assert!(final_path.exists() && !temp.exists());

    // A crash mid-copy leaves only the temporary name; the rerun removes it and finishes.
    std::fs::remove_dir_all(&final_path).unwrap();
    let crashed = fx
        .restore_cmd(&["/srv/data", "--apply"])
        .env("RASA_FAILPOINT", "restore-copied-file")
        .output()
        .unwrap();
    assert!(!crashed.status.success());
    assert!(temp.exists() && !final_path.exists());
    let out = fx.restore(&["/srv/data", "--apply"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!temp.exists());
    assert_faithful(&fx.old(N1).join("srv/data"), &final_path);
}

// ---- rasa old-roots --------------------------------------------------------------------------

#[test]
fn old_roots_list_says_which_hold_a_path_and_their_size() {
    let Some(fx) = Fx::new("old_roots_has") else {
        return;
    };
    three_boots(&fx);
    let out = fx
        .fs
        .rasa(&["old-roots", "list", "--has", "/etc/foo", "--size", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let summary: Vec<(String, String, String, u64)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                r["retired_at"].as_str().unwrap().to_owned(),
                r["has"]["state"].as_str().unwrap().to_owned(),
                r["size_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (N3.into(), "2026-11-24 19:30:00 UTC".into(), "no".into(), 2),
            (N2.into(), "2026-11-23 19:30:00 UTC".into(), "yes".into(), 3),
            (N1.into(), "2026-11-22 19:30:00 UTC".into(), "yes".into(), 3),
        ]
    );
    let out = fx.fs.rasa(&["old-roots", "list", "--has", "/etc/foo"]);
    let text = stdout(&out);
    assert!(text.contains(" HAS "), "{text}");
    assert!(
        text.contains("rasa restore /etc/foo [--from NAME]"),
        "{text}"
    );
}

#[test]
fn old_roots_show_lists_what_that_boot_created() {
    let Some(fx) = Fx::new("old_roots_show") else {
        return;
    };
    three_boots(&fx);
    let out = fx.fs.rasa(&[
        "old-roots",
        "show",
        N2,
        "--long",
        "--manifest",
        fx.manifest.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("/etc/foo"), "{text}");
    assert!(!text.contains("/etc/other"), "{text}");
    // The summary speaks of a past boot, not of the next one.
    let out = fx.fs.rasa(&[
        "old-roots",
        "show",
        N2,
        "--manifest",
        fx.manifest.to_str().unwrap(),
    ]);
    let text = stdout(&out);
    assert!(
        text.contains("were not persisted: the boot after it erased them"),
        "{text}"
    );
    assert!(!text.contains("will be erased by the next boot"), "{text}");
    let out = fx.fs.rasa(&["old-roots", "show", "20991231T000000Z"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}

fn mountinfo_line(point: &Path) -> Option<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(point.to_str().unwrap()))
        .map(str::to_owned)
}

#[test]
fn a_mounted_old_root_is_browsable_read_only_and_survives_prune() {
    let Some(fx) = Fx::new("old_roots_mount") else {
        return;
    };
    three_boots(&fx);
    let at = fx.mounts.to_str().unwrap().to_owned();
    let out = fx.fs.rasa(&["old-roots", "mount", N1, "--at", &at]);
    assert!(out.status.success(), "{}", stderr(&out));
    let point = fx.mounts.join(N1);
    // Made like the rest of /run/rasa: for root only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&fx.mounts).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "the mount directory is {mode:o}");
    // A real mount, in the test's (the user's) namespace, not a private one.
    let line = mountinfo_line(&point).expect("mounted where the user sees it");
    let options = line.split(' ').nth(5).unwrap();
    for option in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(options.split(',').any(|o| o == option), "{line}");
    }
    assert!(line.contains(&format!(" /old_roots/{N1} ")), "{line}");
    assert_eq!(
        std::fs::read_to_string(point.join("etc/foo")).unwrap(),
        "v1\n"
    );
    assert!(
        std::fs::write(point.join("etc/foo"), "x").is_err(),
        "read-only"
    );
    // Mounting again is not an error; a name rasa never makes is refused.
    let again = fx.fs.rasa(&["old-roots", "mount", N1, "--at", &at]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stdout(&again).contains("already mounted"));
    let bad = fx
        .fs
        .rasa(&["old-roots", "mount", "../persist", "--at", &at]);
    assert_eq!(bad.status.code(), Some(3), "{}", stderr(&bad));

    // Retention says all go; the mounted one stays.
    let prune = fx.fs.rasa(&["prune", "--keep", "0", "--keep-days", "0"]);
    assert!(prune.status.success(), "{}", stderr(&prune));
    let left: Vec<String> = std::fs::read_dir(fx.fs.path("old_roots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec![N1.to_owned()], "{}", stdout(&prune));

    let out = fx.fs.rasa(&["old-roots", "umount", N1, "--at", &at]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(mountinfo_line(&point).is_none());
    assert!(!point.exists(), "the mount point is removed");
    let out = fx.fs.rasa(&["old-roots", "umount", N1, "--at", &at]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let prune = fx.fs.rasa(&["prune", "--keep", "0", "--keep-days", "0"]);
    assert!(prune.status.success(), "{}", stderr(&prune));
    assert_eq!(
        std::fs::read_dir(fx.fs.path("old_roots")).unwrap().count(),
        0
    );
}

#[test]
fn umount_all_unmounts_every_mounted_old_root() {
    let Some(fx) = Fx::new("old_roots_umount_all") else {
        return;
    };
    three_boots(&fx);
    let at = fx.mounts.to_str().unwrap().to_owned();
    for name in [N1, N2] {
        let out = fx.fs.rasa(&["old-roots", "mount", name, "--at", &at]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = Command::new(RASA)
        .args(["old-roots", "umount", "--all", "--at", &at])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for name in [N1, N2] {
        assert!(mountinfo_line(&fx.mounts.join(name)).is_none(), "{name}");
    }
}

#[test]
fn a_closed_stdout_is_not_a_crash() {
    let Some(fx) = Fx::new("restore_closed_stdout") else {
        return;
    };
    three_boots(&fx);
    let mut restore = fx.restore_cmd(&["/etc/foo"]);
    let mut list = Command::new(RASA);
    list.args(["old-roots", "list", "--has", "/etc/foo", "--device"])
        .arg(&fx.fs.device);
    for cmd in [&mut restore, &mut list] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = cmd.stdout(writer).output().unwrap();
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{err}");
        assert!(matches!(out.status.code(), Some(0 | 141)), "{err}");
    }
}
