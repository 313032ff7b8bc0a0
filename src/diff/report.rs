//! The summary, `--long` and `--json` renderings of a diff.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Result;
use serde::Serialize;

use super::rules::RUNTIME_DIRS;
use super::{escape, Found, Kind, Outcome, Status, UNSTORED_NOTE};

/// `1.5 KiB`, `12 B`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The top-level directory a path is counted under (`/etc/x/y` → `/etc`; `/x` → `/x`).
fn group_of(path: &[u8]) -> &[u8] {
    match path[1..].iter().position(|&b| b == b'/') {
        Some(end) => &path[..end + 1],
        None => path,
    }
}

#[derive(Default)]
struct Group {
    paths: u64,
    size: u64,
    new: u64,
    modified: u64,
}

fn headline(outcome: &Outcome) -> String {
    let total: u64 = outcome.found.iter().map(|f| f.size).sum();
    let compared = match &outcome.source.compared_with {
        Some(blank) => format!("compared with {blank}"),
        None => "no blank to compare with".to_owned(),
    };
    let fate = if outcome.source.is_old_root() {
        "were not persisted: the boot after it erased them (they are still here)"
    } else {
        "will be erased by the next boot"
    };
    format!(
        "{} path{} ({}) on {} {fate} [engine: {}, {compared}]",
        outcome.found.len(),
        if outcome.found.len() == 1 { "" } else { "s" },
        human_size(total),
        outcome.source.tree,
        outcome.source.engine,
    )
}

fn left_out(outcome: &Outcome) -> String {
    let rules = &outcome.rules;
    let persisted = match &outcome.source.manifest {
        Some(_) => format!(
            "{} persisted path(s) from the manifest",
            rules.persisted_count
        ),
        None => "nothing persisted (no manifest)".to_owned(),
    };
    let ignored = if rules.ignore_patterns.is_empty() {
        String::new()
    } else {
        format!(", paths matching {}", rules.ignore_patterns.join(" "))
    };
    let unchanged = match &outcome.source.compared_with {
        Some(blank) => format!("what {blank} holds unchanged, "),
        None => String::new(),
    };
    format!(
        "left out: {unchanged}{persisted}, symlinks into /nix/store, {} and {} other mount(s){ignored}",
        RUNTIME_DIRS.join(" "),
        rules.mount_count.saturating_sub(RUNTIME_DIRS.len())
    )
}

impl Group {
    fn add(&mut self, found: &Found<'_>) {
        self.paths += 1;
        self.size += found.size;
        match found.status {
            Status::New | Status::Unstored => self.new += 1,
            Status::Modified => self.modified += 1,
        }
    }
}

/// One table of the summary: its groups, largest first, under `heading`.
fn table(groups: BTreeMap<&[u8], Group>, heading: &str, out: &mut impl Write) -> Result<()> {
    let mut rows: Vec<(&[u8], Group)> = groups.into_iter().collect();
    rows.sort_by(|a, b| {
        b.1.size
            .cmp(&a.1.size)
            .then(b.1.paths.cmp(&a.1.paths))
            .then(a.0.cmp(b.0))
    });
    writeln!(
        out,
        "{:>10} {:>8} {:>8} {:>8}  {heading}",
        "SIZE", "PATHS", "NEW", "MODIFIED"
    )?;
    for (name, group) in &rows {
        writeln!(
            out,
            "{:>10} {:>8} {:>8} {:>8}  {}",
            human_size(group.size),
            group.paths,
            group.new,
            group.modified,
            escape(name)
        )?;
    }
    writeln!(out)?;
    Ok(())
}

pub fn summary(outcome: &Outcome, out: &mut impl Write) -> Result<()> {
    writeln!(out, "{}", headline(outcome))?;
    let mut groups: BTreeMap<&[u8], Group> = BTreeMap::new();
    for found in outcome.found.iter() {
        groups.entry(group_of(found.path)).or_default().add(&found);
    }
    if !groups.is_empty() {
        writeln!(out)?;
        table(groups, "DIRECTORY", out)?;
        if let Some(writers) = &outcome.writers {
            // A path written by several counts under each.
            let mut by_writer: BTreeMap<&[u8], Group> = BTreeMap::new();
            for found in outcome.found.iter() {
                for name in writers.named(found.path) {
                    by_writer.entry(name.as_bytes()).or_default().add(&found);
                }
            }
            table(
                by_writer,
                &format!("WRITER (from {})", writers.source()),
                out,
            )?;
        }
        // Counted, not collected: an unstored tree can be most of a large diff.
        let (unstored, unstored_bytes) = outcome
            .found
            .iter()
            .filter(|f| f.status == Status::Unstored)
            .fold((0u64, 0u64), |(n, bytes), f| (n + 1, bytes + f.size));
        if unstored > 0 {
            let entries: Vec<String> = outcome
                .rules
                .unstored()
                .iter()
                .filter(|entry| outcome.found.contains_sorted(entry))
                .map(|entry| escape(entry))
                .collect();
            writeln!(
                out,
                "{unstored} of these path(s) ({}) are {UNSTORED_NOTE}: {}",
                human_size(unstored_bytes),
                entries.join(" ")
            )?;
        }
        writeln!(
            out,
            "`rasa diff --long` lists every path; `rasa diff --nix` suggests what to persist."
        )?;
    }
    writeln!(out, "{}", left_out(outcome))?;
    Ok(())
}

pub fn long(outcome: &Outcome, out: &mut impl Write) -> Result<()> {
    // Built by hand rather than with `format!` padding: on 100,000 paths the formatting
    // machinery was a visible share of the whole run.
    let mut line: Vec<u8> = Vec::with_capacity(256);
    for found in outcome.found.iter() {
        line.clear();
        line.extend_from_slice(match found.status {
            Status::New => b"new      ",
            Status::Modified => b"modified ",
            Status::Unstored => b"unstored ",
        });
        line.extend_from_slice(match found.kind {
            Kind::File => b"file   ",
            Kind::Directory => b"dir    ",
            Kind::Symlink => b"symlink",
            Kind::Other => b"other  ",
        });
        let mut digits = [0u8; 20];
        let size = decimal(found.size, &mut digits);
        line.resize(line.len() + 1 + 12usize.saturating_sub(size.len()), b' ');
        line.extend_from_slice(size);
        line.extend_from_slice(b"  ");
        if let Some(writers) = &outcome.writers {
            line.extend_from_slice(writer_label(&writers.of(found.path)).as_bytes());
            line.extend_from_slice(b"  ");
        }
        if is_plain(found.path) {
            line.extend_from_slice(found.path);
        } else {
            line.extend_from_slice(escape(found.path).as_bytes());
        }
        line.push(b'\n');
        out.write_all(&line)?;
    }
    Ok(())
}

/// The writers of a path as one word for `--long`: comma-separated, `-` when the record does
/// not name the path; a command name's spaces and commas escaped like any byte that would split
/// it.
fn writer_label(names: &[&str]) -> String {
    if names.is_empty() {
        return "-".to_owned();
    }
    names
        .iter()
        .map(|n| {
            escape(n.as_bytes())
                .replace(' ', "\\x20")
                .replace(',', "\\x2c")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `n` in decimal, written at the end of `buf` (u64::MAX has 20 digits).
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[start..];
        }
    }
}

/// Printable ASCII without backslashes: printed as is.
fn is_plain(path: &[u8]) -> bool {
    path.iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'\\')
}

#[derive(Serialize)]
struct JsonEntry<'a> {
    /// The path; when it is not UTF-8, written with `\xNN` escapes and `path_bytes` holds it.
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    path_bytes: Option<&'a [u8]>,
    kind: Kind,
    status: Status,
    size: u64,
    /// The units (or commands) the watch record names for this path; only with a record.
    #[serde(skip_serializing_if = "Option::is_none")]
    writers: Option<Vec<&'a str>>,
}

impl<'a> JsonEntry<'a> {
    fn new(found: Found<'a>, writers: Option<&'a super::writers::Writers>) -> Self {
        let (path, path_bytes) = match std::str::from_utf8(found.path) {
            Ok(text) => (text.to_owned(), None),
            Err(_) => (escape(found.path), Some(found.path)),
        };
        JsonEntry {
            path,
            path_bytes,
            kind: found.kind,
            status: found.status,
            size: found.size,
            writers: writers.map(|w| w.of(found.path)),
        }
    }
}

#[derive(Serialize)]
struct JsonReport<'a> {
    #[serde(flatten)]
    source: &'a super::Source,
    paths: usize,
    size: u64,
    ignore: &'a [String],
    /// The `rasa watch` record the writers come from; only with a record.
    #[serde(skip_serializing_if = "Option::is_none")]
    watch_record: Option<&'a str>,
    entries: Entries<'a>,
}

/// The entries, serialized one by one as they are written rather than collected first.
struct Entries<'a>(&'a Outcome);

impl Serialize for Entries<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let writers = self.0.writers.as_ref();
        serializer.collect_seq(self.0.found.iter().map(|f| JsonEntry::new(f, writers)))
    }
}

pub fn json(outcome: &Outcome, out: &mut impl Write) -> Result<()> {
    let report = JsonReport {
        source: &outcome.source,
        paths: outcome.found.len(),
        size: outcome.found.iter().map(|f| f.size).sum(),
        ignore: &outcome.rules.ignore_patterns,
        watch_record: outcome.writers.as_ref().and_then(|w| w.record.as_deref()),
        entries: Entries(outcome),
    };
    serde_json::to_writer_pretty(&mut *out, &report)?;
    writeln!(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_decimals() {
        let mut buf = [0u8; 20];
        for n in [0, 7, 10, 4096, 1_000_000_007, u64::MAX] {
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes());
        }
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(5 << 30), "5.0 GiB");
    }

    #[test]
    fn groups_by_top_level_directory() {
        assert_eq!(group_of(b"/etc/a/b"), b"/etc");
        assert_eq!(group_of(b"/etc"), b"/etc");
        assert_eq!(group_of(b"/x"), b"/x");
    }
}
