//! `cargo xtask test`: the whole suite, as the README gives it and CI runs it.

use std::process::Command;

use anyhow::{bail, Result};

use crate::{deps, nix_checks, project_root, vm};

pub fn run(args: &[String]) -> Result<()> {
    let ci =
        args.iter().any(|a| a == "--ci") || std::env::var_os("CI").is_some_and(|v| v == "true");
    let skip_vm = args.iter().any(|a| a == "--no-vm");
    let root = project_root();
    deps::apt(deps::TEST_PACKAGES)?;

    let skipped_log = root.join("target/tmp/rasa-skipped.txt");
    let _ = std::fs::remove_file(&skipped_log);

    let mut suites: Vec<(&str, bool)> = Vec::new();

    eprintln!("== cargo fmt --check");
    let fmt_ok = Command::new("cargo")
        .args(["fmt", "--all", "--", "--check"])
        .current_dir(&root)
        .status()?
        .success();
    suites.push(("rustfmt", fmt_ok));

    eprintln!("== cargo test (with failpoints; btrfs tests need root)");
    let mut cargo = Command::new("cargo");
    cargo
        .args(["test", "--workspace", "--features", "rasa/failpoints"])
        .current_dir(&root);
    if ci {
        // In CI every privileged test must run: a skip there is a failure.
        cargo.env("RASA_REQUIRE_PRIVILEGED_TESTS", "1");
    }
    suites.push(("cargo test", cargo.status()?.success()));

    eprintln!("== Nix checks");
    let (np, nf, ns) = nix_checks::run(&[])?;
    suites.push(("nix checks", nf == 0));

    let (vp, vf, vs) = if skip_vm {
        println!("vm: SKIPPED: --no-vm given");
        (0, 0, 1)
    } else {
        eprintln!("== VM scenarios");
        vm::run_all_for_tests()?
    };
    suites.push(("vm scenarios", vf == 0));

    if let Ok(skips) = std::fs::read_to_string(&skipped_log) {
        if !skips.trim().is_empty() {
            println!("\nSkipped tests (with reasons):");
            for line in skips.lines() {
                println!("  SKIPPED {line}");
            }
        }
    }
    println!("\nSummary:");
    for (name, ok) in &suites {
        println!("  {:<14} {}", name, if *ok { "ok" } else { "FAILED" });
    }
    println!("nix checks: {np} passed, {nf} failed, {ns} skipped");
    println!("vm scenarios: {vp} passed, {vf} failed, {vs} skipped");
    let failed = suites.iter().filter(|(_, ok)| !ok).count();
    if failed > 0 {
        bail!("{failed} suite(s) failed");
    }
    Ok(())
}
