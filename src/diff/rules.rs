//! What `rasa diff` leaves out, decided per path. Both engines ask the same questions in the
//! same way, which is what makes their answers comparable.
//!
//! A path is left out when it, or any directory above it, is
//! - persisted: a manifest entry whose copy is in storage, or a symlink into a storage root
//!   (impermanence's file links);
//! - unstored: a manifest entry with no copy in storage yet. The next boot mounts an empty
//!   copy over it, so everything there is lost; it is left out of the engines' search only to
//!   be reported, whole, by [`super::add_unstored`];
//! - a runtime mount point: /proc /sys /dev /run /tmp, and every mount below the live root;
//! - matched by an ignore glob (`--ignore`, the manifest's `diffIgnore`); a directory is also
//!   tested with a trailing `/`, so `/var/cache/**` covers `/var/cache` itself;
//!
//! and a symlink into /nix/store is left out because NixOS recreates it on every boot.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use anyhow::Result;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::error::refuse;

/// Mounted on every boot by systemd, whatever the manifest says.
pub const RUNTIME_DIRS: &[&str] = &["/proc", "/sys", "/dev", "/run", "/tmp"];
const NIX_STORE: &[u8] = b"/nix/store";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Persisted,
    Unstored,
    Runtime,
    Ignored,
    StoreSymlink,
}

pub struct Rules {
    persisted: HashSet<Vec<u8>>,
    /// Manifest entries not yet in storage (see [`Rules::with_unstored`]).
    unstored: HashSet<Vec<u8>>,
    storage_roots: Vec<Vec<u8>>,
    mounts: HashSet<Vec<u8>>,
    /// `lengths[n]`: some persisted path or mount point is n bytes long.
    lengths: Vec<bool>,
    ignore: GlobSet,
    pub ignore_patterns: Vec<String>,
    pub persisted_count: usize,
    pub mount_count: usize,
}

impl Rules {
    pub fn new(
        persisted: &[String],
        storage_roots: &[String],
        mounts: &[Vec<u8>],
        ignore: &[String],
    ) -> Result<Rules> {
        let mut builder = GlobSetBuilder::new();
        for pattern in ignore {
            let glob = GlobBuilder::new(pattern)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| {
                    refuse(
                        format!("the ignore pattern {pattern:?} is not a valid glob: {e}"),
                        "fix the pattern (globs use *, ?, [..], {a,b} and ** for any depth), \
                         e.g. --ignore '/var/cache/**'",
                    )
                })?;
            builder.add(glob);
        }
        let ignore_set = builder.build()?;
        let normalise = |p: &str| -> Vec<u8> {
            let trimmed = p.trim_end_matches('/');
            if trimmed.is_empty() {
                b"/".to_vec()
            } else {
                trimmed.as_bytes().to_vec()
            }
        };
        let mut mount_set: HashSet<Vec<u8>> =
            RUNTIME_DIRS.iter().map(|d| d.as_bytes().to_vec()).collect();
        mount_set.extend(mounts.iter().filter(|m| m.as_slice() != b"/").cloned());
        let persisted: HashSet<Vec<u8>> = persisted.iter().map(|p| normalise(p)).collect();
        let mut lengths = Vec::new();
        for path in persisted.iter().chain(mount_set.iter()) {
            if lengths.len() <= path.len() {
                lengths.resize(path.len() + 1, false);
            }
            lengths[path.len()] = true;
        }
        Ok(Rules {
            unstored: HashSet::new(),
            lengths,
            persisted_count: persisted.len(),
            persisted,
            storage_roots: storage_roots
                .iter()
                .map(|p| normalise(p))
                .filter(|p| p.as_slice() != b"/")
                .collect(),
            mount_count: mount_set.len(),
            mounts: mount_set,
            ignore: ignore_set,
            ignore_patterns: ignore.to_vec(),
        })
    }

    /// Take these persisted paths as manifest entries whose storage copy does not exist: the
    /// next boot erases them whole, so they are reported apart, never as persisted.
    pub fn with_unstored(mut self, paths: &[String]) -> Rules {
        for path in paths {
            let path = path.trim_end_matches('/').as_bytes().to_vec();
            if path.is_empty() {
                continue;
            }
            self.persisted.remove(&path);
            if self.lengths.len() <= path.len() {
                self.lengths.resize(path.len() + 1, false);
            }
            self.lengths[path.len()] = true;
            self.unstored.insert(path);
        }
        self.persisted_count = self.persisted.len();
        self
    }

    /// The manifest entries not yet in storage, sorted.
    pub fn unstored(&self) -> Vec<Vec<u8>> {
        let mut paths: Vec<Vec<u8>> = self.unstored.iter().cloned().collect();
        paths.sort();
        paths
    }

    /// Whether `path` is a runtime directory or a mount point below the live root.
    pub fn is_mount(&self, path: &[u8]) -> bool {
        self.mounts.contains(path)
    }

    /// Whether a symlink target points into a storage root (an impermanence file link).
    pub fn points_into_storage(&self, target: &[u8]) -> bool {
        self.storage_roots.iter().any(|root| under(target, root))
    }

    /// Why this one path is left out, looking at the path itself only (the engines take care
    /// of directories above it: the walk does not descend, the btrfs engine asks for each).
    pub fn check(
        &self,
        path: &[u8],
        is_dir: bool,
        symlink_target: Option<&[u8]>,
    ) -> Option<Reason> {
        // Hashing every path of a large tree shows in profiles; most lengths match no entry.
        let len_known = self.lengths.get(path.len()).copied().unwrap_or(false);
        if len_known && self.persisted.contains(path) {
            return Some(Reason::Persisted);
        }
        if len_known && self.unstored.contains(path) {
            return Some(Reason::Unstored);
        }
        if len_known && self.mounts.contains(path) {
            return Some(Reason::Runtime);
        }
        if !self.ignore.is_empty() {
            let os = Path::new(OsStr::from_bytes(path));
            if self.ignore.is_match(os) {
                return Some(Reason::Ignored);
            }
            if is_dir {
                let mut with_slash = path.to_vec();
                with_slash.push(b'/');
                if self
                    .ignore
                    .is_match(Path::new(OsStr::from_bytes(&with_slash)))
                {
                    return Some(Reason::Ignored);
                }
            }
        }
        if let Some(target) = symlink_target {
            if under(target, NIX_STORE) {
                return Some(Reason::StoreSymlink);
            }
            if self.points_into_storage(target) {
                return Some(Reason::Persisted);
            }
        }
        None
    }
}

/// `path` is `dir` or inside it.
pub fn under(path: &[u8], dir: &[u8]) -> bool {
    path.starts_with(dir) && (path.len() == dir.len() || path[dir.len()] == b'/')
}

/// Mount points at or below `live_root` (as paths relative to it, starting with '/'), from
/// /proc/self/mountinfo, whose fields escape space, tab, newline and backslash in octal.
pub fn mounts_below(live_root: &[u8]) -> Vec<Vec<u8>> {
    let root = if live_root == b"/" {
        &b""[..]
    } else {
        live_root.strip_suffix(b"/").unwrap_or(live_root)
    };
    let mut found = Vec::new();
    for mount in crate::toplevel::mounts() {
        let point = mount.mount_point.into_os_string().into_vec();
        if root.is_empty() {
            found.push(point);
        } else if under(&point, root) && point.len() > root.len() {
            found.push(point[root.len()..].to_vec());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(ignore: &[&str]) -> Rules {
        Rules::new(
            &["/var/lib/nixos".into(), "/etc/machine-id".into()],
            &["/persist".into()],
            &[b"/boot".to_vec()],
            &ignore.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn decides_each_reason() {
        let r = rules(&["/var/cache/**", "/home/*/.cache/**"]);
        assert_eq!(
            r.check(b"/var/lib/nixos", true, None),
            Some(Reason::Persisted)
        );
        assert_eq!(r.check(b"/var/lib/nixos2", true, None), None);
        assert_eq!(r.check(b"/proc", true, None), Some(Reason::Runtime));
        assert_eq!(r.check(b"/boot", true, None), Some(Reason::Runtime));
        assert_eq!(r.check(b"/var/cache", true, None), Some(Reason::Ignored));
        assert_eq!(r.check(b"/var/cache", false, None), None);
        assert_eq!(
            r.check(b"/var/cache/x/y", false, None),
            Some(Reason::Ignored)
        );
        assert_eq!(
            r.check(b"/home/a/.cache/z", false, None),
            Some(Reason::Ignored)
        );
        assert_eq!(r.check(b"/home/a/b/.cache/z", false, None), None);
        assert_eq!(
            r.check(b"/etc/x", false, Some(b"/nix/store/abc-x")),
            Some(Reason::StoreSymlink)
        );
        assert_eq!(r.check(b"/etc/x", false, Some(b"/nix/storefront")), None);
        assert_eq!(
            r.check(b"/etc/y", false, Some(b"/persist/etc/y")),
            Some(Reason::Persisted)
        );
        assert_eq!(r.check(b"/etc/\xff", false, None), None);
    }

    #[test]
    fn unstored_entries_are_not_persisted() {
        let r = rules(&[]).with_unstored(&["/var/lib/nixos/".into()]);
        assert_eq!(
            r.check(b"/var/lib/nixos", true, None),
            Some(Reason::Unstored)
        );
        assert_eq!(
            r.check(b"/etc/machine-id", false, None),
            Some(Reason::Persisted)
        );
        assert_eq!(r.persisted_count, 1);
        assert_eq!(r.unstored(), vec![b"/var/lib/nixos".to_vec()]);
        assert!(r.points_into_storage(b"/persist/etc/x"));
        assert!(!r.points_into_storage(b"/persistent/etc/x"));
    }

    #[test]
    fn bad_glob_is_refused() {
        let err = Rules::new(&[], &[], &[], &["/a/[".into()]).err().unwrap();
        assert_eq!(
            crate::error::exit_code_for(&err),
            crate::error::exit::REFUSED
        );
    }
}
