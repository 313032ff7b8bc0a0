//! `rasa diff --prometheus FILE`: the diff as a node_exporter textfile-collector file, so a
//! fleet's Prometheus sees what each machine's next boot would erase. rasa only writes the
//! format (https://prometheus.io/docs/instrumenting/exposition_formats/); the file is replaced
//! atomically (a temporary `.<name>.tmp` beside it, which the collector ignores, then a rename),
//! so the collector never reads half of it.
//!
//! The last rollback's result, duration and time come from the record `rasa rollback` leaves
//! in /run (`--rollback-record`); when there is none (no rollback ran this boot), those metrics
//! are left out rather than made up.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::Result;

use super::writers::NOT_RECORDED;
use super::Outcome;
use crate::rollback::record::Record;

/// A label value with `\`, `"` and newlines escaped, as the text format requires.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[derive(Default)]
struct ByUnit {
    paths: u64,
    bytes: u64,
}

/// The metrics, in the text exposition format.
pub fn render(
    outcome: &Outcome,
    last_rollback: Option<&Record>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let mut units: BTreeMap<&str, ByUnit> = BTreeMap::new();
    for found in outcome.found.iter() {
        let names = match &outcome.writers {
            Some(writers) => writers.named(found.path),
            None => vec![NOT_RECORDED],
        };
        for name in names {
            let unit = units.entry(name).or_default();
            unit.paths += 1;
            unit.bytes += found.size;
        }
    }
    let tree = escape_label(&outcome.source.tree);
    let mut family = |name: &str, help: &str, value: &dyn Fn(&ByUnit) -> u64| {
        writeln!(out, "# HELP {name} {help}")?;
        writeln!(out, "# TYPE {name} gauge")?;
        for (unit, counts) in &units {
            writeln!(
                out,
                "{name}{{tree=\"{tree}\",unit=\"{}\"}} {}",
                escape_label(unit),
                value(counts)
            )?;
        }
        Ok::<_, std::io::Error>(())
    };
    family(
        "rasa_unpersisted_paths",
        "Paths the next boot erases, by the systemd unit (or command) that wrote them according to the rasa watch record; a path written by several counts under each; (not recorded) when no record names it.",
        &|c| c.paths,
    )?;
    family(
        "rasa_unpersisted_bytes",
        "Bytes of regular files and symlinks the next boot erases, by the unit that wrote them, as rasa_unpersisted_paths.",
        &|c| c.bytes,
    )?;
    writeln!(
        out,
        "# HELP rasa_unpersisted_paths_all Paths the next boot erases, each counted once."
    )?;
    writeln!(out, "# TYPE rasa_unpersisted_paths_all gauge")?;
    writeln!(
        out,
        "rasa_unpersisted_paths_all{{tree=\"{tree}\"}} {}",
        outcome.found.len()
    )?;
    writeln!(
        out,
        "# HELP rasa_watch_record_present Whether a rasa watch record named the writers (1) or not (0)."
    )?;
    writeln!(out, "# TYPE rasa_watch_record_present gauge")?;
    writeln!(
        out,
        "rasa_watch_record_present {}",
        u8::from(outcome.writers.is_some())
    )?;
    if let Some(count) = outcome.old_roots {
        writeln!(
            out,
            "# HELP rasa_old_roots Old roots kept on the filesystem (rasa old-roots list)."
        )?;
        writeln!(out, "# TYPE rasa_old_roots gauge")?;
        writeln!(out, "rasa_old_roots {count}")?;
    }
    if let Some(record) = last_rollback {
        render_rollback(record, out)?;
    }
    Ok(())
}

/// The last rollback's metrics (left out, all three, when it left no record).
fn render_rollback(record: &Record, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "# HELP rasa_last_rollback_duration_seconds How long the last rasa rollback took, from its start to its outcome (absent when it left no record in /run)."
    )?;
    writeln!(out, "# TYPE rasa_last_rollback_duration_seconds gauge")?;
    writeln!(
        out,
        "rasa_last_rollback_duration_seconds {}",
        record.duration_ms as f64 / 1e3
    )?;
    writeln!(
        out,
        "# HELP rasa_last_rollback_timestamp_seconds When the last rasa rollback reached its outcome, in Unix seconds (absent when it left no record)."
    )?;
    writeln!(out, "# TYPE rasa_last_rollback_timestamp_seconds gauge")?;
    writeln!(out, "rasa_last_rollback_timestamp_seconds {}", record.time)?;
    writeln!(
        out,
        "# HELP rasa_last_rollback_result The last rasa rollback's result (reset, kept-for-resume, booted-old-root, refused, failed) as the label of a 1 (absent when it left no record)."
    )?;
    writeln!(out, "# TYPE rasa_last_rollback_result gauge")?;
    writeln!(
        out,
        "rasa_last_rollback_result{{result=\"{}\"}} 1",
        record.result.as_str()
    )?;
    Ok(())
}

/// Refuse, before any work, a FILE whose directory is not there: the collector's directory is
/// node_exporter's to create, not rasa's.
pub fn check_target(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if path.file_name().is_none() || !dir.is_dir() {
        return Err(crate::error::refuse(
            format!(
                "--prometheus {}: {} is not a directory",
                path.display(),
                dir.display()
            ),
            "pass a file in node_exporter's --collector.textfile.directory (create that directory first)",
        ));
    }
    Ok(())
}

/// Replace `path` with the metrics: readable by the collector (0644), never half-written.
pub fn write(outcome: &Outcome, last_rollback: Option<&Record>, path: &Path) -> Result<()> {
    crate::watch::record::write_atomically_as(path, 0o644, None, |out| {
        render(outcome, last_rollback, out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny"), "x\\ny");
        assert_eq!(escape_label("foo.service"), "foo.service");
    }
}
