//! Every Nix snippet in the documentation parses, so a user pasting one gets valid Nix.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use std::io::Write;

const DOCUMENTS: &[&str] = &[
    "README.md",
    "docs/guide.md",
    "docs/nixos.md",
    "docs/diff.md",
    "docs/migrate.md",
];

fn nix_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (number, line) in markdown.lines().enumerate() {
        match &mut current {
            None if line.trim_start() == "```nix" => current = Some((number + 1, String::new())),
            Some(_) if line.trim_start() == "```" => blocks.push(current.take().unwrap()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    blocks
}

#[test]
fn every_nix_snippet_in_the_docs_parses() {
    if Command::new("nix-instantiate")
        .arg("--version")
        .output()
        .is_err()
    {
        common::skip::<()>(
            "every_nix_snippet_in_the_docs_parses",
            "nix-instantiate not installed (apt-get install nix-bin)",
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    let mut failures = Vec::new();
    for document in DOCUMENTS {
        let Ok(text) = std::fs::read_to_string(root.join(document)) else {
            continue;
        };
        for (line, block) in nix_blocks(&text) {
            let mut child = Command::new("nix-instantiate")
                .args(["--parse", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(block.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            checked += 1;
            if !out.status.success() {
                failures.push(format!(
                    "{document}:{line}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
    }
    assert!(
        checked >= 5,
        "expected the guide's Nix snippets, found {checked}"
    );
    assert!(
        failures.is_empty(),
        "snippets that do not parse:\n{}",
        failures.join("\n")
    );
}
