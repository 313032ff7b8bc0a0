//! Fidelity of a copy, read back without the copy engine (std's metadata, `getfattr`,
//! `lsattr`): the tree that exercises every attribute a faithful copy keeps, and the
//! comparison. Shared by `rasa migrate`'s and `rasa restore`'s tests, which use one engine.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{quoted as q, sh};

pub const NOBODY: u32 = 65534;

/// The tree every requirement of the issue asks for, under `<live>/srv/data`, plus
/// `/etc/machine-id` (a file entry) and `/home/nobody` (a non-root private directory).
pub fn build_live_tree(live: &Path) {
    let d = live.join("srv/data");
    std::fs::create_dir_all(&d).unwrap();
    let w = |name: &str, content: &[u8], mode: u32, uid: u32| {
        let p = d.join(name);
        std::fs::write(&p, content).unwrap();
        std::os::unix::fs::chown(&p, Some(uid), Some(uid)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    w("root-secret", b"root only\n", 0o600, 0);
    w("nobody-secret", b"nobody only\n", 0o600, NOBODY);
    w("setuid-tool", b"#!/bin/sh\n", 0o4755, 0);
    std::fs::create_dir(d.join("root-private")).unwrap();
    std::fs::set_permissions(
        d.join("root-private"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    std::fs::write(d.join("root-private/inner"), b"inner").unwrap();
    std::fs::create_dir(d.join("nobody-private")).unwrap();
    std::os::unix::fs::chown(d.join("nobody-private"), Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::set_permissions(
        d.join("nobody-private"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let cap = w("ping-like", b"\x7fELF not really", 0o755, 0);
    sh(&format!("setcap cap_net_raw+ep {}", q(&cap)));
    let x = w("with-xattrs", b"x", 0o644, 0);
    sh(&format!("setfattr -n user.rasa.test -v hello {}", q(&x)));
    sh(&format!("setfattr -n trusted.rasa -v secret {}", q(&x)));
    let acl = w("with-acl", b"acl", 0o640, 0);
    sh(&format!("setfacl -m u:nobody:r {}", q(&acl)));
    std::fs::create_dir(d.join("acl-dir")).unwrap();
    sh(&format!(
        "setfacl -d -m u:nobody:rx {0} && setfacl -m u:nobody:rx {0}",
        q(&d.join("acl-dir"))
    ));
    let linked = w("hard-a", b"shared inode", 0o644, 0);
    std::fs::hard_link(&linked, d.join("hard-b")).unwrap();
    std::fs::hard_link(&linked, d.join("root-private/hard-c")).unwrap();
    let sparse = d.join("sparse");
    sh(&format!(
        "truncate -s 64M {0} && printf middle | dd of={0} bs=1 seek=20000000 conv=notrunc status=none",
        q(&sparse)
    ));
    let nocow = d.join("nocow");
    sh(&format!(
        "touch {0} && chattr +C {0} && head -c 300000 /dev/urandom > {0}",
        q(&nocow)
    ));
    std::os::unix::fs::symlink(
        "/nix/store/00000000000000000000000000000000-hello/bin/hello",
        d.join("to-store"),
    )
    .unwrap();
    std::os::unix::fs::symlink("/etc/shadow", d.join("escape")).unwrap();
    std::os::unix::fs::symlink("../../../../../../etc", d.join("relative-escape")).unwrap();
    nix::unistd::mkfifo(
        &d.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o620),
    )
    .unwrap();
    sh(&format!("mknod {} c 1 3", q(&d.join("null-device"))));
    let listener = std::os::unix::net::UnixListener::bind(d.join("socket")).unwrap();
    drop(listener);
    std::fs::write(d.join("name with spaces"), b"spaces").unwrap();
    std::fs::write(d.join("name\nwith\nnewlines"), b"newlines").unwrap();
    std::fs::write(d.join(OsStr::from_bytes(b"latin1-\xe9t\xe9")), b"not utf-8").unwrap();
    std::fs::create_dir(d.join(OsStr::from_bytes(b"dir-\xff"))).unwrap();
    std::fs::write(d.join(OsStr::from_bytes(b"dir-\xff/file \n\xfe")), b"deep").unwrap();
    // Distinct, old timestamps, so a copy that forgets them cannot pass by being fast.
    sh(&format!(
        "find {} -depth -exec touch -h -d '2001-02-03 04:05:06.123456789' {{}} +",
        q(&d)
    ));
    sh(&format!(
        "touch -a -d '2002-01-01 00:00:00.5' {}",
        q(&d.join("root-secret"))
    ));

    std::fs::create_dir_all(live.join("etc")).unwrap();
    std::fs::write(
        live.join("etc/machine-id"),
        b"0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    std::fs::set_permissions(
        live.join("etc/machine-id"),
        std::fs::Permissions::from_mode(0o444),
    )
    .unwrap();
    std::fs::create_dir_all(live.join("home/nobody/.ssh")).unwrap();
    std::fs::write(live.join("home/nobody/.ssh/id_ed25519"), b"PRIVATE KEY").unwrap();
    sh(&format!(
        "chown -R nobody:nogroup {0} && chmod 0700 {0} {0}/.ssh && chmod 0600 {0}/.ssh/id_ed25519",
        q(&live.join("home/nobody"))
    ));
}

/// Everything about one path that a faithful copy keeps, read without the copy engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Attrs {
    kind: String,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    atime: Option<(i64, i64)>,
    target: Option<PathBuf>,
    rdev: u64,
    xattrs: String,
    chattr: String,
}

pub fn read_attrs(path: &Path) -> Attrs {
    let m = std::fs::symlink_metadata(path).unwrap();
    let ft = m.file_type();
    use std::os::unix::fs::FileTypeExt;
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_char_device() {
        "chardev"
    } else {
        "other"
    };
    let xattrs = Command::new("getfattr")
        .args(["-h", "-d", "-m", "-", "-e", "hex", "--absolute-names"])
        .arg(path)
        .output()
        .unwrap();
    // Drop getfattr's "# file: <path>" header: the paths differ by design.
    let xattrs: String = String::from_utf8_lossy(&xattrs.stdout)
        .lines()
        .filter(|l| !l.starts_with("# file:"))
        .collect::<Vec<_>>()
        .join("\n");
    let chattr = if ft.is_file() || ft.is_dir() {
        let out = Command::new("lsattr").arg("-d").arg(path).output().unwrap();
        // 'e' (ext4 extents) says how ext4 stores a file, not something to copy.
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .replace('e', "-")
    } else {
        String::new()
    };
    Attrs {
        kind: kind.into(),
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        size: if ft.is_dir() { 0 } else { m.size() },
        mtime: (m.mtime(), m.mtime_nsec()),
        // Listing a directory or reading a symlink (the comparison does both) moves its atime.
        atime: (!ft.is_dir() && !ft.is_symlink()).then(|| (m.atime(), m.atime_nsec())),
        target: ft.is_symlink().then(|| std::fs::read_link(path).unwrap()),
        rdev: m.rdev(),
        xattrs,
        chattr,
    }
}

pub fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, (Attrs, u64)>) {
    // join("") would add a trailing slash, which a file entry cannot take.
    let path = if rel.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let m = std::fs::symlink_metadata(&path).unwrap();
    out.insert(rel.to_path_buf(), (read_attrs(&path), m.ino()));
    if m.is_dir() {
        for e in std::fs::read_dir(&path).unwrap() {
            walk(root, &rel.join(e.unwrap().file_name()), out);
        }
    }
}

/// Compare the copy with the source, attribute by attribute, then hard links, holes and bytes.
pub fn assert_faithful(source: &Path, copy: &Path) {
    assert_faithful_except(source, copy, &[]);
}

/// `btrfs_only_flags`: lsattr letters the destination filesystem cannot hold (ext4 has no C).
pub fn assert_faithful_except(source: &Path, copy: &Path, btrfs_only_flags: &[char]) {
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    walk(source, Path::new(""), &mut a);
    walk(copy, Path::new(""), &mut b);
    let sockets: Vec<&PathBuf> = a
        .iter()
        .filter(|(_, (at, _))| at.kind == "other")
        .map(|(p, _)| p)
        .collect();
    for s in &sockets {
        assert!(!b.contains_key(*s), "socket {s:?} must be skipped");
    }
    a.retain(|_, (at, _)| at.kind != "other");
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "same names"
    );
    for (rel, (attrs, _)) in &a {
        let (copied, _) = &b[rel];
        let mut expected = attrs.clone();
        for flag in btrfs_only_flags {
            expected.chattr = expected.chattr.replace(*flag, "-");
        }
        assert_eq!(&expected, copied, "attributes of {rel:?}");
    }
    // Hard links: the same grouping of names by inode on both sides.
    let groups = |m: &BTreeMap<PathBuf, (Attrs, u64)>| {
        let mut by_ino: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
        for (p, (at, ino)) in m {
            if at.kind != "dir" {
                by_ino.entry(*ino).or_default().push(p.clone());
            }
        }
        let mut g: Vec<Vec<PathBuf>> = by_ino.into_values().filter(|v| v.len() > 1).collect();
        g.sort();
        g
    };
    assert_eq!(groups(&a), groups(&b), "hard links");
    // Content of every regular file (read last: reading may move atimes).
    let at = |root: &Path, rel: &Path| {
        if rel.as_os_str().is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        }
    };
    for (rel, (attrs, _)) in &a {
        if attrs.kind == "file" {
            assert!(
                std::fs::read(at(source, rel)).unwrap() == std::fs::read(at(copy, rel)).unwrap(),
                "content of {rel:?}"
            );
        }
    }
}
