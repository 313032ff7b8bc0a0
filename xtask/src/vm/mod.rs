//! The local QEMU harness: an encrypted (LUKS2) btrfs disk booted under QEMU TCG with Debian's
//! kernel, a dracut systemd initrd holding the real `rasa rollback` unit, and a busybox stage 2
//! that reports what survived. See docs/vm-harness.md.

mod artefacts;
mod qemu;
mod scenarios;

use std::time::Instant;

use anyhow::{bail, Result};

use artefacts::{Artefacts, Initrd};

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
    prepare_shared(&mut artefacts, &["two-boot"])?;
    let report = scenarios::two_boot(&artefacts, true)?;
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
        artefacts.base_disk()?;
        artefacts.build_initrds(&[Initrd::Rollback, Initrd::NoRollback])?;
        scenarios::ensure_booted_once(&artefacts)?;
        return scenarios::bench_boot(&artefacts, rounds);
    }
    let names: Vec<&str> = if name == "all" {
        scenarios::ALL.to_vec()
    } else {
        args.iter().map(String::as_str).collect()
    };
    if let Some(unknown) = names.iter().find(|n| !scenarios::ALL.contains(n)) {
        bail!("unknown scenario {unknown:?}; {USAGE}");
    }
    prepare_shared(&mut artefacts, &names)?;
    let (passed, failed) = run_scenarios(&artefacts, &names);
    println!(
        "vm: {passed} passed, {failed} failed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} VM scenario(s) failed (console logs in build/vm/logs)");
    }
    Ok(())
}

/// What the scenarios share: the provisioned disk, the initrds they use, and the disk after one
/// ordinary boot, which all but two-boot start from.
fn prepare_shared(artefacts: &mut Artefacts, names: &[&str]) -> Result<()> {
    artefacts.base_disk()?;
    let mut initrds = vec![Initrd::Rollback];
    if names.contains(&"bad-config") {
        initrds.push(Initrd::BadConfig);
    }
    if names.contains(&"power-cut") {
        initrds.push(Initrd::Failpoints);
    }
    artefacts.build_initrds(&initrds)?;
    if names.iter().any(|n| *n != "two-boot") {
        scenarios::ensure_booted_once(artefacts)?;
    }
    Ok(())
}

/// Runs the scenarios in two lanes, power-cut (the longest) beside the rest: a TCG guest keeps
/// one host core busy, and the machine has two. Reports print in order once all are done.
fn run_scenarios(artefacts: &Artefacts, names: &[&str]) -> (usize, usize) {
    let (long, rest): (Vec<&str>, Vec<&str>) = names.iter().partition(|n| **n == "power-cut");
    let lane = |names: Vec<&str>| -> Vec<(String, Result<scenarios::Report>)> {
        names
            .into_iter()
            .map(|name| (name.to_owned(), scenarios::run(artefacts, name)))
            .collect()
    };
    let mut results = std::thread::scope(|scope| {
        let other = scope.spawn(|| lane(long));
        let mut results = lane(rest);
        results.extend(other.join().expect("scenario thread panicked"));
        results
    });
    results.sort_by_key(|(name, _)| names.iter().position(|n| n == name));
    let (mut passed, mut failed) = (0, 0);
    for (name, result) in results {
        match result {
            Ok(report) => {
                report.print();
                if report.passed() {
                    passed += 1;
                } else {
                    failed += 1;
                }
            }
            Err(e) => {
                println!("vm {name}: FAIL: the harness could not run it: {e:#}");
                failed += 1;
            }
        }
    }
    (passed, failed)
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
    if let Err(e) = prepare_shared(&mut artefacts, scenarios::ALL) {
        println!("vm: FAIL: could not prepare the VM artefacts: {e:#}");
        return Ok((0, scenarios::ALL.len(), 0));
    }
    let (passed, failed) = run_scenarios(&artefacts, scenarios::ALL);
    println!(
        "vm: {passed} passed, {failed} failed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok((passed, failed, 0))
}
