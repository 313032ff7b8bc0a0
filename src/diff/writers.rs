//! Who wrote each path: the record `rasa watch` keeps (docs/watch.md), when there is one. The
//! live root's is in /run during the boot that wrote it; an old root carries its own inside
//! (`var/lib/rasa/watch/record.jsonl`), read through the tree so a symlink there cannot lead out.

use std::os::fd::BorrowedFd;
use std::path::Path;

use anyhow::Result;

use crate::error::refuse;
use crate::log;
use crate::watch::{self, Loaded};

pub struct Writers {
    /// Where the watch record was read; `None` when only the manifest names units.
    pub record: Option<String>,
    loaded: Option<Loaded>,
    /// (path, unit) from the manifest's `services`: the unit whose state a path is, for paths
    /// the record does not name (or with no record at all).
    declared: Vec<(String, String)>,
}

/// What the report says the writers come from when only the manifest names them.
pub const FROM_MANIFEST: &str = "the manifest's services";

/// Add the manifest's `services` to what the record says (or stand in for a missing record).
pub fn with_declared(
    writers: Option<Writers>,
    services: &[crate::manifest::Service],
) -> Option<Writers> {
    let declared: Vec<(String, String)> = services
        .iter()
        .flat_map(|s| s.paths.iter().map(|p| (p.clone(), s.unit.clone())))
        .collect();
    match writers {
        Some(mut w) => {
            w.declared = declared;
            Some(w)
        }
        None if declared.is_empty() => None,
        None => Some(Writers {
            record: None,
            loaded: None,
            declared,
        }),
    }
}

/// Shown for a path the record does not name (written before the watcher started, or left
/// out of a record that reached its cap).
pub const NOT_RECORDED: &str = "(not recorded)";

impl Writers {
    /// Where the writers come from, for the report's heading.
    pub fn source(&self) -> String {
        match (&self.record, self.declared.is_empty()) {
            (Some(record), true) => record.clone(),
            (Some(record), false) => format!("{record} and {FROM_MANIFEST}"),
            (None, _) => FROM_MANIFEST.to_owned(),
        }
    }

    /// The units (or commands) that wrote `path`, in the record's order; else the units the
    /// manifest says keep their state at or above `path`; empty when unknown.
    pub fn of(&self, path: &[u8]) -> Vec<&str> {
        let recorded = self
            .loaded
            .as_ref()
            .map(|l| l.writers(path))
            .unwrap_or_default();
        if !recorded.is_empty() {
            return recorded;
        }
        let mut units: Vec<&str> = self
            .declared
            .iter()
            .filter(|(at, _)| super::rules::under(path, at.as_bytes()))
            .map(|(_, unit)| unit.as_str())
            .collect();
        units.dedup();
        units
    }

    /// [`Writers::of`], or [`NOT_RECORDED`] alone: what a path is counted under.
    pub fn named(&self, path: &[u8]) -> Vec<&str> {
        let names = self.of(path);
        if names.is_empty() {
            vec![NOT_RECORDED]
        } else {
            names
        }
    }

    /// What the record could not see: said with the report, so an empty column is not read as
    /// "nobody".
    pub fn caveat(&self) -> Option<String> {
        let h = &self.loaded.as_ref()?.header;
        (h.dropped_events > 0 || h.queue_overflows > 0).then(|| {
            format!(
                "the watch record is incomplete ({} event(s) dropped at its cap, {} queue overflow(s))",
                h.dropped_events, h.queue_overflows
            )
        })
    }
}

/// The record the user named: it must be readable and a record.
pub fn explicit(path: &Path) -> Result<Writers> {
    match watch::load_record(path) {
        Ok(loaded) => Ok(Writers {
            record: Some(path.display().to_string()),
            loaded: Some(loaded),
            declared: Vec::new(),
        }),
        Err(e) => Err(refuse(
            format!("cannot use the watch record {}: {e:#}", path.display()),
            "pass a record written by `rasa watch` with --watch-record PATH, or leave the option out",
        )),
    }
}

/// The running boot's record, when `rasa watch` runs (or ran) during this boot. A record that
/// cannot be read is a warning: the diff itself does not depend on it.
pub fn live() -> Option<Writers> {
    let path = Path::new(watch::DEFAULT_RECORD);
    if !path.exists() {
        return None;
    }
    match watch::load_record(path) {
        Ok(loaded) => Some(Writers {
            record: Some(path.display().to_string()),
            loaded: Some(loaded),
            declared: Vec::new(),
        }),
        Err(e) => {
            log::warn(format!("ignoring the watch record: {e:#}"));
            None
        }
    }
}

/// The record inside a tree (an old root), read as that tree sees it.
pub fn in_tree(tree: BorrowedFd<'_>, tree_name: &str) -> Option<Writers> {
    let shown = format!("{tree_name}/{}", watch::IN_ROOT_RECORD);
    let text = match crate::fs::read_in_root(tree, Path::new(watch::IN_ROOT_RECORD)) {
        Ok(Some(text)) => text,
        Ok(None) => return None,
        Err(e) => {
            log::warn(format!("ignoring the watch record {shown}: {e}"));
            return None;
        }
    };
    match watch::parse_record(&text, Path::new(&shown)) {
        Ok(loaded) => Some(Writers {
            record: Some(shown),
            loaded: Some(loaded),
            declared: Vec::new(),
        }),
        Err(e) => {
            log::warn(format!("ignoring the watch record: {e:#}"));
            None
        }
    }
}
