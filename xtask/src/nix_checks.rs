//! Checks of the Nix side that run on this machine, where nothing can be built (no nixpkgs):
//! every tracked .nix file parses, deadnix finds nothing unused, the flake's formatter
//! (nixpkgs-fmt) would change nothing, flake.lock agrees with flake.nix, and the module
//! evaluation tests in tests/nix pass.
//! The module tests need the real nixpkgs `lib` and impermanence from local checkouts named by
//! RASA_NIXPKGS_LIB and RASA_IMPERMANENCE; without them they are reported as SKIPPED.
//! `nix flake check` (VM tests, the package build) runs in the GitHub workflow.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{deps, project_root};

/// The formatter the flake declares (`formatter = pkgs.nixpkgs-fmt`). alejandra's crate is a
/// library only, so nixpkgs-fmt is the one that installs with cargo.
const FORMATTER: (&str, &str, &str) = ("nixpkgs-fmt", "nixpkgs-fmt", "1.3.0");
const DEADNIX: (&str, &str, &str) = ("deadnix", "deadnix", "1.3.1");

pub fn install_tools() -> Result<()> {
    deps::apt(deps::NIX_PACKAGES)?;
    for (binary, krate, version) in [FORMATTER, DEADNIX] {
        // nixpkgs-fmt --version exits 1, which cargo_tool would take for "missing".
        if !on_path(binary) {
            deps::cargo_tool(binary, krate, version)?;
        }
    }
    Ok(())
}

fn on_path(binary: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(binary).is_file()))
}

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    skipped: usize,
}

impl Tally {
    fn record(&mut self, name: &str, outcome: Outcome) {
        match outcome {
            Outcome::Pass => {
                self.passed += 1;
                println!("nix-checks: PASS {name}");
            }
            Outcome::Fail(why) => {
                self.failed += 1;
                println!("nix-checks: FAIL {name}\n{}", indent(&why));
            }
            Outcome::Skip(why) => {
                self.skipped += 1;
                println!("nix-checks: SKIPPED {name}: {why}");
                record_skip(name, &why);
            }
        }
    }
}

/// Also list the skip where `cargo xtask test` collects skips for its closing summary.
fn record_skip(name: &str, why: &str) {
    use std::io::Write;
    let log = project_root().join("target/tmp/rasa-skipped.txt");
    let _ = std::fs::create_dir_all(log.parent().unwrap());
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = writeln!(file, "nix-checks: {name}: {why}");
    }
}

enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

fn indent(text: &str) -> String {
    text.trim_end()
        .lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Returns (passed, failed, skipped) counts.
pub fn run(_args: &[String]) -> Result<(usize, usize, usize)> {
    install_tools()?;
    let root = project_root();
    let files = tracked_nix_files(&root)?;
    if files.is_empty() {
        bail!("no tracked .nix files found under {}", root.display());
    }
    let mut tally = Tally::default();

    for file in &files {
        tally.record(&format!("parse {file}"), parse(&root, file));
    }
    tally.record("deadnix", deadnix(&root, &files));
    tally.record(
        &format!("{} --check", FORMATTER.0),
        format_check(&root, &files),
    );
    tally.record("flake.lock matches flake.nix", lock_matches_inputs(&root));
    tally.record(
        "flake.lock pins impermanence's narHash",
        impermanence_nar_hash(&root),
    );
    for (name, outcome) in module_tests(&root) {
        tally.record(&name, outcome);
    }
    tally.record(
        "docs/options.md is what the module declares",
        options_doc(&root),
    );

    println!(
        "nix-checks: {} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.skipped
    );
    Ok((tally.passed, tally.failed, tally.skipped))
}

/// Tracked and new-but-not-ignored .nix files, so a file cannot dodge the checks by not being
/// committed yet.
fn tracked_nix_files(root: &Path) -> Result<Vec<String>> {
    let out = Command::new("git")
        .args([
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
            "--",
            "*.nix",
        ])
        .current_dir(root)
        .output()
        .context("running git ls-files")?;
    if !out.status.success() {
        bail!(
            "git ls-files failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut files: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|f| root.join(f).is_file())
        .map(str::to_owned)
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// What a command printed, kept apart: stdout is the answer a check parses, stderr is only for
/// the person reading a failure. Nix prints warnings on stderr that depend on the machine (for
/// example "the group 'nixbld' specified in 'build-users-group' does not exist" on a machine
/// without that group), so parsing the two mixed together passes on one machine and fails on a
/// fresh one.
struct Captured {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Captured {
    /// Both streams, for a failure message.
    fn both(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

fn run_captured(cmd: &mut Command) -> Result<Captured> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(Captured {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn outcome(result: Result<Captured>) -> Outcome {
    match result {
        Ok(c) if c.ok => Outcome::Pass,
        Ok(c) => Outcome::Fail(c.both()),
        Err(e) => Outcome::Fail(format!("{e:#}")),
    }
}

fn parse(root: &Path, file: &str) -> Outcome {
    outcome(run_captured(
        Command::new("nix-instantiate")
            .args(["--parse", file])
            .current_dir(root),
    ))
}

fn deadnix(root: &Path, files: &[String]) -> Outcome {
    // --fail makes findings an error; the output names each unused binding and where.
    outcome(run_captured(
        Command::new(DEADNIX.0)
            .args(["--fail", "--"])
            .args(files)
            .current_dir(root),
    ))
}

fn format_check(root: &Path, files: &[String]) -> Outcome {
    match run_captured(
        Command::new(FORMATTER.0)
            .arg("--check")
            .args(files)
            .current_dir(root),
    ) {
        Ok(c) if c.ok => Outcome::Pass,
        Ok(c) => Outcome::Fail(format!(
            "{}\nrun `{} {}` to format them",
            c.both(),
            FORMATTER.0,
            files.join(" ")
        )),
        Err(e) => Outcome::Fail(format!("{e:#}")),
    }
}

fn read_json(root: &Path, file: &str) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(root.join(file)).with_context(|| format!("reading {file}"))?;
    serde_json::from_str(&text).with_context(|| format!("{file} is not JSON"))
}

/// flake.lock was written by hand (Nix cannot fetch here), so check what `nix flake lock` would
/// produce: version 7, a node per input whose `original` is what flake.nix says, complete
/// `locked` pins, the declared `follows`, and follows paths that lead to nodes.
fn lock_matches_inputs(root: &Path) -> Outcome {
    match check_lock(root) {
        Ok(problems) if problems.is_empty() => Outcome::Pass,
        Ok(problems) => Outcome::Fail(problems.join("\n")),
        Err(e) => Outcome::Fail(format!("{e:#}")),
    }
}

fn check_lock(root: &Path) -> Result<Vec<String>> {
    use serde_json::Value;
    let lock = read_json(root, "flake.lock")?;
    let evaluated = run_captured(
        Command::new("nix-instantiate")
            .args([
                "--eval",
                "--strict",
                "--json",
                "-E",
                "(import ./flake.nix).inputs",
            ])
            .current_dir(root),
    )?;
    if !evaluated.ok {
        bail!("reading the inputs of flake.nix: {}", evaluated.both());
    }
    let inputs: Value = serde_json::from_str(&evaluated.stdout).with_context(|| {
        format!(
            "the inputs of flake.nix are not JSON on stdout: {}",
            evaluated.both()
        )
    })?;
    let nodes = &lock["nodes"];
    let mut problems = Vec::new();
    if lock["version"] != 7 || lock["root"] != "root" {
        problems.push("expected \"version\": 7 and \"root\": \"root\"".to_owned());
    }
    let keys = |v: &Value| -> Vec<String> {
        v.as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    if keys(&inputs) != keys(&nodes["root"]["inputs"]) {
        problems.push(format!(
            "flake.nix declares inputs {:?}, the lock's root has {:?}",
            keys(&inputs),
            keys(&nodes["root"]["inputs"])
        ));
    }
    for (name, input) in inputs.as_object().into_iter().flatten() {
        let Some(node) = resolve(nodes, &nodes["root"]["inputs"][name]) else {
            problems.push(format!("input {name} has no node in the lock"));
            continue;
        };
        let url = input["url"].as_str().unwrap_or_default();
        let parts: Vec<&str> = url.trim_start_matches("github:").split('/').collect();
        let original = &nodes[&node]["original"];
        let spelled = (
            original["owner"].as_str(),
            original["repo"].as_str(),
            original["ref"].as_str(),
        );
        let wanted = (
            parts.first().copied(),
            parts.get(1).copied(),
            parts.get(2).copied(),
        );
        if !url.starts_with("github:") || original["type"] != "github" || spelled != wanted {
            problems.push(format!(
                "input {name}: flake.nix says {url}, the lock's original is {original}"
            ));
        }
        for (sub, spec) in input["inputs"].as_object().into_iter().flatten() {
            let follows = spec["follows"].as_str().unwrap_or_default();
            if nodes[&node]["inputs"][sub] != Value::from(vec![follows]) {
                problems.push(format!(
                    "{name}.inputs.{sub}.follows = \"{follows}\", but the lock has {}",
                    nodes[&node]["inputs"][sub]
                ));
            }
        }
    }
    for (name, node) in nodes.as_object().into_iter().flatten() {
        for (input, target) in node["inputs"].as_object().into_iter().flatten() {
            if resolve(nodes, target).is_none() {
                problems.push(format!("{name}.inputs.{input} = {target} leads to no node"));
            }
        }
        if name == "root" {
            continue;
        }
        let locked = &node["locked"];
        let rev_ok = locked["rev"]
            .as_str()
            .is_some_and(|r| r.len() == 40 && r.bytes().all(|b| b.is_ascii_hexdigit()));
        let hash_ok = locked["narHash"]
            .as_str()
            .is_some_and(|h| h.starts_with("sha256-") && h.len() == 51);
        if !rev_ok || !hash_ok || !locked["lastModified"].is_u64() || locked["type"] != "github" {
            problems.push(format!("node {name}: incomplete pin {locked}"));
        }
    }
    Ok(problems)
}

/// The node an input points at: a node name, or a follows path of input names from the root.
fn resolve(nodes: &serde_json::Value, target: &serde_json::Value) -> Option<String> {
    let name = match target {
        serde_json::Value::String(name) => name.clone(),
        serde_json::Value::Array(steps) => {
            let mut node = "root".to_owned();
            for step in steps {
                node = resolve(nodes, &nodes[&node]["inputs"][step.as_str()?])?;
            }
            node
        }
        _ => return None,
    };
    nodes.get(&name).map(|_| name)
}

/// The lock's impermanence narHash against `nix hash path` of the RASA_IMPERMANENCE checkout.
fn impermanence_nar_hash(root: &Path) -> Outcome {
    let dir = match checkout("RASA_IMPERMANENCE", "nixos.nix") {
        Ok(dir) => dir,
        Err(why) => return Outcome::Skip(why),
    };
    let lock = match read_json(root, "flake.lock") {
        Ok(lock) => lock,
        Err(e) => return Outcome::Fail(format!("{e:#}")),
    };
    let pinned = &lock["nodes"]["impermanence"]["locked"];
    let (Some(want), Some(rev)) = (pinned["narHash"].as_str(), pinned["rev"].as_str()) else {
        return Outcome::Fail("flake.lock has no impermanence narHash and rev".into());
    };
    let hashed = run_captured(
        Command::new("nix")
            .args([
                "--extra-experimental-features",
                "nix-command",
                "hash",
                "path",
            ])
            .arg(&dir),
    );
    match hashed {
        Ok(c) if c.ok => {
            let got = c.stdout.trim();
            if got == want {
                Outcome::Pass
            } else {
                // A checkout of another revision hashes differently, which proves nothing.
                Outcome::Skip(format!(
                    "{} hashes to {got}, the lock pins {want} for rev {rev}: \
                     point RASA_IMPERMANENCE at a tree of that revision (git archive {rev})",
                    dir.display()
                ))
            }
        }
        Ok(c) => Outcome::Fail(c.both()),
        Err(e) => Outcome::Fail(format!("{e:#}")),
    }
}

/// A local checkout named by an environment variable, or why it cannot be used.
fn checkout(var: &str, must_contain: &str) -> std::result::Result<PathBuf, String> {
    let Some(dir) = std::env::var_os(var) else {
        return Err(format!("{var} is not set"));
    };
    let dir = PathBuf::from(dir);
    if dir.join(must_contain).exists() {
        Ok(dir)
    } else {
        Err(format!("{var}={} has no {must_contain}", dir.display()))
    }
}

/// The module evaluation tests (tests/nix/run.nix), each reported on its own.
fn module_tests(root: &Path) -> Vec<(String, Outcome)> {
    let name = "module evaluation tests (tests/nix)";
    let lib = checkout("RASA_NIXPKGS_LIB", "lib/default.nix");
    let impermanence = checkout("RASA_IMPERMANENCE", "nixos.nix");
    let tool = root.join("../shared/tools/nixos-eval/default.nix");
    let (lib, impermanence) = match (lib, impermanence) {
        (Ok(lib), Ok(imp)) => (lib, imp),
        (lib, imp) => {
            let mut why: Vec<String> = [lib.err(), imp.err()].into_iter().flatten().collect();
            why.push(
                "set RASA_NIXPKGS_LIB to a checkout of nix-community/nixpkgs.lib and \
                 RASA_IMPERMANENCE to one of nix-community/impermanence (in CI these run in \
                 `nix flake check` instead)"
                    .into(),
            );
            return vec![(name.into(), Outcome::Skip(why.join("; ")))];
        }
    };
    if !tool.is_file() {
        return vec![(
            name.into(),
            Outcome::Skip(format!("{} is missing", tool.display())),
        )];
    }
    let result = run_captured(
        Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json", "tests/nix/run.nix"])
            .arg("--arg")
            .arg("nixpkgsLib")
            .arg(lib.join("lib"))
            .arg("--arg")
            .arg("impermanence")
            .arg(&impermanence)
            .arg("--arg")
            .arg("nixosEval")
            .arg(tool.parent().unwrap())
            .current_dir(root),
    );
    let captured = match result {
        Ok(c) if c.ok => c,
        Ok(c) => return vec![(name.into(), Outcome::Fail(c.both()))],
        Err(e) => return vec![(name.into(), Outcome::Fail(format!("{e:#}")))],
    };
    let (mut results, manifests) = match parse_results(&captured.stdout) {
        Ok(parsed) => parsed,
        Err(e) => {
            return vec![(
                name.into(),
                Outcome::Fail(format!("{e:#}\n{}", captured.both())),
            )]
        }
    };
    results.extend(check_manifests(root, &manifests));
    results
}

/// `rasa check manifest` (the binary built from this tree) on each manifest a module test
/// rendered, as the build of a NixOS system does in the manifest's checkPhase.
fn check_manifests(root: &Path, manifests: &[(String, String)]) -> Vec<(String, Outcome)> {
    if manifests.is_empty() {
        return Vec::new();
    }
    let named = |case: &str| format!("module: {case}: rasa check manifest");
    let built = run_captured(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["build", "--quiet", "-p", "rasa", "--bin", "rasa"])
            .current_dir(root),
    );
    if let Err(why) = match built {
        Ok(c) if c.ok => Ok(()),
        Ok(c) => Err(c.both()),
        Err(e) => Err(format!("{e:#}")),
    } {
        let why = format!("building rasa for `rasa check manifest` failed:\n{why}");
        return manifests
            .iter()
            .map(|(case, _)| (named(case), Outcome::Fail(why.clone())))
            .collect();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let rasa = target.join("debug/rasa");
    let dir = target.join("tmp/nix-manifests");
    manifests
        .iter()
        .enumerate()
        .map(|(i, (case, text))| {
            let file = dir.join(format!("{i}.json"));
            let written = std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(&file, text))
                .with_context(|| format!("writing {}", file.display()));
            let result = written.and_then(|()| {
                run_captured(Command::new(&rasa).args(["check", "manifest"]).arg(&file))
            });
            let outcome = match result {
                Ok(c) if c.ok => Outcome::Pass,
                Ok(c) => Outcome::Fail(format!("{}\nthe manifest:\n{text}", c.both())),
                Err(e) => Outcome::Fail(format!("{e:#}")),
            };
            (named(case), outcome)
        })
        .collect()
}

/// docs/options.md against tests/nix/options-doc.nix (lib.optionAttrSetToDocList over the
/// module's options); with RASA_UPDATE_DOCS=1 it is rewritten instead.
fn options_doc(root: &Path) -> Outcome {
    let lib = match checkout("RASA_NIXPKGS_LIB", "lib/default.nix") {
        Ok(lib) => lib,
        Err(why) => return Outcome::Skip(format!("{why}: the nixpkgs lib generates the document")),
    };
    let tool = root.join("../shared/tools/nixos-eval");
    if !tool.join("default.nix").is_file() {
        return Outcome::Skip(format!("{} is missing", tool.display()));
    }
    let generated = run_captured(
        Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json", "tests/nix/options-doc.nix"])
            .arg("--arg")
            .arg("nixpkgsLib")
            .arg(lib.join("lib"))
            .arg("--arg")
            .arg("nixosEval")
            .arg(&tool)
            .current_dir(root),
    );
    let text = match generated {
        Ok(c) if c.ok => match serde_json::from_str::<String>(&c.stdout) {
            Ok(text) => text,
            Err(e) => {
                return Outcome::Fail(format!("tests/nix/options-doc.nix: {e}\n{}", c.both()))
            }
        },
        Ok(c) => return Outcome::Fail(c.both()),
        Err(e) => return Outcome::Fail(format!("{e:#}")),
    };
    let path = root.join("docs/options.md");
    if std::env::var_os("RASA_UPDATE_DOCS").is_some() {
        return match std::fs::write(&path, &text) {
            Ok(()) => Outcome::Pass,
            Err(e) => Outcome::Fail(format!("writing {}: {e}", path.display())),
        };
    }
    match std::fs::read_to_string(&path) {
        Ok(committed) if committed == text => Outcome::Pass,
        Ok(_) | Err(_) => Outcome::Fail(
            "docs/options.md is not what the module declares: regenerate it with \
             RASA_UPDATE_DOCS=1 cargo xtask nix-checks (with RASA_NIXPKGS_LIB set)"
                .into(),
        ),
    }
}

/// Each case's outcome, and the manifests to check as (case name, text).
type Parsed = (Vec<(String, Outcome)>, Vec<(String, String)>);

/// tests/nix/run.nix prints a JSON list of `{name, status, detail}`, some with the `manifest`
/// text they rendered.
fn parse_results(json: &str) -> Result<Parsed> {
    let value: serde_json::Value = serde_json::from_str(json).context("reading the results")?;
    let items = value.as_array().context("the results are not a list")?;
    let mut results = Vec::new();
    let mut manifests = Vec::new();
    for item in items {
        let field = |key: &str| item.get(key).and_then(|v| v.as_str()).unwrap_or_default();
        let name = format!("module: {}", field("name"));
        let detail = field("detail").to_owned();
        let outcome = match field("status") {
            "pass" => Outcome::Pass,
            "skip" => Outcome::Skip(detail),
            "fail" => Outcome::Fail(detail),
            other => bail!("unknown status {other:?} for {name}"),
        };
        if let Some(text) = item.get("manifest").and_then(|v| v.as_str()) {
            manifests.push((field("name").to_owned(), text.to_owned()));
        }
        results.push((name, outcome));
    }
    Ok((results, manifests))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nix warns on stderr about the machine it runs on (a fresh machine has no `nixbld` group),
    /// and the warning has nothing to do with the answer on stdout. Force such a warning
    /// whatever this machine has, and the check must still read the inputs.
    #[test]
    fn the_lock_check_reads_stdout_only_whatever_nix_warns_on_stderr() {
        if !on_path("nix-instantiate") {
            panic!("nix-instantiate is not installed: `cargo xtask nix-checks` installs nix-bin");
        }
        // Only this test in the xtask crate touches the environment.
        std::env::set_var(
            "NIX_CONFIG",
            "build-users-group = rasa-test-group-that-does-not-exist",
        );
        let warned = run_captured(Command::new("nix-instantiate").args(["--eval", "-E", "1"]))
            .expect("nix-instantiate runs");
        assert!(
            warned.stderr.contains("does not exist"),
            "the test needs nix to warn on stderr, and it printed: {}",
            warned.both()
        );
        let problems = check_lock(&project_root()).expect("the lock check runs");
        assert!(problems.is_empty(), "{problems:#?}");
    }
}
