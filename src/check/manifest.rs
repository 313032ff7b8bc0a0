//! `rasa check manifest FILE`: every problem of a manifest, one message each.
//!
//! It runs in the Nix build sandbox, so it reads the file and nothing else: users and groups
//! are checked for being names, not looked up (the build machine's passwd is not the target's).

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use crate::error::{exit, refuse};
use crate::manifest::{Manifest, VERSION};

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  rasa check manifest result/etc/rasa/manifest.json
  rasa check manifest --json manifest.json")]
pub struct Args {
    /// The manifest file to validate.
    pub file: PathBuf,
    /// Print `{\"file\", \"valid\", \"problems\": [..]}` as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    file: &'a str,
    valid: bool,
    problems: &'a [String],
}

pub fn run(args: Args) -> Result<u8> {
    let text = std::fs::read_to_string(&args.file).map_err(|e| {
        refuse(
            format!("cannot read manifest {}: {e}", args.file.display()),
            "pass the path of the manifest.json the NixOS module generates",
        )
    })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        refuse(
            format!("{} is not valid JSON: {e}", args.file.display()),
            "regenerate it from the NixOS configuration, or fix the file by hand",
        )
    })?;
    let problems = problems_in(&value);
    let file = args.file.display().to_string();
    if args.json {
        let report = Report {
            file: &file,
            valid: problems.is_empty(),
            problems: &problems,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if problems.is_empty() {
        println!("{file}: valid manifest (version {VERSION})");
    } else {
        for p in &problems {
            println!("{file}: {p}");
        }
        println!(
            "{file}: {} problem{} found",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
    }
    Ok(if problems.is_empty() {
        exit::OK
    } else {
        exit::PROBLEMS
    })
}

/// Every problem of a parsed JSON document, in the order of the document.
pub fn problems_in(value: &serde_json::Value) -> Vec<String> {
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return vec![format!(
                "version {v} is not supported: this rasa reads manifest version {VERSION} \
                 (use the rasa of the same flake revision as the module)"
            )]
        }
        None => return vec!["\"version\" is missing or not a number".into()],
    }
    let manifest: Manifest = match serde_json::from_value(value.clone()) {
        Ok(m) => m,
        Err(e) => return vec![format!("does not match the version-{VERSION} schema: {e}")],
    };
    problems(&manifest)
}

/// The problems of a parsed manifest, as lines (the rules are in [`crate::rules`]).
pub fn problems(manifest: &Manifest) -> Vec<String> {
    crate::rules::validate_manifest(manifest)
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Vec<String> {
        problems_in(&serde_json::from_str(text).unwrap())
    }

    #[test]
    fn committed_example_is_valid() {
        assert_eq!(
            check(include_str!("../../docs/manifest.example.json")),
            Vec::<String>::new()
        );
    }

    #[test]
    fn every_problem_has_its_own_message() {
        let text = r#"{"version": 1,
  "rollback": {"device": "cryptroot", "root": "root", "blank": "a/b", "oldRoots": "old_roots",
    "persist": "persist", "keep": 5, "keepDays": 7},
  "entries": [
    {"storageRoot": "/persist", "path": "/var/lib/../etc", "kind": "directory", "user": "root", "group": "root", "mode": "0755"},
    {"storageRoot": "/persist", "path": "/var/lib/nixos", "kind": "directory", "user": "root", "group": "root", "mode": "0755"},
    {"storageRoot": "/persist", "path": "/var/lib/nixos", "kind": "directory", "user": "root", "group": "root", "mode": "0755"},
    {"storageRoot": "/persist/home", "path": "/var/lib/nixos/uid-map", "kind": "file", "user": "root", "group": "root", "mode": "0755"},
    {"storageRoot": "/persist", "path": "/nix/store", "kind": "directory", "user": "root", "group": "root", "mode": "0755"},
    {"storageRoot": "/persist", "path": "/boot/loader", "kind": "directory", "user": "root", "group": "root", "mode": "0755"},
    {"storageRoot": "/persist", "path": "/persist/etc", "kind": "directory", "user": "root", "group": "root", "mode": "0755"},
    {"storageRoot": "/persist", "path": "home/alice", "kind": "directory", "user": "1000", "group": "users", "mode": "0700"},
    {"storageRoot": "/persist", "path": "/home/bob/", "kind": "directory", "user": "bob", "group": "100", "mode": "rwx"},
    {"storageRoot": "/persist", "path": "/etc//ssh", "kind": "directory", "user": "Bad Name", "group": "root", "mode": "0755"}
  ],
  "diffIgnore": ["/var/cache/**", "relative/**", "/bad/[z-a]"]}"#;
        expect_test::expect![[r#"
            rollback.blank: the blank subvolume name "a/b" contains '/': it must be one plain name at the top level of the filesystem
            rollback.device: "cryptroot" is not an absolute path such as /dev/mapper/cryptroot
            entries[0] (/var/lib/../etc): path "/var/lib/../etc" contains '..'
            entries[2] (/var/lib/nixos): duplicate of entries[1]
            entries[4] (/nix/store): /nix/store is under /nix or /boot, which survive every boot by themselves
            entries[5] (/boot/loader): /boot/loader is under /nix or /boot, which survive every boot by themselves
            entries[7] (home/alice): path "home/alice" is not absolute
            entries[7] (home/alice): user "1000" is a number; give users and groups by name
            entries[8] (/home/bob/): path "/home/bob/" ends with '/' (write it without)
            entries[8] (/home/bob/): group "100" is a number; give users and groups by name
            entries[8] (/home/bob/): mode "rwx" is not an octal mode such as "0755"
            entries[9] (/etc//ssh): path "/etc//ssh" contains '//' (not normalized)
            entries[9] (/etc//ssh): user "Bad Name" is not a valid user or group name
            entries[3] (/var/lib/nixos/uid-map): inside the directory /var/lib/nixos that entries[1] persists in /persist, but stored in /persist/home; keep nested paths in one storage root
            entries[6] (/persist/etc): /persist/etc is inside the storage root /persist; list the path as it appears on /
            storageRoot "/persist/home": is inside the storage root /persist; storage roots must not contain each other
            diffIgnore[1]: "relative/**" is not an absolute pattern
            diffIgnore[2]: "/bad/[z-a]" is not a valid glob: error parsing glob '/bad/[z-a]': invalid range; 'z' > 'a'
        "#]]
        .assert_eq(&(check(text).join("\n") + "\n"));
    }

    #[test]
    fn version_and_schema_problems() {
        assert_eq!(
            check(r#"{"version": 7}"#),
            vec!["version 7 is not supported: this rasa reads manifest version 1 (use the rasa of the same flake revision as the module)"]
        );
        assert_eq!(
            check(r#"{"entries": []}"#),
            vec!["\"version\" is missing or not a number"]
        );
        let schema = check(r#"{"version": 1, "rollback": {}, "entries": []}"#);
        assert_eq!(schema.len(), 1);
        assert!(
            schema[0].starts_with("does not match the version-1 schema: missing field"),
            "{schema:?}"
        );
    }
}
