//! The manifest: the contract between the NixOS module (which renders it from the final
//! configuration) and this binary (which validates it at build time and acts on it at run time).
//! Every field is documented in docs/manifest.md; keep the two in step.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::error::refuse;

/// The manifest version this binary reads and writes.
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub rollback: RollbackSettings,
    /// Every persisted path, from the final `environment.persistence` (system and users).
    pub entries: Vec<Entry>,
    /// Glob patterns of absolute paths that `rasa diff` leaves out.
    #[serde(default)]
    pub diff_ignore: Vec<String>,
    /// The units that keep state, and where (the module's state check): lets `rasa diff` and
    /// `rasa check system` name the service a path belongs to. Absent in older manifests.
    #[serde(default)]
    pub services: Vec<Service>,
}

/// A unit and the paths it keeps its state in (kept or not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// The unit's name, e.g. `tailscaled.service`, `backup.timer`.
    pub unit: String,
    /// Absolute paths on the live root.
    pub paths: Vec<String>,
}

impl Manifest {
    /// The units that keep state at `path` or at a parent of it.
    pub fn units_of(&self, path: &str) -> Vec<&str> {
        self.services
            .iter()
            .filter(|s| {
                s.paths.iter().any(|p| {
                    path == p || (path.starts_with(p.as_str()) && path[p.len()..].starts_with('/'))
                })
            })
            .map(|s| s.unit.as_str())
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RollbackSettings {
    /// The block device that holds the btrfs filesystem.
    pub device: String,
    /// The root subvolume's name at the top level.
    pub root: String,
    /// The read-only blank subvolume; `null` means each boot starts from a new empty subvolume.
    pub blank: Option<String>,
    /// Directory at the top level where previous roots are kept.
    pub old_roots: String,
    /// The persistent subvolume's name at the top level.
    pub persist: String,
    /// Newest old roots always kept.
    pub keep: u32,
    /// Old roots younger than this many days are kept as well.
    pub keep_days: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Directory,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Entry {
    /// Where the persistent copy lives, e.g. `/persist`; the copy is at `storageRoot + path`.
    pub storage_root: String,
    /// The absolute path on the live root.
    pub path: String,
    pub kind: EntryKind,
    /// Owner of the directory (for a file: of its parent directory), by name.
    pub user: String,
    /// Group of the directory (for a file: of its parent directory), by name.
    pub group: String,
    /// Octal mode of the directory (for a file: of its parent directory), e.g. "0755".
    pub mode: String,
    /// The initrd mounts this entry (impermanence's `neededForBoot` paths, such as
    /// `/var/lib/nixos`), before NixOS's activation could create its storage copy: the copy
    /// must already exist at the first wiping boot, so `setup`/`migrate` create it and
    /// `check system` reports it missing.
    #[serde(default)]
    pub needed_for_boot: bool,
}

impl Entry {
    /// Where this entry's persistent copy lives.
    pub fn storage_path(&self) -> PathBuf {
        Path::new(&self.storage_root).join(self.path.trim_start_matches('/'))
    }
}

/// Parse a manifest, refusing (with the place of the problem) anything that is not one.
pub fn parse(text: &str, origin: &Path) -> Result<Manifest> {
    #[derive(Deserialize)]
    struct VersionOnly {
        version: Option<serde_json::Value>,
    }
    let probe: VersionOnly = serde_json::from_str(text).map_err(|e| {
        refuse(
            format!("{} is not valid JSON: {e}", origin.display()),
            "regenerate it from the NixOS configuration (nixos-rebuild), or fix the file by hand",
        )
    })?;
    match probe.version.as_ref().and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => return Err(refuse(
            format!(
                "{} has manifest version {v}, but this rasa reads version {VERSION}",
                origin.display()
            ),
            "use the rasa from the same flake revision as the NixOS module that wrote the manifest",
        )),
        None => {
            return Err(refuse(
                format!(
                    "{} has no numeric \"version\" field; it is not a rasa manifest",
                    origin.display()
                ),
                "point --manifest at the manifest.json the NixOS module generates",
            ))
        }
    }
    serde_json::from_str(text).map_err(|e| {
        refuse(
            format!(
                "{} is not a valid version-{VERSION} manifest: {e}",
                origin.display()
            ),
            "see docs/manifest.md for the fields, or regenerate it with nixos-rebuild",
        )
    })
}

/// Read a manifest and hold it to the one rule set (`rules::validate_manifest`), refusing it
/// with every problem listed: what every command that acts on a manifest reads it with.
pub fn load(path: &Path) -> Result<Manifest> {
    let manifest = read(path)?;
    crate::rules::check_manifest(&manifest, path)?;
    Ok(manifest)
}

/// Read and parse a manifest without the rules, for `check system`, which reports each of the
/// rules' problems as a failed check of its own instead of refusing.
pub fn read(path: &Path) -> Result<Manifest> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(refuse(
                format!("manifest {} does not exist", path.display()),
                "pass --manifest PATH, or enable the rasa NixOS module and run nixos-rebuild boot",
            ))
        }
        Err(e) => return Err(e).with_context(|| format!("reading manifest {}", path.display())),
    };
    parse(&text, path)
}

/// Where a manifest is looked for when none is given, in order: the next boot's system, then
/// the running one's /etc.
///
/// The NixOS module links the manifest from the system's top level (`rasa-manifest.json`), which
/// holds even when `/etc` is an overlay image; the profile's `etc/` is the fallback for that.
pub const SEARCH_PATH: &[(&str, &str)] = &[
    (
        "/nix/var/nix/profiles/system/rasa-manifest.json",
        "the next boot's configuration",
    ),
    (
        "/nix/var/nix/profiles/system/etc/rasa/manifest.json",
        "the next boot's configuration",
    ),
    ("/etc/rasa/manifest.json", "the running system's /etc"),
];

/// The search path, for messages.
pub fn search_path_text() -> String {
    SEARCH_PATH
        .iter()
        .map(|(path, _)| *path)
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Find the manifest to use and say which it was.
pub fn locate(explicit: Option<&Path>) -> Result<(PathBuf, &'static str)> {
    if let Some(path) = explicit {
        return Ok((path.to_path_buf(), "--manifest"));
    }
    for (candidate, label) in SEARCH_PATH {
        if Path::new(candidate).exists() {
            return Ok((PathBuf::from(candidate), label));
        }
    }
    Err(refuse(
        format!(
            "no manifest given and none found at {}",
            SEARCH_PATH
                .iter()
                .map(|(path, _)| *path)
                .collect::<Vec<_>>()
                .join(" or ")
        ),
        "enable the rasa NixOS module and run `nixos-rebuild boot`, or pass --manifest PATH",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_example_parses() {
        let text = include_str!("../docs/manifest.example.json");
        let manifest = parse(text, Path::new("docs/manifest.example.json")).unwrap();
        assert_eq!(manifest.version, VERSION);
        assert!(manifest.entries.iter().any(|e| e.kind == EntryKind::File));
        // Round trip: what we write is what we read.
        let again = parse(&serde_json::to_string(&manifest).unwrap(), Path::new("x")).unwrap();
        assert_eq!(again, manifest);
    }

    #[test]
    fn services_are_optional_strict_and_name_the_unit_of_a_path() {
        let base = r#"{"version": 1, "rollback": {"device": "/dev/x", "root": "root", "blank": null,
            "oldRoots": "old_roots", "persist": "persist", "keep": 1, "keepDays": 1}, "entries": []"#;
        // An older manifest, without the field.
        let old = parse(&format!("{base}}}"), Path::new("old")).unwrap();
        assert!(old.services.is_empty());
        let with = parse(
            &format!(
                r#"{base}, "services": [{{"unit": "tailscaled.service", "paths": ["/var/lib/tailscale"]}},
                {{"unit": "kuma.service", "paths": ["/var/lib/private/uptime-kuma"]}}]}}"#
            ),
            Path::new("new"),
        )
        .unwrap();
        assert_eq!(
            with.units_of("/var/lib/tailscale/tailscaled.state"),
            ["tailscaled.service"]
        );
        assert_eq!(with.units_of("/var/lib/tailscale"), ["tailscaled.service"]);
        assert!(with.units_of("/var/lib/tailscale2").is_empty());
        // deny_unknown_fields holds inside a service too.
        let typo = format!(r#"{base}, "services": [{{"unit": "a.service", "path": ["/x"]}}]}}"#);
        assert!(parse(&typo, Path::new("typo")).is_err());
    }
}
