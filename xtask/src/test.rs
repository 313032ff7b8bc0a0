//! `cargo xtask test`: the whole suite, as the README gives it and CI runs it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

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

    // Part of the toolchain this machine ships (rustup's default profile); a toolchain
    // without it cannot fetch it here (no network but crates.io), so that is a visible skip.
    let has_clippy = Command::new("cargo")
        .args(["clippy", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if has_clippy {
        eprintln!("== cargo clippy (warnings are errors)");
        let clippy_ok = Command::new("cargo")
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--features",
                "rasa/failpoints",
            ])
            .args(["--", "-D", "warnings"])
            .current_dir(&root)
            .status()?
            .success();
        suites.push(("clippy", clippy_ok));
    } else {
        println!("clippy: SKIPPED: `cargo clippy` is not installed with this toolchain");
    }

    // The Nix checks install nix-bin, which the xtask's own tests run; install it first so
    // that the order of the suites cannot decide whether a test finds its tools.
    nix_checks::install_tools()?;

    eprintln!("== cargo test (rasa with failpoints, and xtask; btrfs tests need root)");
    let mut cargo = Command::new("cargo");
    cargo
        .args(["test", "--workspace", "--features", "rasa/failpoints"])
        .current_dir(&root)
        .stdout(Stdio::piped());
    if ci {
        // In CI every privileged test must run: a skip there is a failure.
        cargo.env("RASA_REQUIRE_PRIVILEGED_TESTS", "1");
    }
    // Pass the output through, and count what ran for the closing line.
    let mut child = cargo.spawn()?;
    let (mut cp, mut cf) = (0usize, 0usize);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split([';', '.'])
                    .find_map(|part| part.trim().strip_suffix(word)?.trim().parse::<usize>().ok())
                    .unwrap_or(0)
            };
            cp += count("passed");
            cf += count("failed");
        }
    }
    suites.push(("cargo test", child.wait()?.success()));

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

    let skips = std::fs::read_to_string(&skipped_log).unwrap_or_default();
    // A skipped test returns early, so cargo counted it as passed: count it once, as skipped.
    // (The Nix checks list their skips in the same file, under their own name.)
    let cs = skips
        .lines()
        .filter(|l| !l.starts_with("nix-checks:"))
        .count();
    let cp = cp.saturating_sub(cs);
    {
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
    println!("  cargo tests:  {cp} passed, {cf} failed, {cs} skipped");
    println!("  nix checks:   {np} passed, {nf} failed, {ns} skipped");
    println!("  vm scenarios: {vp} passed, {vf} failed, {vs} skipped");
    println!(
        "tests: {} passed, {} failed, {} skipped",
        cp + np + vp,
        cf + nf + vf,
        cs + ns + vs
    );
    let failed = suites.iter().filter(|(_, ok)| !ok).count();
    if failed > 0 {
        bail!("{failed} suite(s) failed");
    }
    Ok(())
}
