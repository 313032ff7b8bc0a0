//! Installing what the tests and the demo need, so a fresh machine works with one command.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Debian packages the Rust tests need (btrfs fixtures, attribute checks, benchmarks' peers).
pub const TEST_PACKAGES: &[&str] = &[
    "btrfs-progs",
    "attr",
    "libcap2-bin",
    "acl",
    "rsync",
    "e2fsprogs",
    "util-linux",
    // tests/diff.rs parses `rasa diff --nix` with nix-instantiate --parse.
    "nix-bin",
];
/// Debian packages the Nix checks need.
pub const NIX_PACKAGES: &[&str] = &["nix-bin"];

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// apt-get install whatever of `packages` is missing (running `apt-get update` first).
///
/// Installing can remove a package already there: this kind of machine ships qemu-utils from
/// bookworm-backports, which conflicts with Debian 12's qemu-system-x86, so apt removes it to
/// install the emulator. Hence a second round for whatever is missing after the first (apt then
/// installs the matching qemu-utils). Naming both in one call would fail instead ("held broken
/// packages"), because apt will not downgrade an installed package on its own.
pub fn apt(packages: &[&str]) -> Result<()> {
    let mut updated = false;
    for _round in 0..2 {
        let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if !nix_is_root() {
            bail!(
                "missing Debian packages: {} (run as root, or `apt-get install {}`)",
                missing.join(" "),
                missing.join(" ")
            );
        }
        eprintln!("xtask: installing {}", missing.join(" "));
        if !updated {
            run(Command::new("apt-get").arg("update").arg("-qq"))?;
            updated = true;
        }
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        bail!(
            "apt could not install {} together with the rest",
            missing.join(" ")
        );
    }
    Ok(())
}

/// `cargo install --locked` a tool unless it is already on PATH.
pub fn cargo_tool(binary: &str, krate: &str, version: &str) -> Result<()> {
    if Command::new(binary)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        return Ok(());
    }
    eprintln!("xtask: installing {krate} {version} with cargo");
    run(Command::new("cargo").args([
        "install",
        "--locked",
        "--quiet",
        krate,
        "--version",
        version,
    ]))
}

pub fn nix_is_root() -> bool {
    // /proc/self belongs to the process's effective user: no FFI needed to ask.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

pub fn ensure_all() -> Result<()> {
    apt(TEST_PACKAGES)?;
    apt(NIX_PACKAGES)?;
    crate::nix_checks::install_tools()?;
    crate::vm::install_deps()?;
    Ok(())
}
