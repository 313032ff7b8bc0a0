//! `cargo xtask bench <name>`: benchmarks against what users would otherwise run, measured in
//! one run on loop-file btrfs. Not tests: they print a table for docs/benchmarks.md.

mod diff;
mod migrate;
mod rollback;
mod watch;

use anyhow::{bail, Context, Result};

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

/// Run a bash command line for a benchmark's setup or measurement; its stdout, trimmed, or an
/// error with both streams.
pub(crate) fn sh(cmd: &str) -> Result<String> {
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Build rasa in release mode, as users run it; the path of the binary.
pub(crate) fn release_rasa() -> Result<std::path::PathBuf> {
    let root = crate::project_root();
    eprintln!("xtask: building rasa (release)");
    crate::deps::run(
        std::process::Command::new("cargo")
            .args(["build", "--release", "--quiet", "--bin", "rasa"])
            .current_dir(&root),
    )?;
    Ok(root.join("target/release/rasa"))
}
