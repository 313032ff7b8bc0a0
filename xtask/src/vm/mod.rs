//! The local QEMU harness: an encrypted (LUKS2) btrfs disk booted under QEMU TCG with Debian's
//! kernel, a dracut systemd initrd holding the real `rasa rollback` unit, and a busybox stage 2
//! that reports what survived. See docs/vm-harness.md.

mod artefacts;
mod qemu;
mod scenarios;

use std::time::Instant;

use anyhow::{bail, Result};

use crate::{deps, project_root};

/// Debian packages the harness needs on the host.
pub const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils",
    "linux-image-amd64",
    "dracut-core",
    "busybox-static",
    "btrfs-progs",
    "cryptsetup-bin",
    "dmsetup",
    "zstd",
    "cpio",
    "kmod",
];

pub fn install_deps() -> Result<()> {
    deps::apt(VM_PACKAGES)
}

/// `cargo xtask demo`: the two-boot scenario, narrated for a person.
pub fn demo(_args: &[String]) -> Result<()> {
    install_deps()?;
    let mut artefacts = artefacts::Artefacts::prepare(&project_root())?;
    let report = scenarios::two_boot(&mut artefacts, true)?;
    report.print();
    if !report.passed() {
        bail!("the demo's checks failed (console logs in build/vm/logs)");
    }
    Ok(())
}

const USAGE: &str =
    "usage: cargo xtask vm <two-boot|bad-config|retention|power-cut ...|all|bench-boot [N]>";

/// `cargo xtask vm <scenario>`.
pub fn run(args: &[String]) -> Result<()> {
    let Some(name) = args.first() else {
        bail!("{USAGE}");
    };
    install_deps()?;
    let started = Instant::now();
    let mut artefacts = artefacts::Artefacts::prepare(&project_root())?;
    if name == "bench-boot" {
        let rounds = args.get(1).map(|n| n.parse()).transpose()?.unwrap_or(3);
        return scenarios::bench_boot(&mut artefacts, rounds);
    }
    let names: Vec<&str> = if name == "all" {
        scenarios::ALL.to_vec()
    } else {
        args.iter().map(String::as_str).collect()
    };
    if let Some(unknown) = names.iter().find(|n| !scenarios::ALL.contains(n)) {
        bail!("unknown scenario {unknown:?}; {USAGE}");
    }
    let (passed, failed) = run_scenarios(&mut artefacts, &names)?;
    println!(
        "vm: {passed} passed, {failed} failed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} VM scenario(s) failed (console logs in build/vm/logs)");
    }
    Ok(())
}

fn run_scenarios(artefacts: &mut artefacts::Artefacts, names: &[&str]) -> Result<(usize, usize)> {
    let (mut passed, mut failed) = (0, 0);
    for name in names {
        let report = match scenarios::run(artefacts, name) {
            Ok(report) => report,
            Err(e) => {
                println!("vm {name}: FAIL: the harness could not run it: {e:#}");
                failed += 1;
                continue;
            }
        };
        report.print();
        if report.passed() {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    Ok((passed, failed))
}

/// Every scenario, for `cargo xtask test`. Returns (passed, failed, skipped).
pub fn run_all_for_tests() -> Result<(usize, usize, usize)> {
    if !deps::nix_is_root() {
        println!(
            "vm: SKIPPED: the VM harness needs root (apt, dracut, loop-free but root-owned /boot)"
        );
        return Ok((0, 0, 1));
    }
    install_deps()?;
    let started = Instant::now();
    let mut artefacts = artefacts::Artefacts::prepare(&project_root())?;
    let (passed, failed) = run_scenarios(&mut artefacts, scenarios::ALL)?;
    println!(
        "vm: {passed} passed, {failed} failed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok((passed, failed, 0))
}
