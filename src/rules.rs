//! The one rule set for names, layouts and manifests.
//!
//! Every command that takes subvolume names (`rollback`, `prune`, `old-roots`, `setup`, `diff`,
//! `check system`) and every command that reads a manifest (`check manifest`, `migrate`,
//! `diff`, `check system`) asks this module, so a name or a manifest is accepted or refused the
//! same way everywhere. The NixOS module's assertions state the same rules; `tests/rules-cases.json`
//! is the list of cases both are checked against.
//!
//! Checking a manifest stays O(n log n) in its size: relations between paths (an entry inside a
//! storage root, a storage root inside an entry, nested storage roots, entries inside entries)
//! come from one sort and one sweep with a stack per kind, never from comparing every pair.

use std::collections::HashMap;
use std::fmt;
use std::os::fd::BorrowedFd;

use crate::manifest::{EntryKind, Manifest};

/// Suffix of the temporaries rasa makes beside a subvolume at the top level: the next root in
/// `rollback` (`<root>.rasa-new`) and the blank being made read-only in `setup`
/// (`<blank>.rasa-new`). rasa deletes a leftover of that name, so no configured name may end in it.
pub const TEMPORARY_SUFFIX: &str = ".rasa-new";
/// Prefix of an old root that `prune` has claimed (`<old-roots>/.pruning-<stamp>`).
pub const PRUNING_PREFIX: &str = ".pruning-";
/// Suffix of the temporary copy `migrate` writes beside an entry's storage path.
pub const MIGRATE_TEMP_SUFFIX: &str = ".rasa-migrate";
/// Infix of the backup `migrate --on-conflict replace-with-backup` keeps.
pub const BACKUP_INFIX: &str = ".rasa-backup-";
/// The directory in each storage root where `migrate` keeps its record.
pub const RECORD_DIR: &str = "/.rasa";
/// Longest path the kernel takes (PATH_MAX includes the NUL).
pub const PATH_MAX: usize = 4095;

/// Filesystems the kernel or systemd recreate at every boot: nothing on them can be persisted,
/// and a bind mount over them breaks the boot.
pub const RUNTIME_FILESYSTEMS: &[&str] = &["/proc", "/sys", "/dev", "/run"];
/// Paths that survive every boot by themselves (their own subvolume or partition).
pub const SURVIVE_BY_THEMSELVES: &[&str] = &["/nix", "/boot"];
/// Directories the next boot needs in the root (relative to the root subvolume's top).
pub const BOOT_DIRS: &[&str] = &["nix", "boot"];

/// One problem: where it is and what is wrong, with the fix where there is a specific one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `--root`, `rollback.persist`, `entries[3] (/var/lib/x)`, `storageRoot "/persist"`.
    pub at: String,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

impl Problem {
    /// Paths from a manifest may hold any byte but `/` (a NUL, a newline, an escape sequence):
    /// they are shown escaped, so a message is one readable line in a terminal and the journal.
    fn new(at: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Problem {
            at: printable(at.into()),
            message: printable(message.into()),
            fix: fix.into(),
        }
    }

    /// The refusal (exit 3) for this problem.
    pub fn refusal(&self) -> anyhow::Error {
        crate::error::refuse(self.message.clone(), self.fix.clone())
    }
}

fn printable(text: String) -> String {
    if !text.chars().any(char::is_control) {
        return text;
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

// ---- names at the top level ----------------------------------------------------------------

/// Why `name` is not one plain name at the top level, or a name rasa reserves.
pub fn name_problem(name: &str) -> Option<String> {
    let why = if name.is_empty() {
        "is empty"
    } else if name.contains('/') {
        "contains '/'"
    } else if name == "." || name == ".." {
        "is '.' or '..'"
    } else if name.contains('\0') {
        "contains a NUL byte"
    } else if name.len() > 200 {
        "is longer than 200 bytes"
    } else if name.ends_with(TEMPORARY_SUFFIX) {
        return Some(format!(
            "ends in {TEMPORARY_SUFFIX}, which rasa reserves for the temporaries it makes (and deletes) beside the root and the blank"
        ));
    } else if name.starts_with(PRUNING_PREFIX) {
        return Some(format!(
            "starts with {PRUNING_PREFIX}, which rasa reserves for old roots it is deleting"
        ));
    } else {
        return None;
    };
    Some(format!(
        "{why}: it must be one plain name at the top level of the filesystem"
    ))
}

/// One configured name at the top level.
#[derive(Debug, Clone, Copy)]
pub struct Named<'a> {
    /// How the user gave it: `--root`, or `rollback.root` in a manifest.
    pub label: &'a str,
    /// What it is: "root subvolume", "blank subvolume", ...
    pub what: &'static str,
    pub name: &'a str,
    /// An example for the fix.
    pub example: &'static str,
}

/// Problems of a set of top-level names: each must be plain and not reserved, and no two may
/// be equal (the root, the blank, the old roots, the persistent subvolume and a log subvolume
/// are different things; the persistent one named like another is what rollback or prune
/// would then delete).
pub fn names_problems(named: &[Named<'_>]) -> Vec<Problem> {
    let mut out = Vec::new();
    for n in named {
        if let Some(why) = name_problem(n.name) {
            out.push(Problem::new(
                n.label,
                format!("the {} name {:?} {why}", n.what, n.name),
                format!(
                    "pass a plain subvolume name with {}, e.g. {} {}",
                    n.label, n.label, n.example
                ),
            ));
        }
    }
    if !out.is_empty() {
        return out;
    }
    for (i, a) in named.iter().enumerate() {
        for b in &named[i + 1..] {
            if a.name == b.name {
                out.push(Problem::new(
                    a.label,
                    format!("{} and {} both name {:?}: the root, the blank, the old roots and the persistent subvolume must be four different things", a.label, b.label, a.name),
                    format!("give {} and {} different names", a.label, b.label),
                ));
            }
        }
    }
    out
}

/// The temporary name rasa gives `name` while it prepares it (the new root, setup's blank).
pub fn temporary_name(name: &str) -> String {
    format!("{name}{TEMPORARY_SUFFIX}")
}

// ---- old-root names ------------------------------------------------------------------------

/// The old root `name` claimed by prune, when `claimed` is exactly `.pruning-<name>` of a name
/// rasa generates; anything else that merely starts with the prefix is not rasa's.
pub fn claimed_old_root(claimed: &str) -> Option<&str> {
    claimed
        .strip_prefix(PRUNING_PREFIX)
        .filter(|name| crate::old_roots::parse_timestamp(name).is_some())
}

// ---- what the next boot needs --------------------------------------------------------------

/// The directories of [`BOOT_DIRS`] that are non-empty inside the root subvolume whose top is
/// open at `subvolume_top` in rasa's private top-level mount (where nothing is mounted): a
/// plain directory, or a subvolume nested in the root, goes away with the root at rollback, so
/// a blank that lacks it gives a root without `/nix/store` (or without the kernels in `/boot`):
/// the machine cannot boot. Only a subvolume of its own at the top level, mounted there, keeps
/// them. `rollback` refuses on this and `check system` flags it (open the root in a
/// `TopLevel`, not through `/`, where the real mounts would hide the directory).
pub fn boot_dirs_inside(subvolume_top: BorrowedFd<'_>) -> anyhow::Result<Vec<&'static str>> {
    use nix::fcntl::AtFlags;
    use nix::sys::stat::fstatat;
    let mut found = Vec::new();
    for dir in BOOT_DIRS {
        let st = match fstatat(subvolume_top, *dir, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => return Err(anyhow::Error::new(e).context(format!("inspecting /{dir}"))),
        };
        if st.st_mode & nix::libc::S_IFMT != nix::libc::S_IFDIR {
            continue;
        }
        let fd = crate::btrfs::open_dir_at(subvolume_top, std::ffi::OsStr::new(dir))?;
        if !crate::fs::list(std::os::fd::AsFd::as_fd(&fd))?.is_empty() {
            found.push(*dir);
        }
    }
    Ok(found)
}

// ---- paths ---------------------------------------------------------------------------------

/// Why `path` is not an absolute, normalized path, if it is not.
pub fn path_problem(path: &str) -> Option<&'static str> {
    if !path.starts_with('/') {
        return Some("is not absolute");
    }
    if path.contains('\0') {
        return Some("contains a NUL byte");
    }
    if path.len() > PATH_MAX {
        return Some("is longer than PATH_MAX (4095 bytes)");
    }
    if path.len() > 1 && path.ends_with('/') {
        return Some("ends with '/' (write it without)");
    }
    if path.contains("//") {
        return Some("contains '//' (not normalized)");
    }
    for part in path.split('/').skip(1) {
        if part == ".." {
            return Some("contains '..'");
        }
        if part == "." {
            return Some("contains '.' (not normalized)");
        }
    }
    None
}

/// `path` is `ancestor` or below it (both normalized and absolute).
pub fn is_within(path: &str, ancestor: &str) -> bool {
    ancestor == "/"
        || (path.starts_with(ancestor)
            && (path.len() == ancestor.len() || path.as_bytes()[ancestor.len()] == b'/'))
}

fn within_any<'a>(path: &str, ancestors: &[&'a str]) -> Option<&'a str> {
    ancestors.iter().copied().find(|a| is_within(path, a))
}

/// Path order in which everything below a path directly follows it ('/' sorts first).
fn path_order(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |c: u8| if c == b'/' { 0 } else { c };
    a.bytes().map(key).cmp(b.bytes().map(key))
}

/// An octal mode such as "0755".
pub fn parse_mode(mode: &str) -> Option<u32> {
    if mode.is_empty() || mode.len() > 5 || !mode.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(mode, 8).ok().filter(|m| *m <= 0o7777)
}

/// Why a user or group is not given by name (syntax only: the build sandbox cannot look it up).
fn user_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("is empty");
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return Some("is a number; give users and groups by name");
    }
    if name.len() > 32 {
        return Some("is longer than 32 characters");
    }
    let first = name.as_bytes()[0];
    let valid = (first.is_ascii_alphabetic() || first == b'_')
        && name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric()
                || b == b'_'
                || b == b'-'
                || b == b'.'
                || (b == b'$' && i == name.len() - 1)
        });
    (!valid).then_some("is not a valid user or group name")
}

// ---- manifests -----------------------------------------------------------------------------

const FIX_MANIFEST: &str =
    "correct environment.persistence / services.rasa in the NixOS configuration and rebuild";

/// Every problem of a manifest, one each, in the order of the document (relations last).
/// Empty means valid. `migrate`, `diff`, `check manifest` and `check system` all call this.
pub fn validate_manifest(manifest: &Manifest) -> Vec<Problem> {
    let mut out = Vec::new();
    let r = &manifest.rollback;
    let mut named = vec![Named {
        label: "rollback.root",
        what: "root subvolume",
        name: &r.root,
        example: "root",
    }];
    if let Some(blank) = &r.blank {
        named.push(Named {
            label: "rollback.blank",
            what: "blank subvolume",
            name: blank,
            example: "root-blank",
        });
    }
    named.push(Named {
        label: "rollback.oldRoots",
        what: "old-roots directory",
        name: &r.old_roots,
        example: "old_roots",
    });
    named.push(Named {
        label: "rollback.persist",
        what: "persistent subvolume",
        name: &r.persist,
        example: "persist",
    });
    out.extend(names_problems(&named));
    if !r.device.starts_with('/') {
        out.push(Problem::new(
            "rollback.device",
            format!(
                "{:?} is not an absolute path such as /dev/mapper/cryptroot",
                r.device
            ),
            FIX_MANIFEST,
        ));
    }

    // Storage roots, each once, in path order.
    let mut storage_roots: Vec<&str> = manifest
        .entries
        .iter()
        .map(|e| e.storage_root.as_str())
        .collect();
    storage_roots.sort_unstable();
    storage_roots.dedup();
    let mut good_roots = Vec::new();
    for root in &storage_roots {
        let at = format!("storageRoot {root:?}");
        if let Some(why) = path_problem(root) {
            out.push(Problem::new(at, format!("{root:?} {why}"), FIX_MANIFEST));
        } else if *root == "/" || within_any(root, SURVIVE_BY_THEMSELVES).is_some() {
            out.push(Problem::new(
                at,
                "must be a dedicated mount point such as /persist, not /, /nix or /boot",
                FIX_MANIFEST,
            ));
        } else if let Some(fs) = within_any(root, RUNTIME_FILESYSTEMS) {
            out.push(Problem::new(
                at,
                format!("is on {fs}, which the kernel or systemd recreate at every boot"),
                FIX_MANIFEST,
            ));
        } else {
            good_roots.push(*root);
        }
    }

    let mut first_of: HashMap<&str, usize> = HashMap::with_capacity(manifest.entries.len());
    let mut good_entries = Vec::new();
    for (i, e) in manifest.entries.iter().enumerate() {
        let at = format!("entries[{i}] ({})", e.path);
        let mut push = |message: String| out.push(Problem::new(at.clone(), message, FIX_MANIFEST));
        let path_ok = match path_problem(&e.path) {
            Some(why) => {
                push(format!("path {:?} {why}", e.path));
                false
            }
            None => true,
        };
        if path_ok {
            let last = e.path.rsplit('/').next().unwrap_or_default();
            if e.path == "/" {
                push("/ itself cannot be persisted; list what below it to keep".into());
            } else if within_any(&e.path, SURVIVE_BY_THEMSELVES).is_some() {
                push(format!(
                    "{} is under /nix or /boot, which survive every boot by themselves",
                    e.path
                ));
            } else if let Some(fs) = within_any(&e.path, RUNTIME_FILESYSTEMS) {
                push(format!(
                    "{} is on {fs}, a runtime filesystem the kernel or systemd recreate at every boot; it cannot be persisted",
                    e.path
                ));
            } else if is_within(&e.path, RECORD_DIR)
                || last.ends_with(MIGRATE_TEMP_SUFFIX)
                || last.contains(BACKUP_INFIX)
            {
                push(format!(
                    "{} collides with a name rasa uses in the storage root ({RECORD_DIR}, *{MIGRATE_TEMP_SUFFIX}, *{BACKUP_INFIX}*)",
                    e.path
                ));
            } else {
                good_entries.push(i);
            }
        }
        if let Some(first) = first_of.insert(e.path.as_str(), i) {
            // Keep the first as the reference for later duplicates.
            first_of.insert(e.path.as_str(), first);
            push(format!("duplicate of entries[{first}]"));
        }
        for (field, name) in [("user", &e.user), ("group", &e.group)] {
            if let Some(why) = user_problem(name) {
                push(format!("{field} {name:?} {why}"));
            }
        }
        if parse_mode(&e.mode).is_none() {
            push(format!(
                "mode {:?} is not an octal mode such as \"0755\"",
                e.mode
            ));
        }
    }
    out.extend(relation_problems(manifest, &good_roots, &good_entries));

    for (i, service) in manifest.services.iter().enumerate() {
        let at = format!("services[{i}] ({})", service.unit);
        if service.unit.is_empty() || service.unit.contains('/') {
            out.push(Problem::new(
                at.clone(),
                format!("{:?} is not a systemd unit name", service.unit),
                FIX_MANIFEST,
            ));
        }
        for path in &service.paths {
            if let Some(why) = path_problem(path) {
                out.push(Problem::new(
                    at.clone(),
                    format!("path {path:?} {why}"),
                    FIX_MANIFEST,
                ));
            }
        }
    }
    for (i, pattern) in manifest.diff_ignore.iter().enumerate() {
        let at = format!("diffIgnore[{i}]");
        if !pattern.starts_with('/') {
            out.push(Problem::new(
                at,
                format!("{pattern:?} is not an absolute pattern"),
                FIX_MANIFEST,
            ));
        } else if let Err(e) = globset::Glob::new(pattern) {
            out.push(Problem::new(
                at,
                format!("{pattern:?} is not a valid glob: {e}"),
                FIX_MANIFEST,
            ));
        }
    }
    out
}

/// Entries inside storage roots, storage roots inside entries or each other, and entries inside
/// entries kept elsewhere: one sort, one sweep.
fn relation_problems<'a>(
    manifest: &'a Manifest,
    roots: &[&'a str],
    entries: &[usize],
) -> Vec<Problem> {
    #[derive(Clone, Copy)]
    enum Item<'a> {
        Root(&'a str),
        Entry(usize),
    }
    let path_of = |item: Item<'a>| -> &'a str {
        match item {
            Item::Root(r) => r,
            Item::Entry(i) => &manifest.entries[i].path,
        }
    };
    let mut items: Vec<Item<'a>> = roots.iter().map(|r| Item::Root(r)).collect();
    items.extend(entries.iter().map(|&i| Item::Entry(i)));
    // Equal paths: storage roots first, then entries in document order.
    items.sort_by(|a, b| {
        path_order(path_of(*a), path_of(*b)).then_with(|| match (a, b) {
            (Item::Root(_), Item::Entry(_)) => std::cmp::Ordering::Less,
            (Item::Entry(_), Item::Root(_)) => std::cmp::Ordering::Greater,
            (Item::Entry(x), Item::Entry(y)) => x.cmp(y),
            (Item::Root(_), Item::Root(_)) => std::cmp::Ordering::Equal,
        })
    });
    let mut found: Vec<(usize, Problem)> = Vec::new();
    let mut root_stack: Vec<&str> = Vec::new();
    let mut entry_stack: Vec<usize> = Vec::new();
    for item in items {
        let path = path_of(item);
        while root_stack.last().is_some_and(|r| !is_within(path, r)) {
            root_stack.pop();
        }
        while entry_stack
            .last()
            .is_some_and(|&j| !is_within(path, &manifest.entries[j].path))
        {
            entry_stack.pop();
        }
        match item {
            Item::Root(root) => {
                if let Some(outer) = root_stack.last() {
                    found.push((usize::MAX, Problem::new(
                        format!("storageRoot {root:?}"),
                        format!("is inside the storage root {outer}; storage roots must not contain each other"),
                        FIX_MANIFEST,
                    )));
                }
                if let Some(&j) = entry_stack.last() {
                    let e = &manifest.entries[j];
                    found.push((usize::MAX, Problem::new(
                        format!("storageRoot {root:?}"),
                        format!("is inside entries[{j}] ({}), so its bind mount would cover the storage", e.path),
                        FIX_MANIFEST,
                    )));
                }
                root_stack.push(root);
            }
            Item::Entry(i) => {
                let e = &manifest.entries[i];
                let at = format!("entries[{i}] ({})", e.path);
                if let Some(root) = root_stack.last() {
                    found.push((
                        i,
                        Problem::new(
                            at.clone(),
                            format!(
                                "{} is inside the storage root {root}; list the path as it appears on /",
                                e.path
                            ),
                            FIX_MANIFEST,
                        ),
                    ));
                }
                // Equal paths are duplicates, reported above.
                if let Some(&j) = entry_stack
                    .iter()
                    .rev()
                    .find(|&&j| manifest.entries[j].path != e.path)
                {
                    let outer = &manifest.entries[j];
                    if outer.kind == EntryKind::File {
                        found.push((
                            i,
                            Problem::new(
                                at,
                                format!(
                                    "inside {}, which entries[{j}] persists as a file",
                                    outer.path
                                ),
                                FIX_MANIFEST,
                            ),
                        ));
                    } else if outer.storage_root != e.storage_root {
                        found.push((
                            i,
                            Problem::new(
                                at,
                                format!(
                                    "inside the directory {} that entries[{j}] persists in {}, but stored in {}; keep nested paths in one storage root",
                                    outer.path, outer.storage_root, e.storage_root
                                ),
                                FIX_MANIFEST,
                            ),
                        ));
                    }
                }
                // Duplicates stay off the stack so the search above stays short.
                if entry_stack
                    .last()
                    .is_none_or(|&j| manifest.entries[j].path != e.path)
                {
                    entry_stack.push(i);
                }
            }
        }
    }
    found.sort_by_key(|(i, _)| *i);
    found.into_iter().map(|(_, p)| p).collect()
}

/// Refuse (exit 3) a manifest with problems, listing them: `manifest::load` calls it, so every
/// command that acts on a manifest (`migrate`, `diff`, `watch`) holds it to these rules.
pub fn check_manifest(manifest: &Manifest, origin: &std::path::Path) -> anyhow::Result<()> {
    let problems = validate_manifest(manifest);
    if problems.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
    Err(crate::error::refuse(
        format!(
            "the manifest {} has {} problem{}:\n{}",
            origin.display(),
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            list.join("\n")
        ),
        format!(
            "{FIX_MANIFEST} (`rasa check manifest {}` lists them)",
            origin.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_name_units_and_absolute_paths() {
        let mut m: Manifest = serde_json::from_str(
            r#"{"version": 1, "rollback": {"device": "/dev/x", "root": "root", "blank": null,
              "oldRoots": "old_roots", "persist": "persist", "keep": 5, "keepDays": 7},
              "entries": [], "services": [{"unit": "a.service", "paths": ["/var/lib/a"]}]}"#,
        )
        .unwrap();
        assert_eq!(validate_manifest(&m), vec![]);
        m.services[0].paths.push("var/lib/b".into());
        m.services[0].unit = String::new();
        let shown: Vec<String> = validate_manifest(&m)
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            shown,
            [
                "services[0] (): \"\" is not a systemd unit name",
                "services[0] (): path \"var/lib/b\" is not absolute"
            ]
        );
    }

    #[test]
    fn paths_with_control_characters_are_shown_escaped() {
        let p = Problem::new("entries[0] (/a\0b\nc)", "x\u{1b}[31m", "fix");
        assert_eq!(p.at, "entries[0] (/a\\0b\\nc)");
        assert_eq!(p.message, "x\\u{1b}[31m");
    }

    #[derive(serde::Deserialize)]
    struct Case {
        name: String,
        rollback: serde_json::Value,
        entries: Vec<serde_json::Value>,
        ok: bool,
        #[serde(default)]
        phrase: Option<String>,
    }

    /// The shared cases (the Nix assertions read the same file).
    #[test]
    fn rules_cases() {
        let cases: Vec<Case> =
            serde_json::from_str(include_str!("../tests/rules-cases.json")).unwrap();
        assert!(cases.len() > 20);
        for case in cases {
            let manifest: Manifest = serde_json::from_value(serde_json::json!({
                "version": crate::manifest::VERSION,
                "rollback": case.rollback,
                "entries": case.entries,
            }))
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let problems: Vec<String> = validate_manifest(&manifest)
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(problems.is_empty(), case.ok, "{}: {problems:?}", case.name);
            if let Some(phrase) = &case.phrase {
                assert!(
                    problems.iter().any(|p| p.contains(phrase.as_str())),
                    "{}: no problem says {phrase:?}: {problems:?}",
                    case.name
                );
            }
        }
    }

    #[test]
    fn sweep_order_puts_descendants_right_after() {
        let mut v = vec!["/a-b", "/a/b", "/a", "/a.b", "/a/b/c", "/b"];
        v.sort_by(|a, b| path_order(a, b));
        assert_eq!(v, ["/a", "/a/b", "/a/b/c", "/a-b", "/a.b", "/b"]);
    }

    /// A large hostile manifest (deep nesting, many entries, long paths) checks in linear-ish
    /// time and memory: this used to grow quadratically.
    #[test]
    fn large_hostile_manifest_checks_quickly() {
        let mut entries = Vec::new();
        let mut path = String::new();
        for i in 0..2000 {
            path.push_str("/d");
            entries.push(serde_json::json!({"storageRoot": format!("/persist{}", i % 2), "path": path.clone(), "kind": "directory", "user": "root", "group": "root", "mode": "0755"}));
        }
        for i in 0..60_000 {
            entries.push(serde_json::json!({"storageRoot": "/persist", "path": format!("/x/{i}"), "kind": "file", "user": "root", "group": "root", "mode": "0755"}));
        }
        let manifest: Manifest = serde_json::from_value(serde_json::json!({
            "version": 1,
            "rollback": {"device": "/dev/x", "root": "root", "blank": "root-blank", "oldRoots": "old_roots", "persist": "persist", "keep": 1, "keepDays": 1},
            "entries": entries,
        }))
        .unwrap();
        let started = std::time::Instant::now();
        let problems = validate_manifest(&manifest);
        assert_eq!(problems.len(), 1999, "each nested entry once");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }
}
