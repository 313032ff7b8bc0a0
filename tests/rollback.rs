//! `rasa rollback`, `rasa prune` and `rasa old-roots` on real btrfs in loop files.

mod common;

use common::{sh, stderr, stdout, LoopBtrfs};
use expect_test::expect;

/// Files, directories, symlinks, and nested subvolumes three levels deep (one of them a
/// read-only snapshot), like a root that systemd and Docker have been at.
fn populate_root(fs: &LoopBtrfs) {
    let root = fs.path("root");
    sh(&format!(
        "cd '{r}' && mkdir -p etc var/lib home/alice && echo flag > test_flag && echo secret > etc/shadow \
         && chmod 600 etc/shadow && ln -s /nix/store/abc-foo/bin/foo usr-link && ln -s ../etc var/etc-link \
         && echo data > home/alice/notes",
        r = root.display()
    ));
    fs.subvolume("root/var/lib/machines");
    fs.subvolume("root/var/lib/machines/level2");
    fs.subvolume("root/var/lib/machines/level2/level3");
    sh(&format!(
        "echo deep > '{}'",
        fs.path("root/var/lib/machines/level2/level3/deep")
            .display()
    ));
    sh(&format!(
        "btrfs -q subvolume snapshot -r '{0}/root/var/lib/machines/level2' '{0}/root/var/lib/machines/level2-ro'",
        fs.top.display()
    ));
}

fn populate_persist(fs: &LoopBtrfs) {
    sh(&format!(
        "cd '{p}' && mkdir -p etc/ssh var/lib/nixos && head -c 100000 /dev/urandom > etc/ssh/key && chmod 600 etc/ssh/key \
         && echo 1000 > var/lib/nixos/uid-map && ln -s /etc/ssh/key link-out && mkfifo fifo",
        p = fs.path("persist").display()
    ));
    fs.subvolume("persist/nested");
    sh(&format!(
        "echo kept > '{}'",
        fs.path("persist/nested/file").display()
    ));
}

/// Every file under the persistent subvolume with its type, mode, owner, size, mtime and content
/// hash: if rollback touched anything there, this changes.
fn persist_fingerprint(fs: &LoopBtrfs) -> String {
    sh(&format!(
        "cd '{}' && find . -printf '%p %y %m %U:%G %s %T@ %l\\n' | sort && find . -type f -print0 | sort -z | xargs -0 sha256sum",
        fs.path("persist").display()
    ))
}

/// Names and nesting of everything at the top level; what "unchanged" is compared on.
fn top_state(fs: &LoopBtrfs) -> String {
    let listing = sh(&format!(
        "cd '{}' && find . -printf '%p %y %m\\n' | sort",
        fs.top.display()
    ));
    format!("{}\n{listing}", fs.subvolumes().join("\n"))
}

fn old_roots(fs: &LoopBtrfs) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fs.path("old_roots"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn ls(path: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Old-root names are timestamps.
fn redact_stamps(s: &str) -> String {
    let mut result = String::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if i + 16 <= bytes.len()
            && bytes[i..i + 8].iter().all(u8::is_ascii_digit)
            && bytes[i + 8] == b'T'
            && bytes[i + 9..i + 15].iter().all(u8::is_ascii_digit)
            && bytes[i + 15] == b'Z'
        {
            result.push_str("<STAMP>");
            i += 16;
        } else {
            result.push(bytes[i] as char);
            i += 1;
        }
    }
    result
}

/// Replace the parts of rasa's output that vary between runs.
fn redact(text: &str, fs: &LoopBtrfs) -> String {
    let mut out = text
        .replace(&fs.device.display().to_string(), "<DEVICE>")
        .replace(&fs.dir.path().display().to_string(), "<TMP>");
    out = redact_stamps(&out);
    out.lines()
        .map(|l| {
            if l.contains(" ms") && l.contains("in place in") {
                "rasa: new root in place in <N> ms"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn rollback_gives_a_blank_root_keeps_the_previous_one_and_never_touches_persist() {
    let Some(fs) = LoopBtrfs::new("rollback_gives_a_blank_root", 512) else {
        return;
    };
    fs.standard_layout();
    populate_root(&fs);
    populate_persist(&fs);
    let persist_before = persist_fingerprint(&fs);
    let blank_listing = ls(&fs.path("root-blank"));

    let out = fs.rasa(&["rollback"]);
    assert!(out.status.success(), "{}", stderr(&out));
    expect![[r#"
        rasa: mounted the top level of <DEVICE> privately
        rasa: created the old-roots directory old_roots
        rasa: created root.rasa-new as a writable snapshot of root-blank
        rasa: kept the previous root as old_roots/<STAMP>
        rasa: installed the new root
        rasa: new root in place in <N> ms"#]]
    .assert_eq(&redact(&stderr(&out), &fs));

    // The root is the blank again: same (empty) content, writable, a new subvolume.
    assert_eq!(ls(&fs.path("root")), blank_listing);
    std::fs::write(fs.path("root/writable"), "yes").expect("the new root is writable");
    // The previous root is kept whole, nested subvolumes included.
    let kept = old_roots(&fs);
    assert_eq!(kept.len(), 1);
    let old = fs.path(&format!("old_roots/{}", kept[0]));
    assert_eq!(
        std::fs::read_to_string(old.join("test_flag")).unwrap(),
        "flag\n"
    );
    assert_eq!(
        std::fs::read_to_string(old.join("var/lib/machines/level2/level3/deep")).unwrap(),
        "deep\n"
    );
    let subvols: Vec<String> = fs
        .subvolumes()
        .into_iter()
        .map(|p| p.replace(&kept[0], "<STAMP>"))
        .collect();
    expect![[r#"
        old_roots/<STAMP>
        old_roots/<STAMP>/var/lib/machines
        old_roots/<STAMP>/var/lib/machines/level2
        old_roots/<STAMP>/var/lib/machines/level2-ro
        old_roots/<STAMP>/var/lib/machines/level2/level3
        persist
        persist/nested
        root
        root-blank"#]]
    .assert_eq(&subvols.join("\n"));
    assert_eq!(
        persist_fingerprint(&fs),
        persist_before,
        "rollback changed the persistent subvolume"
    );

    // rasa's private mount is gone: only the fixture's own mount of the device remains.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(
        mounts
            .lines()
            .filter(|l| l.contains(&*fs.device.to_string_lossy()))
            .count(),
        1,
        "{mounts}"
    );
}

#[test]
fn empty_mode_starts_from_a_new_empty_subvolume_without_a_blank() {
    let Some(fs) = LoopBtrfs::new("empty_mode_starts_from_a_new_empty_subvolume", 256) else {
        return;
    };
    fs.subvolume("root");
    fs.subvolume("persist");
    sh(&format!(
        "echo flag > '{}'",
        fs.path("root/test_flag").display()
    ));
    let out = fs.rasa(&["rollback", "--empty"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(ls(&fs.path("root")).is_empty());
    assert_eq!(old_roots(&fs).len(), 1);
}

#[test]
fn dry_run_prints_the_plan_and_changes_nothing() {
    let Some(fs) = LoopBtrfs::new("dry_run_prints_the_plan", 256) else {
        return;
    };
    fs.standard_layout();
    populate_root(&fs);
    let before = top_state(&fs);
    let out = fs.rasa(&["rollback", "--dry-run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    expect![[r#"
        dry run: nothing will be changed. rasa rollback would:
          1. snapshot root-blank (read-only blank) as root.rasa-new
          2. move root to old_roots/<STAMP>
          3. rename root.rasa-new to root
        old roots kept now: 0"#]]
    .assert_eq(&redact(stdout(&out).trim_end(), &fs));
    assert_eq!(top_state(&fs), before);
}

#[test]
fn retention_keeps_exactly_the_newest_and_the_young_and_prunes_nested_trees() {
    let Some(fs) = LoopBtrfs::new("retention_keeps_exactly_the_newest", 512) else {
        return;
    };
    // Two roots retired long ago (created before the root, so first in retirement order, and
    // named in 2020): only age could keep them.
    std::fs::create_dir_all(fs.path("old_roots")).unwrap();
    fs.subvolume("old_roots/20200101T000000Z");
    fs.subvolume("old_roots/20200101T000000Z/nested");
    fs.subvolume("old_roots/20200102T000000Z");
    fs.standard_layout();
    populate_persist(&fs);
    let persist_before = persist_fingerprint(&fs);
    for boot in 0..4 {
        populate_root(&fs);
        sh(&format!(
            "echo {boot} > '{}'",
            fs.path("root/boot").display()
        ));
        let out = fs.rasa(&["rollback"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // Something a user put there by hand is never pruned.
    fs.subvolume("old_roots/my-backup");
    let recent = old_roots(&fs)
        .into_iter()
        .filter(|n| n.starts_with("20") && !n.starts_with("2020"))
        .collect::<Vec<_>>();
    assert_eq!(recent.len(), 4);

    // --keep 2: the two newest stay; the four recent ones are younger than 7 days, so the
    // default --keep-days keeps them too. Only the 2020 ones go.
    let out = fs.rasa(&["prune", "--keep", "2", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["pruned"],
        serde_json::json!(["20200101T000000Z", "20200102T000000Z"])
    );
    assert_eq!(report["subvolumes_deleted"], 3);
    let mut expected = recent.clone();
    expected.push("my-backup".into());
    expected.sort();
    assert_eq!(old_roots(&fs), expected);

    // --keep 2 --keep-days 0: exactly the two newest, with everything nested in the others gone.
    let out = fs.rasa(&["prune", "--keep", "2", "--keep-days", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut expected = recent[2..].to_vec();
    expected.push("my-backup".into());
    expected.sort();
    assert_eq!(old_roots(&fs), expected);
    let subvols = fs.subvolumes();
    assert!(
        !subvols
            .iter()
            .any(|s| s.contains(&recent[0]) || s.contains(&recent[1]) || s.contains("2020")),
        "{subvols:?}"
    );
    assert_eq!(
        subvols.iter().filter(|s| s.ends_with("level3")).count(),
        2,
        "{subvols:?}"
    );

    // --keep 0 --keep-days 0 keeps none of rasa's own.
    let out = fs.rasa(&["prune", "--keep", "0", "--keep-days", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(old_roots(&fs), vec!["my-backup".to_string()]);
    assert_eq!(persist_fingerprint(&fs), persist_before);
    assert!(fs.subvolumes().contains(&"root".to_string()));
    assert!(fs.subvolumes().contains(&"root-blank".to_string()));
}

#[test]
fn old_roots_list_shows_names_nesting_and_verdicts() {
    let Some(fs) = LoopBtrfs::new("old_roots_list_shows_names", 256) else {
        return;
    };
    fs.standard_layout();
    populate_root(&fs);
    assert!(fs.rasa(&["rollback"]).status.success());
    assert!(fs.rasa(&["rollback"]).status.success());
    let out = fs.rasa(&["old-roots", "list", "--keep", "1", "--keep-days", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = redact(&stdout(&out), &fs);
    // Ages depend on the second the test runs in.
    let text: String = text
        .lines()
        .map(|l| match l.find("s ago") {
            Some(end) => {
                let start = l[..end].rfind(' ').map_or(0, |i| i + 1);
                format!("{}N{}", &l[..start], &l[end..])
            }
            None => l.to_owned(),
        })
        // The retirement time, readable (`2026-11-22 19:30:00 UTC`), is the clock's.
        .map(|l| match l.find(" UTC") {
            Some(end) if end >= 19 => format!("{}<TIME>{}", &l[..end - 19], &l[end..]),
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    expect![[r#"
        NAME               RETIRED AT                     AGE  NESTED  RETENTION
        <STAMP>   <TIME> UTC     Ns ago       0  kept (newest)
        <STAMP>   <TIME> UTC     Ns ago       4  pruned at next prune

        rasa restore PATH [--from NAME]      # copy a path back (dry run; --apply to copy)
        rasa old-roots mount NAME            # browse one at /run/rasa/old-roots/NAME"#]]
    .assert_eq(&text);
    let out = fs.rasa(&["old-roots", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[1]["nested_subvolumes"], 4);
}

// ---- crash safety -------------------------------------------------------------------------

/// Abort rasa right after `step`, run it again, and check what must hold at any crash point:
/// a usable blank root, /persist untouched, and the root that held the flag still kept.
#[cfg(feature = "failpoints")]
fn crash_then_recover(step: &str, command: &[&str]) {
    let Some(fs) = LoopBtrfs::new(&format!("crash_at_{step}"), 512) else {
        return;
    };
    fs.standard_layout();
    populate_root(&fs);
    populate_persist(&fs);
    let persist_before = persist_fingerprint(&fs);
    if command[0] == "prune" {
        // Something for prune to do: three retired roots, the oldest two with nesting.
        for retired in 0..3 {
            if retired > 0 {
                populate_root(&fs);
            }
            assert!(fs.rasa(&["rollback"]).status.success());
        }
        sh(&format!(
            "echo flag > '{}'",
            fs.path("root/test_flag").display()
        ));
    }
    let kept_before = old_roots(&fs);

    let crashed = fs.rasa_env(command, &[("RASA_FAILPOINT", step)]);
    assert!(
        !crashed.status.success(),
        "failpoint {step} was not reached: {}",
        stderr(&crashed)
    );
    assert!(
        stderr(&crashed).contains(&format!("RASA-FAILPOINT-REACHED {step}")),
        "{}",
        stderr(&crashed)
    );
    assert_eq!(
        persist_fingerprint(&fs),
        persist_before,
        "{step}: the crash touched /persist"
    );

    let again = fs.rasa(command);
    assert!(
        again.status.success(),
        "rerun after {step} failed: {}",
        stderr(&again)
    );
    assert_eq!(
        persist_fingerprint(&fs),
        persist_before,
        "{step}: the rerun touched /persist"
    );
    assert!(
        fs.subvolumes().contains(&"root".to_string()),
        "{step}: no root"
    );
    assert!(
        !fs.path("root.rasa-new").exists(),
        "{step}: a stray new root is left"
    );
    assert!(
        !old_roots(&fs).iter().any(|n| n.starts_with(".pruning-")),
        "{step}: an unfinished prune is left"
    );

    if command[0] == "rollback" {
        assert!(
            ls(&fs.path("root")).is_empty(),
            "{step}: the root is not blank"
        );
        // The root that held the flag is kept, with its nested subvolumes.
        let with_flag: Vec<String> = old_roots(&fs)
            .into_iter()
            .filter(|n| fs.path(&format!("old_roots/{n}/test_flag")).exists())
            .collect();
        assert_eq!(with_flag.len(), 1, "{step}: {:?}", old_roots(&fs));
        assert!(fs
            .path(&format!(
                "old_roots/{}/var/lib/machines/level2/level3/deep",
                with_flag[0]
            ))
            .exists());
    } else {
        // Prune with --keep 1 --keep-days 0: the newest old root survives every crash point.
        let newest = kept_before.last().unwrap().clone();
        assert_eq!(old_roots(&fs), vec![newest], "{step}");
        assert!(
            fs.path("root/test_flag").exists(),
            "{step}: prune touched the live root"
        );
    }
}

#[cfg(feature = "failpoints")]
#[test]
fn crash_after_each_rollback_step_then_rerun_completes() {
    for step in ["created-new-root", "moved-old-root", "installed-new-root"] {
        crash_then_recover(step, &["rollback"]);
    }
}

/// Discarding a stray read-only `root.rasa-new` with nested subvolumes is a step of its own:
/// a crash half-way through leaves a root and a partial stray, and the rerun completes (with the
/// root gone, the fresh root is made first, so there is one then too).
#[cfg(feature = "failpoints")]
#[test]
fn crash_while_discarding_a_stray_new_root_then_rerun_completes() {
    for root_present in [true, false] {
        let Some(fs) = LoopBtrfs::new("crash_discarding_stray", 256) else {
            return;
        };
        fs.standard_layout();
        if root_present {
            populate_root(&fs);
        } else {
            sh(&format!(
                "btrfs -q subvolume delete '{}'",
                fs.path("root").display()
            ));
        }
        fs.subvolume("root.rasa-new");
        fs.subvolume("root.rasa-new/a");
        fs.subvolume("root.rasa-new/a/b");
        sh(&format!(
            "btrfs property set '{}' ro true",
            fs.path("root.rasa-new").display()
        ));
        sh(&format!(
            "btrfs property set '{}' ro true",
            fs.path("root.rasa-new/a").display()
        ));
        let step = "discarded-stale-subvolume";
        let crashed = fs.rasa_env(&["rollback"], &[("RASA_FAILPOINT", step)]);
        assert!(
            stderr(&crashed).contains(&format!("RASA-FAILPOINT-REACHED {step}")),
            "{}",
            stderr(&crashed)
        );
        // With the root gone, the fresh root is made before the stray is discarded: there is
        // a root at every point.
        assert!(
            fs.subvolumes().contains(&"root".to_string()),
            "{:?}",
            fs.subvolumes()
        );
        let again = fs.rasa(&["rollback"]);
        assert!(again.status.success(), "{}", stderr(&again));
        assert!(ls(&fs.path("root")).is_empty());
        assert!(!fs.path("root.rasa-new").exists());
        // The root that was there is kept: the populated one, or the fresh one the crashed
        // run made (never booted, empty).
        let kept = old_roots(&fs);
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(
            fs.path(&format!("old_roots/{}/test_flag", kept[0]))
                .exists(),
            root_present
        );
    }
}

/// A crash right after a stray `root.rasa-new` is discarded, before the new one is made: with
/// the root present the rerun starts over; with the root gone (a `Remake`) there must still be
/// a root on disk, or the next boot has nothing to mount and rasa nothing to finish.
#[cfg(feature = "failpoints")]
#[test]
fn crash_right_after_discarding_a_stray_new_root_leaves_a_root() {
    for root_present in [true, false] {
        let Some(fs) = LoopBtrfs::new("crash_after_discarding_stray", 256) else {
            return;
        };
        fs.standard_layout();
        if root_present {
            populate_root(&fs);
        } else {
            sh(&format!(
                "btrfs -q subvolume delete '{}'",
                fs.path("root").display()
            ));
        }
        fs.subvolume("root.rasa-new");
        fs.subvolume("root.rasa-new/a");
        sh(&format!(
            "btrfs property set '{}' ro true",
            fs.path("root.rasa-new").display()
        ));
        let step = "discarded-stale-new";
        let crashed = fs.rasa_env(&["rollback"], &[("RASA_FAILPOINT", step)]);
        assert!(
            stderr(&crashed).contains(&format!("RASA-FAILPOINT-REACHED {step}")),
            "{}",
            stderr(&crashed)
        );
        assert!(
            fs.subvolumes().contains(&"root".to_string()),
            "root present before: {root_present}: the crash left no root: {:?}",
            fs.subvolumes()
        );
        let again = fs.rasa(&["rollback"]);
        assert!(again.status.success(), "{}", stderr(&again));
        assert!(ls(&fs.path("root")).is_empty());
        assert!(!fs.path("root.rasa-new").exists());
    }
}

#[cfg(feature = "failpoints")]
#[test]
fn crash_during_prune_then_rerun_completes() {
    for step in ["prune-claimed", "prune-deleted-subvolume"] {
        crash_then_recover(step, &["prune", "--keep", "1", "--keep-days", "0"]);
    }
}

#[cfg(not(feature = "failpoints"))]
#[test]
fn crash_tests_need_the_failpoints_feature() {
    common::skip::<()>(
        "crash_after_each_step",
        "built without --features failpoints (cargo xtask test enables it)",
    );
}

// ---- refusals: the message, and nothing changed ----------------------------------------

/// Run rasa expecting a refusal (exit 3); return its redacted message and check the disk.
fn refusal(fs: &LoopBtrfs, args: &[&str]) -> String {
    let before = top_state(fs);
    let out = fs.rasa(args);
    assert_eq!(
        out.status.code(),
        Some(3),
        "expected a refusal from {args:?}: {}",
        stderr(&out)
    );
    assert_eq!(top_state(fs), before, "{args:?} changed the filesystem");
    redact(&stderr(&out), fs)
}

#[test]
fn refusals_name_the_problem_and_the_fix_and_change_nothing() {
    let Some(fs) = LoopBtrfs::new("refusals_name_the_problem", 256) else {
        return;
    };
    fs.standard_layout();
    populate_root(&fs);
    sh(&format!(
        "btrfs -q subvolume snapshot '{0}/root' '{0}/root-writable'",
        fs.top.display()
    ));
    std::fs::create_dir(fs.path("plain-dir")).unwrap();
    fs.subvolume("subvol-roots");

    expect![[r#"
        rasa: error: the root subvolume name "a/b" contains '/': it must be one plain name at the top level of the filesystem
        rasa:          fix: pass a plain subvolume name with --root, e.g. --root root
        rasa:          nothing was changed"#]]
    .assert_eq(&refusal(&fs, &["rollback", "--root", "a/b"]));
    expect![[r#"
        rasa: error: the blank subvolume name "" is empty: it must be one plain name at the top level of the filesystem
        rasa:          fix: pass a plain subvolume name with --blank, e.g. --blank root-blank
        rasa:          nothing was changed"#]]
    .assert_eq(&refusal(&fs, &["rollback", "--blank", ""]));
    expect![[r#"
        rasa: error: the old-roots directory name ".." is '.' or '..': it must be one plain name at the top level of the filesystem
        rasa:          fix: pass a plain subvolume name with --old-roots, e.g. --old-roots old_roots
        rasa:          nothing was changed"#]]
    .assert_eq(&refusal(&fs, &["rollback", "--old-roots", ".."]));
    expect![[r#"
        rasa: error: --root and --persist both name "persist": the root, the blank, the old roots and the persistent subvolume must be four different things
        rasa:          fix: give --root and --persist different names
        rasa:          nothing was changed"#]]
    .assert_eq(&refusal(&fs, &["rollback", "--root", "persist"]));
    expect![[r#"
        rasa: error: --root and --blank both name "root": the root, the blank, the old roots and the persistent subvolume must be four different things
        rasa:          fix: give --root and --blank different names
        rasa:          nothing was changed"#]]
    .assert_eq(&refusal(&fs, &["rollback", "--blank", "root"]));
    expect![[r#"
        rasa: mounted the top level of <DEVICE> privately
        rasa: error: the root subvolume "wrong" does not exist at the top level of <DEVICE> (found: persist, plain-dir, root, root-blank, root-writable, subvol-roots)
        rasa:          fix: pass the name of the root subvolume with --root (the subvol= option of /)
        rasa:          nothing was changed"#]]
    .assert_eq(&refusal(&fs, &["rollback", "--root", "wrong"]));
    expect![[r#"
        rasa: mounted the top level of <DEVICE> privately
        rasa: error: "plain-dir" at the top level of <DEVICE> is not a subvolume
        rasa:          fix: pass the name of the root subvolume with --root (the subvol= option of /)
        rasa:          nothing was changed"#]]
    .assert_eq(&refusal(&fs, &["rollback", "--root", "plain-dir"]));
    expect![[r#"
        rasa: mounted the top level of <DEVICE> privately
        rasa: error: the blank subvolume "missing-blank" does not exist at the top level of <DEVICE> (found: persist, plain-dir, root, root-blank, root-writable, subvol-roots)
        rasa:          fix: create it once with `btrfs subvolume create <top>/missing-blank && btrfs property set <top>/missing-blank ro true` (or `rasa setup`), pass the right name with --blank, or use --empty
        rasa:          nothing was changed"#]]
    .assert_eq(&refusal(&fs, &["rollback", "--blank", "missing-blank"]));
    expect![[r#"
        rasa: mounted the top level of <DEVICE> privately
        rasa: error: the blank subvolume "root-writable" is writable, so what each boot starts from could drift
        rasa:          fix: make it read-only: `btrfs property set <top>/root-writable ro true`
        rasa:          nothing was changed"#]]
    .assert_eq(&refusal(&fs, &["rollback", "--blank", "root-writable"]));
    expect![[r#"
        rasa: mounted the top level of <DEVICE> privately
        rasa: error: "subvol-roots" is a subvolume; the old roots must live in a plain directory, because a subvolume can only be renamed within its parent
        rasa:          fix: rename it and let rasa create "subvol-roots" as a directory, or pass another name with --old-roots
        rasa:          nothing was changed"#]]
    .assert_eq(&refusal(&fs, &["rollback", "--old-roots", "subvol-roots"]));
}

#[test]
fn refuses_missing_and_non_btrfs_devices() {
    let Some(fs) = LoopBtrfs::new("refuses_missing_and_non_btrfs_devices", 256) else {
        return;
    };
    let run = |device: &str| {
        let out = std::process::Command::new(common::RASA)
            .args(["rollback", "--device", device])
            .env("NO_COLOR", "1")
            .env_remove("JOURNAL_STREAM")
            .env("RASA_ROLLBACK_RECORD", fs.record_file())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        redact(&stderr(&out), &fs)
    };
    expect![[r#"
        rasa: error: device /dev/mapper/does-not-exist does not exist
        rasa:          fix: pass the device that holds the btrfs filesystem with --device (for LUKS, the unlocked /dev/mapper/<name>, not the partition)
        rasa:          nothing was changed"#]]
    .assert_eq(&run("/dev/mapper/does-not-exist"));

    let zeros = fs.dir.path().join("zeros.img");
    std::fs::File::create(&zeros)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    expect![[r#"
        rasa: error: <TMP>/zeros.img does not hold a btrfs filesystem
        rasa:          fix: pass the device that holds the btrfs filesystem with --device
        rasa:          nothing was changed"#]]
    .assert_eq(&run(&zeros.display().to_string()));

    let luks = fs.dir.path().join("luks.img");
    let mut header = b"LUKS\xba\xbe".to_vec();
    header.resize(1 << 20, 0);
    std::fs::write(&luks, header).unwrap();
    expect![[r#"
        rasa: error: <TMP>/luks.img does not hold a btrfs filesystem (it is a LUKS container: unlock it and pass /dev/mapper/<name>)
        rasa:          fix: pass the device that holds the btrfs filesystem with --device
        rasa:          nothing was changed"#]]
    .assert_eq(&run(&luks.display().to_string()));

    // The magic is there but the filesystem behind it is garbage: the mount fails.
    let fake = fs.dir.path().join("fake.img");
    let mut bytes = vec![0u8; 1 << 20];
    bytes[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
    std::fs::write(&fake, &bytes).unwrap();
    let fake_loop = sh(&format!("losetup -f --show '{}'", fake.display()))
        .trim()
        .to_owned();
    let message = run(&fake_loop);
    sh(&format!("losetup -d {fake_loop}"));
    let message = message.replace(&fake_loop, "<FAKE>");
    expect![[r#"
        rasa: error: cannot mount the top level (subvolid=5) of <FAKE>: EINVAL: Invalid argument
        rasa:          fix: check `dmesg` for the kernel's reason; the device must be an unlocked, healthy btrfs
        rasa:          nothing was changed"#]]
    .assert_eq(&message);
}

// ---- issue 12: what rollback and prune must never do, whatever they find -------------------

/// Mount subvolume `subvol` (a path below the top level) of the test filesystem on a fresh
/// directory; unmounted on drop.
struct SubvolMount {
    dir: tempfile::TempDir,
}

impl SubvolMount {
    fn new(fs: &LoopBtrfs, subvol: &str) -> SubvolMount {
        let dir = tempfile::Builder::new()
            .prefix("rasa-mounted.")
            .tempdir()
            .unwrap();
        sh(&format!(
            "mount -o subvol='{subvol}' {} '{}'",
            fs.device.display(),
            dir.path().display()
        ));
        SubvolMount { dir }
    }
}

impl Drop for SubvolMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// Rollback expecting exit 3, a message with `phrase`, and the top level unchanged.
fn refused_with(fs: &LoopBtrfs, args: &[&str], phrase: &str) -> String {
    let message = refusal(fs, args);
    assert!(message.contains(phrase), "{args:?}: {message}");
    message
}

/// Two rollbacks at once: the second waits for the first (one lock on the top level), so the
/// next boot always finds a root. Without the lock the second one installs its own new root
/// while the first holds at "created-new-root"; the first then retires that root and finds
/// no `root.rasa-new` to install: neither `root` nor `root.rasa-new` is left.
#[cfg(feature = "failpoints")]
#[test]
fn concurrent_rollbacks_take_turns_and_always_leave_a_root() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let Some(fs) = LoopBtrfs::new("concurrent_rollbacks", 256) else {
        return;
    };
    fs.standard_layout();
    populate_root(&fs);
    let spawn = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(common::RASA);
        cmd.args(["rollback", "--device"])
            .arg(&fs.device)
            .env("NO_COLOR", "1")
            .env_remove("JOURNAL_STREAM")
            .env("RASA_ROLLBACK_RECORD", fs.record_file())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().unwrap()
    };
    let mut first = spawn(&[
        ("RASA_FAILPOINT", "created-new-root"),
        ("RASA_FAILPOINT_ACTION", "wait"),
    ]);
    let mut first_err = BufReader::new(first.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("RASA-FAILPOINT-REACHED created-new-root") {
        let mut line = String::new();
        assert!(
            first_err.read_line(&mut line).unwrap() > 0,
            "the first rollback ended early: {seen}"
        );
        seen += &line;
    }
    let mut second = spawn(&[]);
    // Let the first one go on once the second waits for the lock (or, without a lock, once
    // the second has finished).
    let mut second_err = BufReader::new(second.stderr.take().unwrap());
    let mut second_log = String::new();
    loop {
        let mut line = String::new();
        if second_err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        second_log += &line;
        if line.contains("another rasa is changing this filesystem") {
            break;
        }
    }
    drop(first.stdin.take());
    let first_status = first.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut first_err, &mut rest).unwrap();
    std::io::Read::read_to_string(&mut second_err, &mut second_log).unwrap();
    let second_status = second.wait().unwrap();
    let subvols = fs.subvolumes();
    assert!(
        subvols.contains(&"root".to_string()),
        "no root for the next boot: {subvols:?}\nfirst: {seen}{rest}\nsecond: {second_log}"
    );
    assert!(!fs.path("root.rasa-new").exists(), "{subvols:?}");
    assert!(first_status.success(), "first: {seen}{rest}");
    assert!(second_status.success(), "second: {second_log}");
    assert!(
        second_log.contains("another rasa is changing this filesystem"),
        "the second run did not wait: {second_log}"
    );
    // Both retired a root: the populated one and the first run's blank one.
    assert_eq!(old_roots(&fs).len(), 2, "{:?}", old_roots(&fs));
    assert!(ls(&fs.path("root")).is_empty());
}

/// A running system: the root subvolume is mounted (here on a scratch directory, as / would
/// be). Retiring it would leave the system writing into an old root that prune later deletes.
#[test]
fn rollback_refuses_while_the_root_is_mounted() {
    let Some(fs) = LoopBtrfs::new("rollback_refuses_mounted_root", 256) else {
        return;
    };
    fs.standard_layout();
    populate_root(&fs);
    let mounted = SubvolMount::new(&fs, "root");
    refused_with(&fs, &["rollback"], "is mounted at");
    drop(mounted);
    assert!(fs.rasa(&["rollback"]).status.success());
}

/// The root is what a mount without subvol= gets: rollback says so instead of leaving the
/// default on the retired root.
#[test]
fn rollback_refuses_when_the_root_is_the_default_subvolume() {
    let Some(fs) = LoopBtrfs::new("rollback_refuses_default_subvolume", 256) else {
        return;
    };
    fs.standard_layout();
    sh(&format!(
        "btrfs subvolume set-default '{}'",
        fs.path("root").display()
    ));
    refused_with(&fs, &["rollback"], "default subvolume");
    sh(&format!(
        "btrfs subvolume set-default 5 '{}'",
        fs.top.display()
    ));
    assert!(fs.rasa(&["rollback"]).status.success());
    assert!(fs.rasa(&["rollback"]).status.success());
    // Prune never deletes the default subvolume either (here: an old root).
    let kept = old_roots(&fs);
    sh(&format!(
        "btrfs subvolume set-default '{}'",
        fs.path(&format!("old_roots/{}", kept[0])).display()
    ));
    let out = fs.rasa(&["prune", "--keep", "0", "--keep-days", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(old_roots(&fs), vec![kept[0].clone()]);
}

/// A boot from an old root (or a manual mount of one): prune keeps it, whatever retention says,
/// and prunes the rest.
#[test]
fn prune_never_deletes_a_mounted_old_root() {
    let Some(fs) = LoopBtrfs::new("prune_never_deletes_mounted", 384) else {
        return;
    };
    fs.standard_layout();
    for _ in 0..3 {
        populate_root(&fs);
        assert!(fs.rasa(&["rollback"]).status.success());
    }
    let kept = old_roots(&fs);
    let booted = SubvolMount::new(&fs, &format!("old_roots/{}", kept[0]));
    // A nested subvolume of another old root mounted somewhere keeps that whole root too.
    let nested = SubvolMount::new(&fs, &format!("old_roots/{}/var/lib/machines", kept[1]));
    let out = fs.rasa(&[
        "old-roots",
        "list",
        "--keep",
        "0",
        "--keep-days",
        "0",
        "--json",
    ]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let verdicts: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["verdict"].as_str().unwrap())
        .collect();
    assert_eq!(
        verdicts,
        ["prune", "kept-in-use", "kept-in-use"],
        "{listed:#}"
    );
    let out = fs.rasa(&["prune", "--keep", "0", "--keep-days", "0", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(old_roots(&fs), kept[..2].to_vec());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["in_use"], serde_json::json!([kept[0], kept[1]]));
    assert!(booted.dir.path().join("test_flag").exists());
    drop((booted, nested));
    let out = fs.rasa(&["prune", "--keep", "0", "--keep-days", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(old_roots(&fs).is_empty());
}

/// Prune deletes only what it made, read-only nesting included, goes on past a root it cannot
/// delete, and `list` shows every entry.
#[test]
fn prune_claims_only_its_own_and_never_wedges() {
    let Some(fs) = LoopBtrfs::new("prune_claims_only_its_own", 384) else {
        return;
    };
    fs.standard_layout();
    for boot in 0..3 {
        populate_root(&fs);
        if boot == 1 {
            // A container image: a read-only subvolume holding a nested subvolume.
            fs.subvolume("root/var/lib/image");
            fs.subvolume("root/var/lib/image/inner");
            sh(&format!(
                "btrfs property set '{}' ro true",
                fs.path("root/var/lib/image").display()
            ));
        }
        assert!(fs.rasa(&["rollback"]).status.success());
    }
    let retired = old_roots(&fs);
    // The oldest old root is read-only itself.
    sh(&format!(
        "btrfs property set '{}' ro true",
        fs.path(&format!("old_roots/{}", retired[0])).display()
    ));
    // Not rasa's: a name that merely starts with .pruning-, and one like persist.
    fs.subvolume("old_roots/.pruning-mine");
    fs.subvolume("old_roots/persist");
    // rasa's own, left by an interrupted prune.
    fs.subvolume("old_roots/.pruning-20200101T000000Z");
    // The newest cannot be deleted (immutable): the others still go.
    let stuck = retired[2].clone();
    sh(&format!(
        "chattr +i '{}'",
        fs.path(&format!("old_roots/{stuck}")).display()
    ));

    let out = fs.rasa(&["old-roots", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for name in [".pruning-mine", "persist", ".pruning-20200101T000000Z"] {
        assert!(names.contains(&name), "{name} not listed: {names:?}");
    }
    assert_eq!(names.len(), 6, "{names:?}");

    let out = fs.rasa(&["prune", "--keep", "0", "--keep-days", "0"]);
    sh(&format!(
        "chattr -i '{}'",
        fs.path(&format!("old_roots/{stuck}")).display()
    ));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("FAILED to prune {stuck}")),
        "{}",
        stdout(&out)
    );
    let mut expected = vec![".pruning-mine".to_string(), "persist".into(), stuck.clone()];
    expected.sort();
    assert_eq!(old_roots(&fs), expected);
    let subvols = fs.subvolumes();
    assert!(!subvols.iter().any(|s| s.contains("image")), "{subvols:?}");

    let out = fs.rasa(&["prune", "--keep", "0", "--keep-days", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        old_roots(&fs),
        vec![".pruning-mine".to_string(), "persist".into()]
    );
    assert!(fs.subvolumes().contains(&"persist".to_string()));
}

/// Clocks: boots in the year 9999 (and past it) give names the parser reads back, rollback
/// keeps working after them, and retention prunes them once a correct clock has moved on.
#[cfg(feature = "failpoints")]
#[test]
fn a_boot_in_the_year_9999_neither_breaks_rollback_nor_freezes_retention() {
    let Some(fs) = LoopBtrfs::new("clock_year_9999", 384) else {
        return;
    };
    fs.standard_layout();
    let y9999 = "253402300799"; // 9999-12-31T23:59:59Z
    for _ in 0..3 {
        let out = fs.rasa_env(&["rollback"], &[("RASA_TEST_NOW", y9999)]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let out = fs.rasa_env(&["rollback"], &[("RASA_TEST_NOW", &now.to_string())]);
    assert!(out.status.success(), "{}", stderr(&out));
    let names = old_roots(&fs);
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(names.contains(&"99991231T235959Z".to_string()), "{names:?}");
    assert!(
        names.contains(&"100000101T000000Z".to_string()),
        "{names:?}"
    );
    let listed = fs.rasa(&["old-roots", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["verdict"] != "not-rasas"),
        "{listed:#}"
    );
    // Eight days on, with the default retention (5 newest, 7 days): four old roots are all
    // among the 5 newest; with --keep 1 only the one retired with a correct clock stays.
    let later = (now + 8 * 86_400).to_string();
    let out = fs.rasa_env(
        &["prune", "--keep", "1", "--keep-days", "7"],
        &[("RASA_TEST_NOW", &later)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let left = old_roots(&fs);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        !left[0].starts_with("9999") && left[0].len() == 16,
        "{left:?}"
    );
}

/// Layouts rollback must look at before acting: refused with the fix (exit 3, nothing
/// changed), or repaired where the thing is rasa's own.
#[test]
fn rollback_inspects_stray_temporaries_and_read_only_roots() {
    let Some(fs) = LoopBtrfs::new("rollback_inspects_layouts", 384) else {
        return;
    };
    fs.standard_layout();
    populate_root(&fs);

    // A plain directory where rasa prepares the new root.
    std::fs::create_dir(fs.path("root.rasa-new")).unwrap();
    std::fs::write(fs.path("root.rasa-new/something"), "x").unwrap();
    refused_with(&fs, &["rollback"], "is a plain directory, not a subvolume");
    std::fs::remove_dir_all(fs.path("root.rasa-new")).unwrap();

    // A read-only root cannot be moved into old_roots.
    sh(&format!(
        "btrfs property set '{}' ro true",
        fs.path("root").display()
    ));
    refused_with(&fs, &["rollback"], "is read-only");
    sh(&format!(
        "btrfs property set '{}' ro false",
        fs.path("root").display()
    ));

    // A stray read-only root.rasa-new holding a nested subvolume: rasa's own name, so it is
    // discarded and the rollback completes.
    fs.subvolume("root.rasa-new");
    fs.subvolume("root.rasa-new/nested");
    sh(&format!(
        "btrfs property set '{}' ro true",
        fs.path("root.rasa-new").display()
    ));
    let out = fs.rasa(&["rollback"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(ls(&fs.path("root")).is_empty());
    assert!(!fs.path("root.rasa-new").exists());

    // The root gone and such a stray in its place: a fresh new root is made and installed,
    // never the read-only stray.
    sh(&format!(
        "btrfs -q subvolume delete '{}'",
        fs.path("root").display()
    ));
    fs.subvolume("root.rasa-new");
    fs.subvolume("root.rasa-new/nested");
    sh(&format!(
        "btrfs property set '{}' ro true",
        fs.path("root.rasa-new").display()
    ));
    let out = fs.rasa(&["rollback"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(ls(&fs.path("root")).is_empty());
    std::fs::write(fs.path("root/writable"), "yes").unwrap();
    assert!(!fs.path("root.rasa-new").exists());
}

/// /nix (or /boot) kept inside the root subvolume would be retired with it: the blank root
/// could not boot. Rollback refuses with the fix.
#[test]
fn rollback_refuses_when_nix_or_boot_live_inside_the_root() {
    let Some(fs) = LoopBtrfs::new("rollback_refuses_nix_in_root", 256) else {
        return;
    };
    fs.standard_layout();
    // An empty mount point is what a separate /nix leaves in the root: fine.
    std::fs::create_dir_all(fs.path("root/nix")).unwrap();
    std::fs::create_dir_all(fs.path("root/boot")).unwrap();
    assert!(fs.rasa(&["rollback", "--dry-run"]).status.success());
    std::fs::create_dir_all(fs.path("root/nix/store/abc-glibc")).unwrap();
    refused_with(&fs, &["rollback"], "/nix is part of the root subvolume");
    std::fs::remove_dir_all(fs.path("root/nix")).unwrap();
    fs.subvolume("root/boot/kernels");
    refused_with(&fs, &["rollback"], "/boot is part of the root subvolume");
}

/// A closed stdout is not a crash: the listing stops quietly (SIGPIPE's status), no panic.
#[test]
fn a_closed_stdout_is_not_a_crash() {
    let Some(fs) = LoopBtrfs::new("closed_stdout", 256) else {
        return;
    };
    fs.standard_layout();
    for _ in 0..3 {
        assert!(fs.rasa(&["rollback"]).status.success());
    }
    for args in [
        &["old-roots", "list"][..],
        &["old-roots", "list", "--json"],
        &["prune", "--dry-run", "--json"],
        &["rollback", "--dry-run"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(common::RASA)
            .args(args)
            .arg("--device")
            .arg(&fs.device)
            .env("NO_COLOR", "1")
            .env("RASA_ROLLBACK_RECORD", fs.record_file())
            .stdout(writer)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(141), "{args:?}: {err}");
    }
}

// ---- booting an old root once ------------------------------------------------------------

/// A layout where one boot happened: `old_roots/<A>` is the root that held the flag (with its
/// nested subvolumes), and the live root, booted since, holds `today`. Returns A's name.
fn one_boot_later(fs: &LoopBtrfs) -> String {
    fs.standard_layout();
    populate_root(fs);
    populate_persist(fs);
    let out = fs.rasa(&["rollback"]);
    assert!(out.status.success(), "{}", stderr(&out));
    sh(&format!(
        "echo today > '{}'",
        fs.path("root/today").display()
    ));
    let kept = old_roots(fs);
    assert_eq!(kept.len(), 1, "{kept:?}");
    kept[0].clone()
}

/// What an old root is and holds (its subvolume UUID, every entry, every file's content), to
/// show that booting from it left it as it was. Directories without their times: the empty
/// directory a snapshot shows in place of a nested subvolume gets a new time each time it is read.
fn old_root_fingerprint(fs: &LoopBtrfs, name: &str) -> String {
    sh(&format!(
        "btrfs subvolume show '{0}' | grep -m1 -w UUID: && cd '{0}' && find . -type d -printf '%p %y %m\\n' | sort \
         && find . ! -type d -printf '%p %y %m %s %T@\\n' | sort && find . -type f -print0 | sort -z | xargs -0 sha256sum",
        fs.path(&format!("old_roots/{name}")).display()
    ))
}

#[test]
fn booting_an_old_root_puts_a_snapshot_in_place_and_keeps_both_roots() {
    let Some(fs) = LoopBtrfs::new("booting_an_old_root", 512) else {
        return;
    };
    let yesterday = one_boot_later(&fs);
    let yesterday_before = old_root_fingerprint(&fs, &yesterday);
    let persist_before = persist_fingerprint(&fs);

    let out = fs.rasa(&["rollback", "--from-old-root", &yesterday]);
    assert!(out.status.success(), "{}", stderr(&out));
    expect![[r#"
        rasa: mounted the top level of <DEVICE> privately
        rasa: created root.rasa-new as a writable snapshot of the old root old_roots/<STAMP>, which stays as it is
        rasa: warning: old_roots/<STAMP> holds 1 nested subvolume(s), which a snapshot does not include: they are empty directories in the root this boot gets, and stay in old_roots/<STAMP>
        rasa: kept the previous root as old_roots/<STAMP>
        rasa: installed the new root
        rasa: new root in place in <N> ms"#]]
    .assert_eq(&redact(&stderr(&out), &fs));

    // The root is yesterday's system, writable, and a copy: writing to it leaves the old root be.
    assert_eq!(
        std::fs::read_to_string(fs.path("root/test_flag")).unwrap(),
        "flag\n"
    );
    assert!(!fs.path("root/today").exists());
    std::fs::write(fs.path("root/test_flag"), "changed").expect("the root is writable");
    assert_eq!(old_root_fingerprint(&fs, &yesterday), yesterday_before);
    // Today's root is kept under a new name, and the old root used is still listed.
    let kept = old_roots(&fs);
    assert_eq!(kept.len(), 2, "{kept:?}");
    let today: Vec<&String> = kept
        .iter()
        .filter(|n| fs.path(&format!("old_roots/{n}/today")).exists())
        .collect();
    assert_eq!(today.len(), 1, "{kept:?}");
    assert_ne!(today[0], &yesterday);
    let listed = fs.rasa(&["old-roots", "list", "--json"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(stdout(&listed).contains(&yesterday), "{}", stdout(&listed));
    assert_eq!(persist_fingerprint(&fs), persist_before);

    // Without a name, the newest old root: the root just retired (today's).
    let out = fs.rasa(&["rollback", "--from-old-root"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(fs.path("root/today").exists());
    assert_eq!(old_roots(&fs).len(), 3);
    // And the next normal boot resets again.
    let out = fs.rasa(&["rollback"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(ls(&fs.path("root")).is_empty());
    assert_eq!(old_root_fingerprint(&fs, &yesterday), yesterday_before);
}

#[test]
fn booting_an_old_root_dry_run_prints_the_plan_and_changes_nothing() {
    let Some(fs) = LoopBtrfs::new("booting_an_old_root_dry_run", 256) else {
        return;
    };
    one_boot_later(&fs);
    let before = top_state(&fs);
    let out = fs.rasa(&["rollback", "--from-old-root", "--dry-run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    expect![[r#"
        dry run: nothing will be changed. rasa rollback would:
          1. snapshot the old root old_roots/<STAMP> (left as it is) as root.rasa-new
          2. move root to old_roots/<STAMP>
          3. rename root.rasa-new to root
        old roots kept now: 1"#]]
    .assert_eq(&redact(stdout(&out).trim_end(), &fs));
    assert_eq!(top_state(&fs), before);
}

#[test]
fn booting_an_unknown_old_root_is_refused_with_the_names_and_changes_nothing() {
    let Some(fs) = LoopBtrfs::new("booting_an_unknown_old_root", 256) else {
        return;
    };
    fs.standard_layout();
    expect![[r#"
        rasa: mounted the top level of <DEVICE> privately
        rasa: error: asked to boot the newest old root, but old_roots on <DEVICE> holds no old roots
        rasa:          fix: there is nothing to go back to: boot normally (without rasa.boot-old-root); at boot, the current root is then used as it is, not reset
        rasa:          nothing was changed"#]]
    .assert_eq(&refusal(&fs, &["rollback", "--from-old-root"]));
    one_boot_later_again(&fs);
    expect![[r#"
        rasa: mounted the top level of <DEVICE> privately
        rasa: error: asked to boot the old root "<STAMP>", but there is no old root of that name in old_roots on <DEVICE>; the old roots, oldest first: <STAMP>
        rasa:          fix: boot with rasa.boot-old-root=<STAMP> (or rasa.boot-old-root alone for the newest), or pass one of those names to --from-old-root; at boot, the current root is then used as it is, not reset
        rasa:          nothing was changed"#]]
    .assert_eq(&refusal(&fs, &["rollback", "--from-old-root", "20990101T000000Z"]));
    // Not a path: a name rasa never made is never looked up outside the old-roots directory.
    expect![[r#"
        rasa: mounted the top level of <DEVICE> privately
        rasa: error: asked to boot the old root "../root-blank", but there is no old root of that name in old_roots on <DEVICE>; the old roots, oldest first: <STAMP>
        rasa:          fix: boot with rasa.boot-old-root=<STAMP> (or rasa.boot-old-root alone for the newest), or pass one of those names to --from-old-root; at boot, the current root is then used as it is, not reset
        rasa:          nothing was changed"#]]
    .assert_eq(&refusal(&fs, &["rollback", "--from-old-root", "../root-blank"]));
}

/// `one_boot_later` on a layout that already exists.
fn one_boot_later_again(fs: &LoopBtrfs) {
    populate_root(fs);
    let out = fs.rasa(&["rollback"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Crash booting an old root right after `step`, then run again in `rerun`'s mode: at every
/// point the next run leaves a root, no stray, today's root kept exactly once, the old root used
/// as it was, and /persist untouched.
#[cfg(feature = "failpoints")]
#[test]
fn crash_after_each_step_of_booting_an_old_root_then_either_mode_completes() {
    for step in ["created-new-root", "moved-old-root", "installed-new-root"] {
        for rerun_from_old_root in [false, true] {
            let Some(fs) = LoopBtrfs::new(&format!("crash_old_root_at_{step}"), 512) else {
                return;
            };
            let yesterday = one_boot_later(&fs);
            let yesterday_before = old_root_fingerprint(&fs, &yesterday);
            let persist_before = persist_fingerprint(&fs);
            let boot_old = ["rollback", "--from-old-root", yesterday.as_str()];

            let crashed = fs.rasa_env(&boot_old, &[("RASA_FAILPOINT", step)]);
            assert!(
                stderr(&crashed).contains(&format!("RASA-FAILPOINT-REACHED {step}")),
                "{}",
                stderr(&crashed)
            );
            assert!(!crashed.status.success());
            let again = if rerun_from_old_root {
                fs.rasa(&boot_old)
            } else {
                fs.rasa(&["rollback"])
            };
            let what = format!("{step}, rerun from old root: {rerun_from_old_root}");
            assert!(again.status.success(), "{what}: {}", stderr(&again));
            assert!(fs.subvolumes().contains(&"root".to_string()), "{what}");
            assert!(!fs.path("root.rasa-new").exists(), "{what}: a stray");
            assert_eq!(
                old_root_fingerprint(&fs, &yesterday),
                yesterday_before,
                "{what}: the old root used changed"
            );
            assert_eq!(persist_fingerprint(&fs), persist_before, "{what}");
            let with_today: Vec<String> = old_roots(&fs)
                .into_iter()
                .filter(|n| fs.path(&format!("old_roots/{n}/today")).exists())
                .collect();
            assert_eq!(with_today.len(), 1, "{what}: {:?}", old_roots(&fs));
            assert!(!fs.path("root/today").exists(), "{what}");
            // The root: the copy of the old root, unless a normal run started over (the snapshot
            // was discarded before the root was retired) or reset after the done boot.
            let expect_blank = !rerun_from_old_root && step != "moved-old-root";
            if expect_blank {
                assert!(ls(&fs.path("root")).is_empty(), "{what}");
            } else {
                assert_eq!(
                    std::fs::read_to_string(fs.path("root/test_flag")).unwrap(),
                    "flag\n",
                    "{what}"
                );
            }
        }
    }
}

/// Asked to boot an old root after a normal run stopped with the root retired and the blank
/// waiting: rasa finishes that run (discarding the only root-to-be would leave a moment with no
/// root), says so, and leaves no stray.
#[cfg(feature = "failpoints")]
#[test]
fn booting_an_old_root_after_an_interrupted_reset_finishes_the_reset_and_says_so() {
    let Some(fs) = LoopBtrfs::new("old_root_after_interrupted_reset", 512) else {
        return;
    };
    let yesterday = one_boot_later(&fs);
    let crashed = fs.rasa_env(&["rollback"], &[("RASA_FAILPOINT", "moved-old-root")]);
    assert!(!crashed.status.success(), "{}", stderr(&crashed));
    let out = fs.rasa(&["rollback", "--from-old-root", &yesterday]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("boot with rasa.boot-old-root again"),
        "{}",
        stderr(&out)
    );
    assert!(ls(&fs.path("root")).is_empty());
    assert!(!fs.path("root.rasa-new").exists());
    assert_eq!(old_roots(&fs).len(), 2);
}

fn read_record(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no record at {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn rollback_records_its_outcome_for_every_result_and_never_follows_a_symlink() {
    let Some(fs) = LoopBtrfs::new("rollback_records_its_outcome", 256) else {
        return;
    };
    fs.standard_layout();
    populate_root(&fs);
    // A directory that is not there yet (as /run/rasa in the initrd) is created.
    let record = fs.dir.path().join("run/rasa/rollback.json");
    let record_arg = record.to_str().unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();

    // A normal run: "reset", with the name the previous root is kept under.
    let out = fs.rasa(&["rollback", "--record-file", record_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let kept = old_roots(&fs);
    assert_eq!(kept.len(), 1);
    let json = read_record(&record);
    assert_eq!(json["result"], "reset", "{json}");
    assert_eq!(json["oldRoot"], kept[0].as_str(), "{json}");
    assert!(json["durationMs"].as_u64().is_some(), "{json}");
    let time = json["time"].as_u64().unwrap();
    assert!(time >= before && time <= before + 120, "{json}");
    assert!(
        json["message"].as_str().unwrap().contains(&kept[0]),
        "{json}"
    );
    let mode = |path: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::symlink_metadata(path).unwrap().permissions(),
        ) & 0o777
    };
    assert_eq!(mode(&record), 0o644);
    // The directory it made is root's only, as `rasa watch` makes /run/rasa.
    assert_eq!(mode(record.parent().unwrap()), 0o700);

    // A refusal (no such blank) is recorded too, with its message; the exit code is unchanged.
    // What stands at the record's name is a symlink to a file elsewhere: it is replaced, and
    // the file it points to is not written through.
    let elsewhere = fs.dir.path().join("elsewhere");
    std::fs::write(&elsewhere, "untouched").unwrap();
    std::fs::remove_file(&record).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &record).unwrap();
    let out = fs.rasa(&[
        "rollback",
        "--blank",
        "no-such-blank",
        "--record-file",
        record_arg,
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "untouched");
    assert!(std::fs::symlink_metadata(&record).unwrap().is_file());
    let json = read_record(&record);
    assert_eq!(json["result"], "refused", "{json}");
    assert_eq!(json["oldRoot"], serde_json::Value::Null, "{json}");
    let message = json["message"].as_str().unwrap();
    assert!(
        message.contains("\"no-such-blank\" does not exist") && message.contains("fix:"),
        "{json}"
    );
    assert_eq!(
        ls(record.parent().unwrap()),
        ["rollback.json"],
        "no temporary left behind"
    );

    // A failure part-way (the top level immutable, so the new root cannot be made) is recorded
    // as "failed", with the error; the exit code is still 1.
    sh(&format!("chattr +i '{}'", fs.top.display()));
    let out = fs.rasa(&["rollback", "--record-file", record_arg]);
    sh(&format!("chattr -i '{}'", fs.top.display()));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let json = read_record(&record);
    assert_eq!(json["result"], "failed", "{json}");
    assert!(
        json["message"].as_str().unwrap().contains("root.rasa-new"),
        "{json}"
    );

    // A dry run changes nothing and records nothing: the record still says what the last real
    // run did.
    let out = fs.rasa(&["rollback", "--dry-run", "--record-file", record_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read_record(&record)["result"], "failed");

    // A record that cannot be written is a warning, never a failed rollback.
    let blocked = fs.dir.path().join("not-a-dir");
    std::fs::write(&blocked, "").unwrap();
    let out = fs.rasa(&[
        "rollback",
        "--record-file",
        blocked.join("rollback.json").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("could not record the outcome"),
        "{}",
        stderr(&out)
    );
    assert_eq!(old_roots(&fs).len(), 2);

    // Without the flag, the environment's default (set by the fixture) is used.
    let out = fs.rasa(&["rollback"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json = read_record(&fs.record_file());
    assert_eq!(json["result"], "reset", "{json}");

    // Booting an old root: "booted-old-root", with the name today's root is kept under.
    let before_boot = old_roots(&fs);
    let out = fs.rasa(&["rollback", "--from-old-root", "--record-file", record_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let retired: Vec<String> = old_roots(&fs)
        .into_iter()
        .filter(|name| !before_boot.contains(name))
        .collect();
    assert_eq!(retired.len(), 1);
    let json = read_record(&record);
    assert_eq!(json["result"], "booted-old-root", "{json}");
    assert_eq!(json["oldRoot"], retired[0].as_str(), "{json}");
}
