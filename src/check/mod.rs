//! `rasa check`: validate a manifest (at build time, in the Nix sandbox) or a running machine.

mod manifest;
mod system;

use anyhow::Result;

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  rasa check manifest /etc/rasa/manifest.json   # what the NixOS module runs at build time
  rasa check system                             # is this machine ready to wipe / at boot?
  rasa check system --json")]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Validate a manifest file: schema, version, paths, duplicates, users and groups by name.
    /// Needs no root, devices or network (it runs in the Nix build sandbox).
    /// Exit codes: 0 valid, 4 problems (one line each), 3 unreadable or not JSON.
    Manifest(manifest::Args),
    /// Inspect this machine: filesystem, subvolumes, blank, storage, manifest entries, old roots.
    /// Prints ✓/✗ with the fix for each ✗. Exit codes: 0 all good, 4 something is wrong.
    System(system::Args),
}

/// Every problem of a manifest, by the rules `rasa check manifest` applies: what `migrate`
/// validates its manifest with.
pub fn run(args: Args) -> Result<u8> {
    match args.command {
        Command::Manifest(args) => manifest::run(args),
        Command::System(args) => system::run(args),
    }
}
