//! The copy engine under `rasa migrate`, on real btrfs (and ext4 for byte copies): permissions
//! never wider than the source at any moment (issue 12, item 12), files that change while they
//! are copied (item 14), and reruns that compare data extents only and trust shared extents
//! (item 18). Access is read back from the disk (mode and ACL xattrs) and evaluated by the
//! kernel's rules in `common::access_of`; bytes read are counted by the kernel (`rchar`).

mod common;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};

use common::{quoted, run_counting_reads, run_stopping_at, sh, stderr, stdout, LiveRoot};

const OWNER: u32 = 1001;
/// Granted read access by the source's ACLs.
const FRIEND: u32 = 1003;
/// Granted everything by the storage directory's default ACL, and nothing by the source.
const OUTSIDER: u32 = 1002;

const APP_ENTRY: &str = r#"{"storageRoot": "/persist", "path": "/srv/app", "kind": "directory", "user": "root", "group": "root", "mode": "0755"}"#;

fn failpoints(test: &str) -> bool {
    if cfg!(feature = "failpoints") {
        true
    } else {
        common::skip::<()>(test, "needs --features failpoints");
        false
    }
}

/// `/srv/app`, owned by OWNER, with files whose ACLs deny the owning group what the mode bits
/// alone would grant it, a directory with a default ACL, a fifo with an ACL, and plain files.
/// The storage directory `/persist/srv` gets a default ACL granting OUTSIDER everything.
fn build_acl_tree(live: &Path) {
    let app = live.join("srv/app");
    std::fs::create_dir_all(app.join("sub")).unwrap();
    let file = |rel: &str, mode: u32| {
        let p = app.join(rel);
        std::fs::write(&p, format!("content of {rel}\n").repeat(1000)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    file("plain", 0o640);
    file("denied-group", 0o640);
    file("sub/inner", 0o600);
    file("sub/shared", 0o640);
    sh(&format!("mkfifo -m 0640 {}", quoted(&app.join("fifo"))));
    std::os::unix::fs::symlink("plain", app.join("link")).unwrap();
    sh(&format!("chown -hR {OWNER}:{OWNER} {}", quoted(&app)));
    for dir in [&app, &app.join("sub")] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    }
    // The owning group may not read these, FRIEND may: mode 0640 with the mask r--.
    for rel in ["denied-group", "fifo", "sub/shared"] {
        sh(&format!(
            "setfacl -m g::---,u:{FRIEND}:r-- {}",
            quoted(&app.join(rel))
        ));
    }
    sh(&format!(
        "setfacl -m g::---,u:{FRIEND}:r-x -d -m u::rwx,g::---,o::---,u:{FRIEND}:r-x {}",
        quoted(&app.join("sub"))
    ));
    let storage = live.join("persist/srv");
    std::fs::create_dir_all(&storage).unwrap();
    sh(&format!(
        "setfacl -m u:{OUTSIDER}:rwx -d -m u::rwx,g::rwx,o::rwx,u:{OUTSIDER}:rwx,g:{OUTSIDER}:rwx {}",
        quoted(&storage)
    ));
}

/// Every user and group worth asking, for both files.
fn principals(a: &Path, b: &Path) -> Vec<(u32, Vec<u32>)> {
    let mut all = common::principals(a);
    all.extend(common::principals(b));
    all.push((OUTSIDER, vec![OUTSIDER]));
    all.push((OWNER, vec![OWNER]));
    all.push((4242, vec![OWNER]));
    all.push((FRIEND, vec![FRIEND]));
    all.retain(|(uid, _)| *uid != 0);
    all
}

/// Nobody may do anything with any file of `copy` that they may not do with its source.
fn assert_never_wider(source: &Path, copy: &Path, when: &str) -> usize {
    let mut seen = 0;
    for rel in common::tree_paths(copy) {
        let (c, s) = (copy.join(&rel), source.join(&rel));
        if std::fs::symlink_metadata(&c)
            .unwrap()
            .file_type()
            .is_symlink()
        {
            continue;
        }
        for (uid, gids) in principals(&s, &c) {
            let (on_copy, on_source) = (
                common::access_of(&c, uid, &gids),
                common::access_of(&s, uid, &gids),
            );
            assert_eq!(
                on_copy & !on_source,
                0,
                "{when}: uid {uid} groups {gids:?} may {on_copy:o} on the copy of {rel:?}, \
                 only {on_source:o} on its source\n{}{}",
                sh(&format!("getfacl -p {} 2>&1", quoted(&c))),
                sh(&format!("getfacl -p {} 2>&1", quoted(&s)))
            );
        }
        seen += 1;
    }
    seen
}

/// The copy carries exactly the source's mode and ACLs, access and default, and none inherited
/// from where it was stored.
fn assert_same_permissions(source: &Path, copy: &Path) {
    for rel in common::tree_paths(source) {
        let (s, c) = (source.join(&rel), copy.join(&rel));
        let (sm, cm) = (
            std::fs::symlink_metadata(&s).unwrap(),
            std::fs::symlink_metadata(&c).unwrap(),
        );
        assert_eq!(sm.mode(), cm.mode(), "{rel:?}: mode");
        assert_eq!((sm.uid(), sm.gid()), (cm.uid(), cm.gid()), "{rel:?}: owner");
        if sm.file_type().is_symlink() {
            continue;
        }
        for name in ["system.posix_acl_access", "system.posix_acl_default"] {
            assert_eq!(
                xattr::get(&s, name).unwrap(),
                xattr::get(&c, name).unwrap(),
                "{rel:?}: {name}\n{}",
                sh(&format!("getfacl -p {} 2>&1", quoted(&c)))
            );
        }
    }
    assert_never_wider(source, copy, "the finished copy");
}

fn inherited_acl_is_not_kept(test: &str, cross_fs: bool) {
    let Some(lr) = LiveRoot::new(test, cross_fs) else {
        return;
    };
    build_acl_tree(&lr.live);
    let manifest = lr.manifest(APP_ENTRY);
    let out = lr.migrate(&manifest, &["--apply"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_same_permissions(&lr.live.join("srv/app"), &lr.live.join("persist/srv/app"));
    // And rasa's own comparison agrees.
    let again = lr.migrate(&manifest, &[]).output().unwrap();
    assert!(
        stdout(&again).contains("identical                /srv/app"),
        "{}",
        stdout(&again)
    );
}

/// A default ACL on the storage directory must not reach the copy: the copy ends with exactly
/// the source's ACLs (none where the source has none).
#[test]
fn default_acl_of_the_storage_directory_is_not_inherited() {
    inherited_acl_is_not_kept(
        "default_acl_of_the_storage_directory_is_not_inherited",
        false,
    );
}

#[test]
fn default_acl_of_the_storage_directory_is_not_inherited_on_ext4() {
    inherited_acl_is_not_kept(
        "default_acl_of_the_storage_directory_is_not_inherited_on_ext4",
        true,
    );
}

/// Every step of a file's copy at which the copy can be seen half-made.
const STEPS: &[&str] = &[
    "copy-created",
    "copy-data-extent",
    "copy-owner-set",
    "copy-mode-set",
    "copy-acl-set",
    "copy-xattrs-set",
    "migrate-copied-file",
];

/// Stop the copy at every step of every file and check what is on disk then: no user or group
/// may do with any file of the copy anything the source does not let them.
fn never_wider_mid_copy(test: &str, cross_fs: bool) {
    if !failpoints(test) {
        return;
    }
    let Some(lr) = LiveRoot::new(test, cross_fs) else {
        return;
    };
    build_acl_tree(&lr.live);
    let manifest = lr.manifest(APP_ENTRY);
    let source = lr.live.join("srv/app");
    let temp = lr.live.join("persist/srv/.app.rasa-migrate");
    let mut total = 0;
    for step in STEPS {
        sh(&format!(
            "rm -rf {}",
            quoted(&lr.live.join("persist/srv/app"))
        ));
        let (status, text, stops) =
            run_stopping_at(lr.migrate(&manifest, &["--apply"]), step, |_| {
                assert_never_wider(&source, &temp, step);
            });
        assert!(status.success(), "{step}: {text}");
        eprintln!("{step}: stopped {stops} times");
        total += stops;
    }
    assert!(total > 20, "the copy was looked at mid-way ({total} stops)");
    assert_same_permissions(&source, &lr.live.join("persist/srv/app"));
}

#[test]
fn permissions_never_wider_at_any_step_of_a_reflink_copy() {
    never_wider_mid_copy(
        "permissions_never_wider_at_any_step_of_a_reflink_copy",
        false,
    );
}

#[test]
fn permissions_never_wider_at_any_step_of_a_byte_copy() {
    never_wider_mid_copy("permissions_never_wider_at_any_step_of_a_byte_copy", true);
}

const LOG_ENTRY: &str = r#"{"storageRoot": "/persist", "path": "/srv/log/app.log", "kind": "file", "user": "root", "group": "root", "mode": "0755"}"#;

/// A log file of two data extents with a hole between them (so the byte copy stops between
/// them), stored on ext4 (byte copies).
fn log_fixture(test: &str) -> Option<(LiveRoot, PathBuf, PathBuf)> {
    if !failpoints(test) {
        return None;
    }
    let lr = LiveRoot::new(test, true)?;
    let log = lr.live.join("srv/log/app.log");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    let f = std::fs::File::create(&log).unwrap();
    f.write_all_at(&[b'A'; 1 << 20], 0).unwrap();
    f.write_all_at(&[b'B'; 1 << 20], 2 << 20).unwrap();
    let manifest = lr.manifest(LOG_ENTRY);
    Some((lr, manifest, log))
}

/// `copytruncate` log rotation between two chunks of the copy: the copy must be a version the
/// file really had (here the one after the rotation), never the old length with a zero tail.
#[test]
fn file_truncated_while_copied_is_copied_again() {
    let Some((lr, manifest, log)) = log_fixture("file_truncated_while_copied_is_copied_again")
    else {
        return;
    };
    let (status, text, stops, json) = common::run_stopping_at_with_stdout(
        lr.migrate(&manifest, &["--apply", "--json"]),
        "copy-data-extent",
        |n| {
            if n == 0 {
                // What logrotate's copytruncate does, then the service logs on.
                let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
                f.set_len(0).unwrap();
                f.write_all_at(b"after rotation\n", 0).unwrap();
            }
        },
    );
    assert!(status.success(), "{text}");
    assert!(stops >= 2, "copied again after the change ({stops} stops)");
    let stored = std::fs::read(lr.live.join("persist/srv/log/app.log")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&stored[..stored.len().min(64)]),
        "after rotation\n",
        "stored {} bytes",
        stored.len()
    );
    assert_eq!(stored, std::fs::read(&log).unwrap());
    // And the result says so.
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        json["entries"][0]["result"]["copiedAgain"],
        serde_json::json!(["app.log"])
    );
}

/// A file that never holds still is reported after a bounded number of tries, and nothing is
/// stored for it.
#[test]
fn file_that_keeps_changing_is_reported_not_stored() {
    let Some((lr, manifest, log)) = log_fixture("file_that_keeps_changing_is_reported_not_stored")
    else {
        return;
    };
    let (status, text, stops) = run_stopping_at(
        lr.migrate(&manifest, &["--apply"]),
        "copy-data-extent",
        |n| {
            let f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
            std::io::Write::write_all(&mut &f, format!("line {n}\n").as_bytes()).unwrap();
        },
    );
    assert!(!status.success(), "{text}");
    assert!(text.contains("changed while it was copied"), "{text}");
    assert!(stops < 20, "a bounded number of tries ({stops} stops)");
    assert!(!lr.live.join("persist/srv/log/app.log").exists());
}

/// Deterministic incompressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn file_entry(path: &str) -> String {
    format!(
        r#"{{"storageRoot": "/persist", "path": "{path}", "kind": "file", "user": "root", "group": "root", "mode": "0755"}}"#
    )
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A 256 GiB VM image with 3 MiB of data, stored on another filesystem (no shared extents): the
/// rerun's dry run compares the data and skips the holes, so it reads a few MiB, not 512 GiB.
#[test]
fn rerun_on_a_sparse_256_gib_file_reads_only_its_data() {
    let Some(lr) = LiveRoot::new("rerun_on_a_sparse_256_gib_file_reads_only_its_data", true) else {
        return;
    };
    let image = lr.live.join("srv/vm/disk.img");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(256 * GIB).unwrap();
    for (i, at) in [0, 128 * GIB, 256 * GIB - MIB].into_iter().enumerate() {
        f.write_all_at(&noise(MIB as usize, i as u64), at).unwrap();
    }
    drop(f);
    let manifest = lr.manifest(&file_entry("/srv/vm/disk.img"));
    let applied = lr.migrate(&manifest, &["--apply"]).output().unwrap();
    assert_eq!(applied.status.code(), Some(0), "{}", stderr(&applied));

    let (rerun, read) = run_counting_reads(lr.migrate(&manifest, &[]));
    assert_eq!(rerun.status.code(), Some(0), "{}", stderr(&rerun));
    assert!(
        stdout(&rerun).contains("identical                /srv/vm/disk.img"),
        "{}",
        stdout(&rerun)
    );
    eprintln!("the rerun read {read} bytes");
    assert!(
        read < 16 * MIB,
        "the rerun read {read} bytes for 6 MiB of data"
    );
}

/// A reflinked copy shares every extent with its source: judged identical without reading them.
#[test]
fn rerun_on_a_reflinked_copy_reads_nothing() {
    let Some(lr) = LiveRoot::new("rerun_on_a_reflinked_copy_reads_nothing", false) else {
        return;
    };
    let blob = lr.live.join("srv/data/blob");
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::write(&blob, noise(32 * MIB as usize, 7)).unwrap();
    let manifest = lr.manifest(&file_entry("/srv/data/blob"));
    let applied = lr
        .migrate(&manifest, &["--apply", "--json"])
        .output()
        .unwrap();
    assert_eq!(applied.status.code(), Some(0), "{}", stderr(&applied));
    let json: serde_json::Value = serde_json::from_slice(&applied.stdout).unwrap();
    assert_eq!(json["entries"][0]["result"]["reflinkedFiles"], 1);

    let (rerun, read) = run_counting_reads(lr.migrate(&manifest, &[]));
    assert_eq!(rerun.status.code(), Some(0), "{}", stderr(&rerun));
    assert!(
        stdout(&rerun).contains("identical                /srv/data/blob"),
        "{}",
        stdout(&rerun)
    );
    eprintln!("the rerun read {read} bytes");
    assert!(
        read < 4 * MIB,
        "the rerun read {read} bytes of 32 MiB shared"
    );
}

/// One byte changed in the middle of a data extent that has holes on both sides, or in a hole:
/// different, whether the extent was shared by reflink before the change or copied byte by byte.
/// With `compressed`, the btrfs stores the data compressed: extents whose address does not pin
/// their bytes, which must be read.
fn one_byte_differs(test: &str, cross_fs: bool, compressed: bool) {
    let Some(lr) = LiveRoot::new(test, cross_fs) else {
        return;
    };
    let data = if compressed {
        sh(&format!(
            "mount -o remount,compress-force=zstd {}",
            quoted(&lr.fs.top)
        ));
        b"compressible ".repeat(MIB as usize / 13 + 1)[..MIB as usize].to_vec()
    } else {
        noise(MIB as usize, 3)
    };
    let dir = lr.live.join("srv/img");
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["in-extent", "in-hole", "untouched"] {
        let f = std::fs::File::create(dir.join(name)).unwrap();
        f.set_len(8 * MIB).unwrap();
        f.write_all_at(&data, MIB).unwrap();
        f.sync_all().unwrap();
    }
    if compressed {
        let map = sh(&format!("filefrag -v {}", quoted(&dir.join("untouched"))));
        assert!(map.contains("encoded"), "stored compressed: {map}");
    }
    let manifest = lr.manifest(&format!(
        "{}, {}, {}",
        file_entry("/srv/img/in-extent"),
        file_entry("/srv/img/in-hole"),
        file_entry("/srv/img/untouched")
    ));
    let applied = lr.migrate(&manifest, &["--apply"]).output().unwrap();
    assert_eq!(applied.status.code(), Some(0), "{}", stderr(&applied));
    for (name, at) in [("in-extent", MIB + MIB / 2), ("in-hole", 5 * MIB)] {
        let stored = lr.live.join("persist/srv/img").join(name);
        let when = std::fs::metadata(&stored).unwrap().modified().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&stored)
            .unwrap();
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, at).unwrap();
        f.write_all_at(&[byte[0] ^ 0x5a], at).unwrap();
        // Same size and mtime: only the content tells them apart.
        f.set_modified(when).unwrap();
    }
    let rerun = lr.migrate(&manifest, &[]).output().unwrap();
    let text = stdout(&rerun);
    for name in ["in-extent", "in-hole"] {
        assert!(
            text.contains(&format!("conflict                 /srv/img/{name}")),
            "{name}: {text}"
        );
    }
    assert_eq!(text.matches("content differs").count(), 2, "{text}");
    assert!(
        text.contains("identical                /srv/img/untouched"),
        "{text}"
    );
}

#[test]
fn one_byte_changed_in_a_shared_extent_is_a_difference() {
    one_byte_differs(
        "one_byte_changed_in_a_shared_extent_is_a_difference",
        false,
        false,
    );
}

#[test]
fn one_byte_changed_in_a_compressed_shared_extent_is_a_difference() {
    one_byte_differs(
        "one_byte_changed_in_a_compressed_shared_extent_is_a_difference",
        false,
        true,
    );
}

#[test]
fn one_byte_changed_in_a_byte_copy_is_a_difference() {
    one_byte_differs(
        "one_byte_changed_in_a_byte_copy_is_a_difference",
        true,
        false,
    );
}

/// A compressed extent's address is that of the whole extent, whatever part of it a file uses:
/// a stored file that uses the same compressed extent shifted by 4 KiB has the same addresses as
/// its source at the same offsets, and different bytes. It must be read, and found different.
#[test]
fn a_shifted_reference_into_a_compressed_extent_is_read() {
    let Some(lr) = LiveRoot::new(
        "a_shifted_reference_into_a_compressed_extent_is_read",
        false,
    ) else {
        return;
    };
    sh(&format!(
        "mount -o remount,compress-force=zstd {}",
        quoted(&lr.fs.top)
    ));
    const K: u64 = 1024;
    let source = lr.live.join("srv/img/disk");
    std::fs::create_dir_all(source.parent().unwrap()).unwrap();
    let text: String = (0..20_000).map(|i| format!("line {i:08}\n")).collect();
    std::fs::write(&source, &text.as_bytes()[..128 * K as usize]).unwrap();
    sh(&format!("sync {}", quoted(&source)));
    let stored = lr.live.join("persist/srv/img/disk");
    std::fs::create_dir_all(stored.parent().unwrap()).unwrap();
    {
        let (src, dst) = (
            std::fs::File::open(&source).unwrap(),
            std::fs::File::create(&stored).unwrap(),
        );
        // The source shifted by 4 KiB, then its own last 4 KiB: clones, not copies.
        for (from, to, len) in [(4 * K, 0, 124 * K), (124 * K, 124 * K, 4 * K)] {
            let (mut off_in, mut off_out) = (from as i64, to as i64);
            let n = nix::fcntl::copy_file_range(
                &src,
                Some(&mut off_in),
                &dst,
                Some(&mut off_out),
                len as usize,
            )
            .unwrap();
            assert_eq!(n as u64, len);
        }
        dst.sync_all().unwrap();
        dst.set_modified(std::fs::metadata(&source).unwrap().modified().unwrap())
            .unwrap();
    }
    let map = sh(&format!("filefrag -v {}", quoted(&stored)));
    assert!(map.contains("encoded") && map.contains("shared"), "{map}");
    let manifest = lr.manifest(&file_entry("/srv/img/disk"));
    let rerun = lr.migrate(&manifest, &[]).output().unwrap();
    assert!(
        stdout(&rerun).contains("content differs"),
        "{}{}",
        stdout(&rerun),
        stderr(&rerun)
    );
}

/// The directories migrate creates itself (an entry's parents, its record directory) get the
/// manifest's owner and mode and nothing else, whatever default ACL the storage root has.
#[test]
fn new_parent_directories_do_not_inherit_the_storage_default_acl() {
    let Some(lr) = LiveRoot::new(
        "new_parent_directories_do_not_inherit_the_storage_default_acl",
        false,
    ) else {
        return;
    };
    let file = lr.live.join("var/lib/app/state");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, b"state\n").unwrap();
    sh(&format!(
        "setfacl -d -m u::rwx,g::rwx,o::rwx,u:{OUTSIDER}:rwx {}",
        quoted(&lr.live.join("persist"))
    ));
    let manifest = lr.manifest(&file_entry("/var/lib/app/state"));
    let out = lr.migrate(&manifest, &["--apply"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for rel in [
        "var",
        "var/lib",
        "var/lib/app",
        "var/lib/app/state",
        ".rasa",
    ] {
        let path = lr.live.join("persist").join(rel);
        for name in ["system.posix_acl_access", "system.posix_acl_default"] {
            assert_eq!(
                xattr::get(&path, name).unwrap(),
                None,
                "{rel}: {name}\n{}",
                sh(&format!("getfacl -p {} 2>&1", quoted(&path)))
            );
        }
        assert_eq!(
            common::access_of(&path, OUTSIDER, &[OUTSIDER]) & 0o2,
            0,
            "{rel}"
        );
    }
}

/// `cmd` run under a limit of `limit` open files, soft and hard, so that rasa cannot raise it.
fn with_file_limit(cmd: &Command, limit: u32) -> Command {
    let mut limited = Command::new("prlimit");
    limited
        .arg(format!("--nofile={limit}:{limit}"))
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => limited.env(key, value),
            None => limited.env_remove(key),
        };
    }
    limited
}

const DEPTH: usize = 2000;
/// The name of each level: 2,000 of them make a path of 10,000 bytes, over PATH_MAX (4096).
const LEVEL: &str = "dir0";

/// Make `parent/name/dir0/dir0/...` (`DEPTH` levels below `name`) and return the top and the
/// bottom directory, open. Built through descriptors: the path is longer than PATH_MAX.
fn deep_tree(parent: &Path, name: &str) -> (OwnedFd, OwnedFd) {
    std::fs::create_dir_all(parent.join(name)).unwrap();
    let top: OwnedFd = std::fs::File::open(parent.join(name)).unwrap().into();
    let mut dir = nix::unistd::dup(top.as_fd()).unwrap();
    for _ in 0..DEPTH {
        nix::sys::stat::mkdirat(dir.as_fd(), LEVEL, Mode::from_bits_truncate(0o755)).unwrap();
        dir = open_below(dir.as_fd(), LEVEL);
    }
    (top, dir)
}

fn open_below(dir: BorrowedFd<'_>, name: &str) -> OwnedFd {
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .unwrap()
}

/// The bottom of a tree made by `deep_tree`.
fn bottom_of(parent: &Path, name: &str) -> OwnedFd {
    let mut dir: OwnedFd = std::fs::File::open(parent.join(name)).unwrap().into();
    for _ in 0..DEPTH {
        dir = open_below(dir.as_fd(), LEVEL);
    }
    dir
}

/// `/srv/deep`: 2,000 levels with, at the bottom, a file `f`, a symlink, a fifo and a second
/// name of the file `linked` at the top; and a manifest for it.
fn deep_fixture(test: &str) -> Option<(LiveRoot, PathBuf)> {
    let lr = LiveRoot::new(test, false)?;
    let srv = lr.live.join("srv");
    let (top, bottom) = deep_tree(&srv, "deep");
    std::fs::write(srv.join("deep/linked"), b"one inode, two names").unwrap();
    nix::unistd::linkat(
        top.as_fd(),
        "linked",
        bottom.as_fd(),
        "linked-too",
        AtFlags::empty(),
    )
    .unwrap();
    let file = nix::fcntl::openat(
        bottom.as_fd(),
        "f",
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    nix::unistd::write(&file, b"bottom\n").unwrap();
    nix::unistd::symlinkat("f", bottom.as_fd(), "link").unwrap();
    nix::sys::stat::mknodat(
        bottom.as_fd(),
        "fifo",
        SFlag::S_IFIFO,
        Mode::from_bits_truncate(0o600),
        0,
    )
    .unwrap();
    drop((top, bottom, file));
    let manifest = lr.manifest(APP_ENTRY.replace("/srv/app", "/srv/deep").as_str());
    Some((lr, manifest))
}

/// Item 17: a 2,000-level tree (a file, a symlink, a fifo and a hard link to a file 2,000
/// levels up at the bottom) is copied, and then compared, by a rasa that may open 64 files at
/// most, and a leftover 2,000-level temporary copy of an interrupted run is removed first. A
/// walk holding one directory per level runs out of descriptors after some 30 levels. The top
/// name of the hard link is met after the bottom one (btrfs lists in creation order), so it is
/// linked to a first copy whose path is longer than PATH_MAX.
#[test]
fn a_2000_level_tree_copies_and_compares_under_a_limit_of_64_open_files() {
    let Some((lr, manifest)) =
        deep_fixture("a_2000_level_tree_copies_and_compares_under_a_limit_of_64_open_files")
    else {
        return;
    };
    // What an interrupted run leaves: a partial copy under the temporary name.
    let storage = lr.live.join("persist/srv");
    drop(deep_tree(&storage, ".deep.rasa-migrate"));

    let applied = with_file_limit(&lr.migrate(&manifest, &["--apply"]), 64)
        .output()
        .unwrap();
    assert_eq!(applied.status.code(), Some(0), "{}", stderr(&applied));
    assert!(!storage.join(".deep.rasa-migrate").exists());
    let copied_bottom = bottom_of(&storage, "deep");
    let read = |name: &str| {
        let fd = nix::fcntl::openat(
            copied_bottom.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        let mut content = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut content).unwrap();
        content
    };
    assert_eq!(read("f"), "bottom\n");
    assert_eq!(read("linked-too"), "one inode, two names");
    let stat = |name: &str| {
        nix::sys::stat::fstatat(copied_bottom.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW).unwrap()
    };
    assert_eq!(
        stat("linked-too").st_ino,
        std::fs::metadata(storage.join("deep/linked"))
            .unwrap()
            .ino(),
        "the hard link is one inode in the copy too"
    );
    assert_eq!(stat("fifo").st_mode & 0o170000, 0o010000);
    assert_eq!(
        nix::fcntl::readlinkat(copied_bottom.as_fd(), "link").unwrap(),
        "f"
    );

    let again = with_file_limit(&lr.migrate(&manifest, &[]), 64)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert!(stdout(&again).contains("identical"), "{}", stdout(&again));
}

/// `deep_fixture`, migrated once, for a rerun to compare (with failpoints, to stop it midway).
fn deep_fixture_migrated(test: &str) -> Option<(LiveRoot, PathBuf)> {
    if !failpoints(test) {
        return None;
    }
    let (lr, manifest) = deep_fixture(test)?;
    let applied = lr.migrate(&manifest, &["--apply"]).output().unwrap();
    assert_eq!(applied.status.code(), Some(0), "{}", stderr(&applied));
    Some((lr, manifest))
}

/// Item 17, comparing: a file at the bottom of a 2,000-level tree replaced while a rerun compares
/// it is an error that names its path once (not once per level), with what to do.
#[test]
fn an_error_comparing_a_2000_level_tree_names_its_path_once() {
    let test = "an_error_comparing_a_2000_level_tree_names_its_path_once";
    let Some((lr, manifest)) = deep_fixture_migrated(test) else {
        return;
    };
    // Names are compared in order, so the first regular file compared is the bottom `f`.
    let (status, err, stops) = run_stopping_at(
        lr.migrate(&manifest, &[]),
        "compare-before-opening-file",
        |stop| {
            if stop == 0 {
                let bottom = bottom_of(&lr.live.join("srv"), "deep");
                nix::unistd::unlinkat(bottom.as_fd(), "f", nix::unistd::UnlinkatFlags::NoRemoveDir)
                    .unwrap();
                nix::sys::stat::mknodat(
                    bottom.as_fd(),
                    "f",
                    SFlag::S_IFIFO,
                    Mode::from_bits_truncate(0o600),
                    0,
                )
                .unwrap();
            }
        },
    );
    assert!(stops >= 1);
    assert_eq!(status.code(), Some(1), "{err}");
    let path = format!("deep/{}f", format!("{LEVEL}/").repeat(DEPTH));
    assert!(
        err.contains(&format!(
            "comparing {path}: it was replaced while being compared"
        )),
        "{}",
        &err[..3000.min(err.len())]
    );
    assert_eq!(err.matches(LEVEL).count(), DEPTH, "the path is named once");
}

/// The comparison walks the live tree and its copy in step and checks, going back up, that each
/// side's parent is the directory it came down from: a directory of the copy (the second tree)
/// moved away while the comparison is 2,000 levels below it stops the comparison with an error
/// that names it once, instead of comparing somewhere else.
#[test]
fn a_copy_moved_while_it_is_compared_stops_the_comparison() {
    let test = "a_copy_moved_while_it_is_compared_stops_the_comparison";
    let Some((lr, manifest)) = deep_fixture_migrated(test) else {
        return;
    };
    let storage = lr.live.join("persist/srv");
    // Names are compared in order, so the first regular file compared is the bottom `f`.
    let (status, err, stops) = run_stopping_at(
        lr.migrate(&manifest, &[]),
        "compare-before-opening-file",
        |stop| {
            if stop == 0 {
                std::fs::create_dir(storage.join("elsewhere")).unwrap();
                std::fs::rename(
                    storage.join(format!("deep/{LEVEL}")),
                    storage.join(format!("elsewhere/{LEVEL}")),
                )
                .unwrap();
            }
        },
    );
    assert!(stops >= 1);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "comparing deep/{LEVEL}: it was moved while rasa went through it"
        )),
        "{}",
        &err[..3000.min(err.len())]
    );
    assert_eq!(err.matches(LEVEL).count(), 1, "the path is named once");
}
