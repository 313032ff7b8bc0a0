//! The record `rasa watch` keeps: one line per (path, writer), bounded, written atomically; and
//! the reader other commands use. The format is documented in docs/watch.md.
//!
//! JSON lines: a header object first, then one object per (path, writer), sorted by path.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::writer::{Writer, WriterKind};

/// The record format this binary writes and reads.
pub const FORMAT: u32 = 1;

/// What happened to a path, as bits of [`Seen::events`].
pub mod event {
    pub const CREATE: u8 = 1;
    pub const DELETE: u8 = 2;
    pub const MOVE_FROM: u8 = 4;
    pub const MOVE_TO: u8 = 8;
    pub const WRITE: u8 = 16;
    pub const ATTRIB: u8 = 32;
    pub const NAMES: &[(u8, &str)] = &[
        (CREATE, "create"),
        (DELETE, "delete"),
        (MOVE_FROM, "moveFrom"),
        (MOVE_TO, "moveTo"),
        (WRITE, "write"),
        (ATTRIB, "attrib"),
    ];
}

/// First line of the file: what was watched, since when, and what could not be recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Header {
    /// Always [`FORMAT`]; also marks the file as a rasa watch record.
    pub rasa_watch: u32,
    /// The watched mount, as given to `--root`.
    pub root: String,
    /// `/proc/sys/kernel/random/boot_id` of the boot that wrote it.
    pub boot_id: String,
    /// Unix seconds.
    pub started: u64,
    pub updated: u64,
    /// Lines that follow.
    pub entries: u64,
    /// The cap on lines (`--max-entries`).
    pub max_entries: u64,
    /// Events for a (path, writer) not yet recorded once the cap was reached: not recorded.
    pub dropped_events: u64,
    /// Times the kernel's queue overflowed and dropped events (`FAN_Q_OVERFLOW`).
    pub queue_overflows: u64,
}

/// One (path, writer) pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Line {
    /// The path as on the running system (relative to the watched root, with a leading `/`);
    /// lossy when not UTF-8, in which case `pathBytes` has the exact bytes.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_bytes: Option<Vec<u8>>,
    pub writer: String,
    pub kind: WriterKind,
    pub first: u64,
    pub last: u64,
    pub count: u64,
    pub events: Vec<String>,
}

/// A writer's activity on one path, as the reader returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    pub writer: Writer,
    pub first: u64,
    pub last: u64,
    pub count: u64,
    pub events: Vec<String>,
}

/// A record as read back.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub header: Header,
    /// Path bytes -> who wrote it, in the order the file lists them.
    pub paths: BTreeMap<Vec<u8>, Vec<Attribution>>,
}

impl Loaded {
    /// The writers of one path, by name (units and commands alike).
    pub fn writers(&self, path: &[u8]) -> Vec<&str> {
        self.paths
            .get(path)
            .map(|a| a.iter().map(|a| a.writer.name.as_str()).collect())
            .unwrap_or_default()
    }
}

/// Read a record written by `rasa watch`: for each path, who wrote it.
pub fn load_record(path: &Path) -> Result<Loaded> {
    let text = std::fs::read(path)
        .with_context(|| format!("reading the watch record {}", path.display()))?;
    parse_record(&text, path)
}

/// A record's text, read from where `path` names (for messages).
pub fn parse_record(text: &[u8], path: &Path) -> Result<Loaded> {
    let text = std::str::from_utf8(text)
        .with_context(|| format!("{} is not UTF-8, not a watch record", path.display()))?;
    let mut lines = text.lines();
    let header: Header = match lines.next() {
        Some(first) => serde_json::from_str(first)
            .with_context(|| format!("{}: the first line is not a watch header", path.display()))?,
        None => bail!("{} is empty, not a watch record", path.display()),
    };
    if header.rasa_watch != FORMAT {
        bail!(
            "{} is a watch record of format {}, this rasa reads format {FORMAT}",
            path.display(),
            header.rasa_watch
        );
    }
    let mut paths: BTreeMap<Vec<u8>, Vec<Attribution>> = BTreeMap::new();
    for (n, text) in lines.enumerate() {
        let line: Line = serde_json::from_str(text)
            .with_context(|| format!("{}: line {} is not a watch entry", path.display(), n + 2))?;
        let bytes = line
            .path_bytes
            .clone()
            .unwrap_or_else(|| line.path.as_bytes().to_vec());
        paths.entry(bytes).or_default().push(Attribution {
            writer: Writer {
                kind: line.kind,
                name: line.writer,
            },
            first: line.first,
            last: line.last,
            count: line.count,
            events: line.events,
        });
    }
    Ok(Loaded { header, paths })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub first: u64,
    pub last: u64,
    pub count: u64,
    pub events: u8,
}

/// The record in memory: at most `max_entries` (path, writer) pairs; past that, events of new
/// pairs are only counted, so memory stays bounded however many events arrive.
pub struct Record {
    pub header: Header,
    writers: Vec<Writer>,
    writer_ids: HashMap<Writer, u32>,
    paths: HashMap<Vec<u8>, Vec<(u32, Seen)>>,
    entries: u64,
    pub dirty: bool,
}

impl Record {
    pub fn new(root: String, max_entries: u64, now: u64) -> Record {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        Record {
            header: Header {
                rasa_watch: FORMAT,
                root,
                boot_id,
                started: now,
                updated: now,
                entries: 0,
                max_entries,
                dropped_events: 0,
                queue_overflows: 0,
            },
            writers: Vec::new(),
            writer_ids: HashMap::new(),
            paths: HashMap::new(),
            entries: 0,
            dirty: true,
        }
    }

    /// Some writer of `path` is recorded already.
    pub fn knows(&self, path: &[u8]) -> bool {
        self.paths.contains_key(path)
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    fn writer_id(&mut self, writer: &Writer) -> u32 {
        if let Some(&id) = self.writer_ids.get(writer) {
            return id;
        }
        let id = self.writers.len() as u32;
        self.writers.push(writer.clone());
        self.writer_ids.insert(writer.clone(), id);
        id
    }

    /// Note one event; `false` when it was dropped because the cap is reached.
    pub fn add(&mut self, path: &[u8], writer: &Writer, events: u8, now: u64) -> bool {
        let id = self.writer_id(writer);
        self.dirty = true;
        let full = self.entries >= self.header.max_entries;
        if let Some(list) = self.paths.get_mut(path) {
            if let Some((_, seen)) = list.iter_mut().find(|(w, _)| *w == id) {
                seen.last = now;
                seen.count += 1;
                seen.events |= events;
                return true;
            }
            if full {
                self.header.dropped_events += 1;
                return false;
            }
            list.push((id, Seen::new(events, now)));
        } else {
            if full {
                self.header.dropped_events += 1;
                return false;
            }
            self.paths
                .insert(path.to_vec(), vec![(id, Seen::new(events, now))]);
        }
        self.entries += 1;
        true
    }

    /// Write the file's text to `out`: the header line, then the entries sorted by path and
    /// writer. Streamed, so writing a full record costs no second copy of it in memory.
    pub fn render(&mut self, now: u64, out: &mut dyn Write) -> std::io::Result<()> {
        self.header.updated = now;
        self.header.entries = self.entries;
        serde_json::to_writer(&mut *out, &self.header)?;
        out.write_all(b"\n")?;
        let mut sorted: Vec<_> = self.paths.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (path, seen) in sorted {
            let mut seen = seen.clone();
            seen.sort_by(|a, b| self.writers[a.0 as usize].cmp(&self.writers[b.0 as usize]));
            for (id, s) in seen {
                let writer = &self.writers[id as usize];
                let text = String::from_utf8(path.clone());
                let line = Line {
                    path: text
                        .clone()
                        .unwrap_or_else(|_| String::from_utf8_lossy(path).into_owned()),
                    path_bytes: text.is_err().then(|| path.clone()),
                    writer: writer.name.clone(),
                    kind: writer.kind,
                    first: s.first,
                    last: s.last,
                    count: s.count,
                    events: event::NAMES
                        .iter()
                        .filter(|(bit, _)| s.events & bit != 0)
                        .map(|(_, name)| (*name).to_owned())
                        .collect(),
                };
                serde_json::to_writer(&mut *out, &line)?;
                out.write_all(b"\n")?;
            }
        }
        Ok(())
    }
}

impl Seen {
    fn new(events: u8, now: u64) -> Seen {
        Seen {
            first: now,
            last: now,
            count: 1,
            events,
        }
    }
}

/// Replace `path` with what `contents` writes, atomically: a reader sees the old file or the
/// new one, never a part. The directory is created (0700: the record names what this machine's
/// services do).
pub fn write_atomically(
    path: &Path,
    contents: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    write_atomically_as(path, 0o600, Some(0o700), contents)
}

/// [`write_atomically`] with the file's mode, and the mode of the directory to create (`None`:
/// it must exist, as a collector's directory does).
pub fn write_atomically_as(
    path: &Path,
    mode: u32,
    create_dir: Option<u32>,
    contents: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Some(dir_mode) = create_dir {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut tmp_name = b".".to_vec();
    tmp_name.extend_from_slice(path.file_name().unwrap_or_default().as_bytes());
    tmp_name.extend_from_slice(b".tmp");
    let tmp = dir.join(std::ffi::OsStr::from_bytes(&tmp_name));
    // A leftover from an interrupted write is removed, and the new one created exclusively:
    // whatever stood at that name (a symlink included) is never followed.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", tmp.display()))
        }
        _ => {}
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    // Exactly this mode, whatever the umask (a collector's reader must be able to read it).
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 16, file);
    contents(&mut out)
        .and_then(|()| out.flush())
        .and_then(|()| out.get_ref().sync_data())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(name: &str) -> Writer {
        Writer {
            kind: WriterKind::Unit,
            name: name.to_owned(),
        }
    }

    #[test]
    fn one_line_per_path_and_writer_and_a_bounded_count() {
        let mut record = Record::new("/".into(), 3, 100);
        assert!(record.add(b"/etc/a", &unit("a.service"), event::CREATE, 100));
        assert!(record.add(b"/etc/a", &unit("a.service"), event::WRITE, 105));
        assert!(record.add(b"/etc/a", &unit("b.service"), event::ATTRIB, 106));
        assert!(record.add(b"/etc/\xff", &unit("a.service"), event::CREATE, 107));
        // The cap is reached: a known pair is still counted, a new one only in the header.
        assert!(!record.add(b"/etc/c", &unit("a.service"), event::CREATE, 108));
        assert!(!record.add(b"/etc/a", &unit("c.service"), event::CREATE, 108));
        assert!(record.add(b"/etc/a", &unit("a.service"), event::DELETE, 109));
        assert_eq!(record.entries(), 3);
        assert_eq!(record.header.dropped_events, 2);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/watch.jsonl");
        // A symlink where the temporary file goes is replaced, not followed.
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "untouched").unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("sub/.watch.jsonl.tmp")).unwrap();
        write_atomically(&file, |out| record.render(110, out)).unwrap();
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "untouched");
        let loaded = load_record(&file).unwrap();
        assert_eq!(loaded.header.entries, 3);
        assert_eq!(loaded.header.dropped_events, 2);
        assert_eq!(loaded.writers(b"/etc/a"), vec!["a.service", "b.service"]);
        assert_eq!(loaded.writers(b"/etc/\xff"), vec!["a.service"]);
        let a = &loaded.paths[&b"/etc/a".to_vec()][0];
        assert_eq!((a.first, a.last, a.count), (100, 109, 3));
        assert_eq!(a.events, vec!["create", "delete", "write"]);
        assert!(!loaded.paths.contains_key(b"/etc/c".as_slice()));
    }

    #[test]
    fn refuses_what_is_not_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x");
        std::fs::write(&file, "{\"version\":1}\n").unwrap();
        assert!(load_record(&file).is_err());
        std::fs::write(&file, "").unwrap();
        assert!(load_record(&file).is_err());
    }
}
