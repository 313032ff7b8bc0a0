//! Project automation: `cargo xtask <task>`. Kept in Rust, in the workspace, so that the
//! README's commands need nothing but cargo on a fresh machine.

mod bench;
mod deps;
mod nix_checks;
mod test;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  demo            boot the encrypted VM twice and show the wipe (README's first command)
  test [--ci]     the whole test suite: unit, btrfs, Nix checks and VM scenarios
  vm <scenario>   one VM scenario (two-boot, power-cut, retention, bad-config, all)
  nix-checks      parse, lint and format-check the Nix files; module evaluation tests
  bench <name>    a benchmark: rollback, migrate, diff, diff-fuzz (see docs/benchmarks.md)
  deps            install what the tests need (apt packages, cargo tools)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test::run(&args[1..]),
        Some("demo") => vm::demo(&args[1..]),
        Some("vm") => vm::run(&args[1..]),
        Some("nix-checks") => nix_checks::run(&args[1..]).map(|_| ()),
        Some("deps") => deps::ensure_all(),
        Some("bench") => bench::run(&args[1..]),
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask's parent directory).
pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}
