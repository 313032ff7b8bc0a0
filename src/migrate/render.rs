//! The plan (or the result) as text for people.

use std::fmt::Write;

use super::plan::{Method, PlannedEntry};
use super::record::Action;
use super::{ConflictPolicy, Report};

fn label(e: &PlannedEntry, applied: bool) -> String {
    match (e.action, e.resolution) {
        (Action::Conflict, Some(ConflictPolicy::KeepStorage)) => "conflict, kept storage".into(),
        (Action::Conflict, Some(ConflictPolicy::ReplaceWithBackup)) if applied => {
            "conflict, replaced".into()
        }
        (Action::Conflict, Some(ConflictPolicy::ReplaceWithBackup)) => {
            "conflict, will replace".into()
        }
        (Action::Copy, _) if applied => "copied".into(),
        (Action::CreateEmpty, _) if applied => "created empty".into(),
        (action, _) => match action {
            Action::Copy => "copy",
            Action::AlreadyPersisted => "already persisted",
            Action::Identical => "identical",
            Action::Conflict => "conflict",
            Action::Missing => "missing on both sides",
            Action::CreateEmpty => "create empty",
            Action::Covered => "covered",
            Action::Skipped => "skipped",
            Action::Problem => "PROBLEM",
        }
        .into(),
    }
}

pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}",
        if report.applied {
            "Migration done:"
        } else {
            "Migration plan (dry run; pass --apply to execute it):"
        }
    );
    let width = report
        .entries
        .iter()
        .map(|e| e.path.chars().count())
        .max()
        .unwrap_or(0);
    for e in &report.entries {
        let action = label(e, report.applied);
        let mut detail = Vec::new();
        if e.will_copy() || e.action == Action::Identical || e.action == Action::Conflict {
            detail.push(format!(
                "{}, {} item{}",
                indicatif::HumanBytes(e.bytes),
                e.items,
                if e.items == 1 { "" } else { "s" }
            ));
        }
        if let Some(m) = e.method {
            detail.push(
                match m {
                    Method::Reflink => "reflink",
                    Method::Copy => "copy",
                }
                .into(),
            );
        }
        if let Some(reason) = &e.reason {
            detail.push(reason.clone());
        }
        if let Some(backup) = &e.backup {
            detail.push(format!("old version kept at {backup}"));
        }
        for point in &e.left_out {
            detail.push(format!(
                "left out mount point {point} (another filesystem; persist it separately if \
                 it holds state)"
            ));
        }
        if let Some(r) = &e.result {
            for s in &r.skipped_sockets {
                detail.push(format!("skipped socket {s}"));
            }
            for s in &r.copied_again {
                detail.push(format!("{s} changed while copied, copied again"));
            }
        }
        let _ = writeln!(
            out,
            "  {action:<24} {:<width$}  -> {}  ({})",
            e.path,
            e.storage_path,
            detail.join("; ")
        );
        if let Some(fix) = &e.fix {
            let _ = writeln!(out, "    fix: {fix}");
        }
    }
    let count = |a: Action| report.entries.iter().filter(|e| e.action == a).count();
    let copy_bytes: u64 = report
        .entries
        .iter()
        .filter(|e| e.will_copy())
        .map(|e| e.bytes)
        .sum();
    let mut summary = format!(
        "{} to copy ({}), {} already persisted, {} identical, {} conflicts, {} missing, {} skipped",
        report.entries.iter().filter(|e| e.will_copy()).count(),
        indicatif::HumanBytes(copy_bytes),
        count(Action::AlreadyPersisted),
        count(Action::Identical),
        count(Action::Conflict),
        count(Action::Missing),
        count(Action::Skipped),
    );
    // The rarer outcomes only when they happen, so the usual summary stays short.
    for (action, what) in [
        (Action::CreateEmpty, "to create empty"),
        (Action::Covered, "covered by another entry"),
        (Action::Problem, "problems"),
    ] {
        if count(action) > 0 {
            let _ = write!(summary, ", {} {what}", count(action));
        }
    }
    let _ = writeln!(out, "{summary}");
    if report
        .entries
        .iter()
        .any(|e| e.action == Action::Conflict && e.resolution == Some(ConflictPolicy::Stop))
    {
        let _ = writeln!(
            out,
            "Conflicts were left alone: compare the two versions, then rerun with \
             --on-conflict keep-storage or --on-conflict replace-with-backup."
        );
    }
    if count(Action::Problem) > 0 {
        let _ = writeln!(
            out,
            "Problems were left alone and the next boot erases what they name: apply each fix, \
             then rerun."
        );
    }
    out
}
