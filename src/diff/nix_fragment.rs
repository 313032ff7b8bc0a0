//! `rasa diff --nix`: an `environment.persistence` fragment that would keep what remains.
//!
//! Well-known state is recognised and the directory (or file) that holds it is named, with a
//! comment saying what it is, so a user persists `/var/lib/bluetooth` rather than forty
//! pairing files. Anything else is persisted by its top-most new directory (everything in a new
//! directory is new, so the directory is the natural unit) or, inside directories the blank
//! already has, file by file.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use anyhow::Result;

use super::report::human_size;
use super::rules::under;
use super::writers::NOT_RECORDED;
use super::{escape, Found, Kind, Outcome, Status};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    /// Persist this directory.
    Directory(&'static str),
    /// Persist each matching file on its own (its directory is managed by NixOS).
    EachFile,
}

struct Known {
    /// Matches this path and everything below it (or, for `EachFile`, paths starting with it).
    prefix: &'static str,
    unit: Unit,
    what: &'static str,
    /// The `rasa.presets.<name>` that keeps it (modules/presets.nix), if one does.
    preset: Option<&'static str>,
}

/// Well-known state on NixOS machines, and what to persist for it.
const KNOWN: &[Known] = &[
    Known {
        prefix: "/etc/NetworkManager/system-connections",
        unit: Unit::Directory("/etc/NetworkManager/system-connections"),
        what: "NetworkManager connections (Wi-Fi passwords, VPNs)",
        preset: Some("networkmanager"),
    },
    Known {
        prefix: "/var/lib/NetworkManager",
        unit: Unit::Directory("/var/lib/NetworkManager"),
        what: "NetworkManager secret_key, seen-bssids, timestamps",
        preset: Some("networkmanager"),
    },
    Known {
        prefix: "/etc/ssh/ssh_host_",
        unit: Unit::EachFile,
        what: "ssh host key (clients warn when it changes)",
        preset: Some("ssh"),
    },
    Known {
        prefix: "/var/lib/bluetooth",
        unit: Unit::Directory("/var/lib/bluetooth"),
        what: "Bluetooth pairings",
        preset: Some("bluetooth"),
    },
    Known {
        prefix: "/var/lib/docker",
        unit: Unit::Directory("/var/lib/docker"),
        what: "Docker images, containers and volumes",
        preset: Some("docker"),
    },
    Known {
        prefix: "/var/lib/systemd/timers",
        unit: Unit::Directory("/var/lib/systemd/timers"),
        what: "systemd persistent timer stamps",
        preset: Some("essential"),
    },
    Known {
        prefix: "/var/lib/nixos",
        unit: Unit::Directory("/var/lib/nixos"),
        what: "NixOS uid/gid allocations (keeps file ownership stable)",
        preset: Some("essential"),
    },
    Known {
        prefix: "/etc/machine-id",
        unit: Unit::EachFile,
        what: "machine id (journal and DHCP identity)",
        preset: Some("essential"),
    },
];

fn known_for(path: &[u8]) -> Option<&'static Known> {
    KNOWN.iter().find(|k| match k.unit {
        Unit::Directory(_) => under(path, k.prefix.as_bytes()),
        Unit::EachFile => path.starts_with(k.prefix.as_bytes()),
    })
}

/// A Nix string literal; `None` when the path cannot be one (Nix strings are UTF-8).
fn nix_string(path: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(path).ok()?;
    let mut out = String::from("\"");
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '$' if chars.peek() == Some(&'{') => out.push_str("\\$"),
            c => out.push(c),
        }
    }
    out.push('"');
    Some(out)
}

#[derive(Default)]
struct Suggestion<'a> {
    what: Option<&'static str>,
    preset: Option<&'static str>,
    /// Who wrote what it stands for (from the watch record; empty without one).
    writers: BTreeSet<&'a str>,
    /// An existing directory whose mode or owner changed (nothing below it is new).
    modified_dir: bool,
    paths: u64,
    size: u64,
}

pub fn render(outcome: &Outcome, out: &mut impl Write) -> Result<()> {
    // Where well-known state lives: a new directory above it (say /etc/ssh for a host key) is
    // only its parent, which impermanence creates; persisting it would nest the two.
    let known_units: Vec<Vec<u8>> = outcome
        .found
        .iter()
        .filter_map(|f| {
            known_for(f.path).map(|k| match k.unit {
                Unit::Directory(dir) => dir.as_bytes().to_vec(),
                Unit::EachFile => f.path.to_vec(),
            })
        })
        .collect();
    let holds_known = |dir: &[u8]| {
        known_units
            .iter()
            .any(|unit| under(unit, dir) && unit.as_slice() != dir)
    };
    // The new directories that can stand for everything below them.
    let new_dirs: Vec<&[u8]> = outcome
        .found
        .iter()
        .filter(|f| f.kind == Kind::Directory && f.status == Status::New)
        .map(|f| f.path)
        .filter(|dir| !holds_known(dir))
        .collect();
    let mut directories: BTreeMap<Vec<u8>, Suggestion> = BTreeMap::new();
    let mut files: BTreeMap<Vec<u8>, Suggestion> = BTreeMap::new();
    for found in outcome.found.iter() {
        // Already in the manifest: migrate stores it, nothing to add.
        if found.status == Status::Unstored
            || (found.kind == Kind::Directory && holds_known(found.path))
        {
            continue;
        }
        let (key, known, is_dir) = classify(&found, &new_dirs);
        let modified_dir =
            found.kind == Kind::Directory && found.status == Status::Modified && found.path == key;
        let target = if is_dir {
            directories.entry(key).or_default()
        } else {
            files.entry(key).or_default()
        };
        target.what = target.what.or(known.map(|k| k.what));
        target.preset = target.preset.or(known.and_then(|k| k.preset));
        if let Some(writers) = &outcome.writers {
            target.writers.extend(writers.named(found.path));
        }
        target.modified_dir |= modified_dir;
        target.paths += 1;
        target.size += found.size;
    }

    writeln!(
        out,
        "# What `rasa diff` found on {} that the next boot erases. Paste into your NixOS",
        escape(outcome.source.tree.as_bytes())
    )?;
    writeln!(
        out,
        "# configuration (with the impermanence module) and delete what you do not want to keep."
    )?;
    let storage = nix_string(outcome.source.storage_root.as_bytes())
        .unwrap_or_else(|| "\"/persist\"".to_owned());
    writeln!(out, "environment.persistence.{storage} = {{")?;
    for (label, map) in [("directories", &directories), ("files", &files)] {
        writeln!(out, "  {label} = [")?;
        // With a watch record, grouped by who wrote them (paths in order within a group).
        let mut rows: Vec<(&Vec<u8>, &Suggestion)> = map.iter().collect();
        let group_of = |s: &Suggestion| {
            s.writers
                .iter()
                .filter(|w| **w != NOT_RECORDED || s.writers.len() == 1)
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        };
        rows.sort_by_cached_key(|(path, s)| {
            let group = group_of(s);
            (group == NOT_RECORDED, group, path.to_vec())
        });
        let mut last_group = None;
        for (path, suggestion) in rows {
            if outcome.writers.is_some() {
                let group = group_of(suggestion);
                if last_group.as_ref() != Some(&group) {
                    writeln!(out, "    # written by {}", escape(group.as_bytes()))?;
                    last_group = Some(group);
                }
            }
            let comment = match suggestion.what {
                Some(what) => match suggestion.preset {
                    Some(preset) => format!("{what}; rasa.presets.{preset} keeps it"),
                    None => what.to_owned(),
                },
                None if suggestion.modified_dir => {
                    "mode or owner differs from the blank".to_owned()
                }
                None => format!(
                    "{} path{}, {}",
                    suggestion.paths,
                    if suggestion.paths == 1 { "" } else { "s" },
                    human_size(suggestion.size)
                ),
            };
            match nix_string(path) {
                Some(literal) => writeln!(out, "    {literal} # {comment}")?,
                None => writeln!(
                    out,
                    "    # left out, not UTF-8 (Nix strings cannot hold it): {}",
                    escape(path)
                )?,
            }
        }
        writeln!(out, "  ];")?;
    }
    writeln!(out, "}};")?;
    for entry in outcome.rules.unstored() {
        if outcome.found.contains_sorted(&entry) {
            writeln!(
                out,
                "# {} is {}: the next boot erases it.",
                escape(&entry),
                super::UNSTORED_NOTE
            )?;
        }
    }
    Ok(())
}

/// Where one found path goes: the path to persist, the well-known state it is, and whether it
/// is a directory.
fn classify(found: &Found<'_>, new_dirs: &[&[u8]]) -> (Vec<u8>, Option<&'static Known>, bool) {
    let is_dir = found.kind == Kind::Directory;
    if let Some(known) = known_for(found.path) {
        return match known.unit {
            Unit::Directory(dir) => (dir.as_bytes().to_vec(), Some(known), true),
            Unit::EachFile => (found.path.to_vec(), Some(known), is_dir),
        };
    }
    // `new_dirs` is sorted, so the first ancestor found is the top-most.
    match new_dirs.iter().find(|d| under(found.path, d)) {
        Some(top) => (top.to_vec(), None, true),
        None => (found.path.to_vec(), None, is_dir),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_strings_are_escaped() {
        assert_eq!(nix_string(b"/a\"b").unwrap(), r#""/a\"b""#);
        assert_eq!(nix_string(b"/a${b}").unwrap(), r#""/a\${b}""#);
        assert_eq!(nix_string(b"/a$b").unwrap(), r#""/a$b""#);
        assert_eq!(nix_string(b"/a\xff"), None);
    }

    /// The presets named in --nix exist (in the presets' table, modules/preset-table.nix, or
    /// as ssh's option in modules/presets.nix) and keep what they are named for (the path itself
    /// or a directory above it), so the two stay in step.
    #[test]
    fn named_presets_keep_what_they_are_named_for() {
        let table = include_str!("../../modules/preset-table.nix");
        let presets = include_str!("../../modules/presets.nix");
        // A preset's entry: from `  <name> = ` (two spaces in) to the next line at that depth.
        let chunk_of = |name: &str| {
            let start = table.find(&format!("\n  {name} = "))? + 1;
            let rest = &table[start..];
            let end = rest[1..]
                .match_indices("\n  ")
                .map(|(i, _)| i + 1)
                .find(|&i| {
                    let next = &rest[i + 3..];
                    next.starts_with(|c: char| c.is_ascii_alphabetic()) || next.starts_with('}')
                })
                .unwrap_or(rest.len());
            Some(&rest[..end])
        };
        for known in KNOWN {
            let Some(preset) = known.preset else { continue };
            let kept = match known.unit {
                Unit::Directory(dir) => dir,
                Unit::EachFile => known.prefix,
            };
            let Some(chunk) = chunk_of(preset) else {
                // A preset without a table entry moves its files by an option (ssh's host keys).
                assert!(
                    presets.contains(&format!("# {preset}:")),
                    "rasa.presets.{preset} is neither in modules/preset-table.nix nor in modules/presets.nix"
                );
                continue;
            };
            let paths: Vec<&str> = chunk
                .split('"')
                .skip(1)
                .step_by(2)
                .filter(|p| p.starts_with('/'))
                .collect();
            assert!(
                paths.iter().any(
                    |p| kept.starts_with(p) && under(kept.as_bytes(), p.as_bytes())
                        || (known.unit == Unit::EachFile && kept == *p)
                ),
                "rasa.presets.{preset} keeps {paths:?}, not {kept}"
            );
        }
    }

    #[test]
    fn known_state_is_named_by_its_directory() {
        assert_eq!(
            known_for(b"/var/lib/bluetooth/AA:BB/info").unwrap().prefix,
            "/var/lib/bluetooth"
        );
        assert!(known_for(b"/var/lib/bluetoothx").is_none());
        assert_eq!(
            known_for(b"/etc/ssh/ssh_host_ed25519_key").unwrap().unit,
            Unit::EachFile
        );
    }
}
