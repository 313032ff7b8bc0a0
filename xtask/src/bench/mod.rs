//! `cargo xtask bench <name>`: benchmarks against what users would otherwise run, measured in
//! one run on loop-file btrfs. Not tests: they print a table for docs/benchmarks.md.

mod diff;
mod migrate;
mod rollback;
mod watch;

use anyhow::{bail, Result};

pub fn run(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("rollback") => rollback::run(&args[1..]),
        Some("migrate") => migrate::run(&args[1..]),
        Some("diff") => diff::run(&args[1..]),
        Some("watch") => watch::run(&args[1..]),
        Some("diff-fuzz") => diff::fuzz(&args[1..]),
        _ => bail!("usage: cargo xtask bench <rollback|migrate|diff|diff-fuzz|watch>"),
    }
}
