//! `rasa watch`: who writes what the next boot erases.
//!
//! A fanotify group marks the whole filesystem of the root ([`fanotify`]); each event names a
//! directory (by handle) and an entry, which become a path on the root, and the writing process
//! becomes a systemd unit or a command ([`writer`]). Paths that `rasa diff` leaves out
//! (persisted, runtime, ignored: the same [`rules`]) are left out here too. What remains goes
//! into a bounded [`record`], one line per (path, writer), written atomically to `--record`
//! (read during this boot) and into the watched root itself (read with `--old-root` after the
//! wipe has moved that root to old_roots).

pub mod fanotify;
pub mod record;
pub mod writer;

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{open, OFlag};
use nix::libc;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::stat::{fstat, fstatat, Mode};

use crate::diff::rules::{self, Rules};
use crate::error::{exit, refuse};
use crate::log;
use crate::toplevel::{self, TopLevel};

// The reader `rasa diff` (and `--old-root`) uses to show the unit per path; wired by the diff
// work, which is not in this module.
use record::{event, Record};
#[allow(unused_imports)]
pub use record::{load_record, parse_record, Attribution, Loaded};
use writer::Writer;

/// Where the record for this boot goes by default (`rasa diff` reads it from there).
pub const DEFAULT_RECORD: &str = "/run/rasa/watch.jsonl";
/// Where the copy inside the watched root goes, relative to it (so it moves to old_roots with
/// the root it describes, and `rasa diff --old-root` finds it there).
pub const IN_ROOT_RECORD: &str = "var/lib/rasa/watch/record.jsonl";

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  rasa watch                                    # watch /, record in /run/rasa/watch.jsonl
  rasa watch --root /mnt --record /tmp/w.jsonl  # another mounted root

Runs until SIGTERM or SIGINT, then writes the record a last time. Never blocks a writer: it asks
for notifications only, never for permission. See docs/watch.md for the record's format.")]
pub struct Args {
    /// The mounted root to watch; its whole filesystem is marked, events elsewhere are dropped.
    #[arg(long, value_name = "PATH", default_value = "/")]
    pub root: PathBuf,

    /// Where to write the record for this boot.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_RECORD)]
    pub record: PathBuf,

    /// Where inside the root to write a second copy, relative to the root (it is left out of
    /// the record itself).
    #[arg(long, value_name = "REL", default_value = IN_ROOT_RECORD)]
    pub in_root_record: PathBuf,

    /// Do not write the copy inside the root.
    #[arg(long)]
    pub no_in_root_record: bool,

    /// The manifest whose persisted paths and diffIgnore globs are left out. [default: as for
    /// `rasa diff`]
    #[arg(long, value_name = "PATH")]
    pub manifest: Option<PathBuf>,

    /// Leave out absolute paths matching this glob (and everything below them); repeatable.
    #[arg(long = "ignore", value_name = "GLOB")]
    pub ignore: Vec<String>,

    /// The most (path, writer) lines kept; past it new pairs are only counted.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub max_entries: u64,

    /// Seconds between writes of the record (it is also written on SIGTERM and SIGINT).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub flush_interval: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The manifest's persisted paths and globs, found as `rasa diff` finds them (the same code).
fn rules_for(args: &Args, root: &[u8]) -> Result<Rules> {
    crate::diff::rule_inputs(args.manifest.as_deref(), &args.ignore)?
        .rules(&rules::mounts_below(root))
}

/// Why `path` is left out: it or a directory above it is persisted, runtime or ignored.
fn excluded(rules: &Rules, path: &[u8], is_dir: bool) -> bool {
    let ancestors = path
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, &b)| b == b'/')
        .map(|(i, _)| &path[..i]);
    ancestors
        .map(|dir| (dir, true))
        .chain(std::iter::once((path, is_dir)))
        .any(|(p, d)| rules.check(p, d, None).is_some())
}

/// A directory handle resolved to its path on the root, and whether everything in it is left
/// out. `None`: not reachable from the root's mount (another subvolume, a deleted directory).
type Resolved = Option<(Vec<u8>, bool)>;

/// Handles to paths, remembered: resolving costs a few system calls, and a burst of writes
/// lands in few directories. Forgotten whenever a directory is moved or deleted (any cached
/// path below it could be wrong) and when it grows past its bound.
struct Resolver {
    mount: OwnedFd,
    /// The root's path in this mount namespace, stripped from what the kernel reports.
    prefix: Vec<u8>,
    cache: HashMap<(i32, Vec<u8>), Resolved>,
}

const RESOLVER_CACHE: usize = 16_384;

impl Resolver {
    fn resolve(&mut self, rules: &Rules, own: &[u8], handle_type: i32, handle: &[u8]) -> &Resolved {
        let key = (handle_type, handle.to_vec());
        if !self.cache.contains_key(&key) {
            if self.cache.len() >= RESOLVER_CACHE {
                self.cache.clear();
            }
            let resolved = fanotify::open_directory(self.mount.as_fd(), handle_type, handle)
                .ok()
                .and_then(|fd| self.path_on_root(&fd))
                .map(|path| {
                    let left_out = rules::under(&path, own) || excluded(rules, &path, true);
                    (path, left_out)
                });
            self.cache.insert(key.clone(), resolved);
        }
        &self.cache[&key]
    }

    /// The path of an opened directory as on the running system (below the root, with a
    /// leading `/`), when that path, looked up from the root, is this very directory (same
    /// device and inode). The kernel names the top of another subvolume `/`, and a deleted
    /// directory `... (deleted)`: neither is on the root, and the check says so.
    fn path_on_root(&self, dir: &OwnedFd) -> Option<Vec<u8>> {
        let full = fanotify::path_of(dir).ok()?;
        let rest = full.strip_prefix(self.prefix.as_slice())?;
        let path = match rest.first() {
            None => b"/".to_vec(),
            Some(b'/') => rest.to_vec(),
            Some(_) => return None,
        };
        let opened = fstat(dir.as_fd()).ok()?;
        let relative = match &path[1..] {
            b"" => b".".as_slice(),
            r => r,
        };
        let found = fstatat(
            self.mount.as_fd(),
            std::ffi::OsStr::from_bytes(relative),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .ok()?;
        (found.st_dev == opened.st_dev && found.st_ino == opened.st_ino).then_some(path)
    }
}

/// Units of recently seen processes, forgotten every second so that a reused pid is not
/// attributed to the process it replaced for longer than that.
struct Writers {
    cache: HashMap<i32, Writer>,
    since: Instant,
}

impl Writers {
    fn of(&mut self, pid: i32) -> &Writer {
        if self.since.elapsed() > Duration::from_secs(1) {
            self.cache.clear();
            self.since = Instant::now();
        }
        self.cache
            .entry(pid)
            .or_insert_with(|| writer::writer_of(pid))
    }
}

fn event_bits(mask: u64) -> u8 {
    let mut bits = 0;
    for (kernel, ours) in [
        (libc::FAN_CREATE, event::CREATE),
        (libc::FAN_DELETE, event::DELETE),
        (libc::FAN_MOVED_FROM, event::MOVE_FROM),
        (libc::FAN_MOVED_TO, event::MOVE_TO),
        (libc::FAN_MODIFY | libc::FAN_CLOSE_WRITE, event::WRITE),
        (libc::FAN_ATTRIB, event::ATTRIB),
    ] {
        if mask & kernel != 0 {
            bits |= ours;
        }
    }
    bits
}

struct Watch {
    rules: Rules,
    resolver: Resolver,
    writers: Writers,
    record: Record,
    /// The in-root copy's directory, as a path on the root: left out of the record.
    own: Vec<u8>,
    pid: i32,
}

impl Watch {
    fn link_left_out(&self, path: &[u8]) -> bool {
        let relative = std::ffi::OsStr::from_bytes(&path[1..]);
        match nix::fcntl::readlinkat(self.resolver.mount.as_fd(), relative) {
            Ok(target) => self
                .rules
                .check(path, false, Some(target.as_bytes()))
                .is_some(),
            Err(_) => false,
        }
    }

    fn handle(&mut self, buf: &[u8], now: u64) {
        for ev in fanotify::parse(buf) {
            if ev.overflow() {
                self.record.header.queue_overflows += 1;
                self.record.dirty = true;
                continue;
            }
            if ev.pid == self.pid {
                continue;
            }
            let dir_changed = ev.on_directory()
                && ev.mask & (libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO | libc::FAN_DELETE) != 0;
            let Some((dir, left_out)) =
                self.resolver
                    .resolve(&self.rules, &self.own, ev.handle_type, ev.handle)
            else {
                continue;
            };
            if *left_out {
                continue;
            }
            let path = if ev.name.is_empty() {
                dir.clone()
            } else {
                let mut path = dir.clone();
                if path != b"/" {
                    path.push(b'/');
                }
                path.extend_from_slice(ev.name);
                path
            };
            if dir_changed {
                self.resolver.cache.clear();
            }
            if !ev.name.is_empty()
                && (rules::under(&path, &self.own)
                    || self.rules.check(&path, ev.on_directory(), None).is_some())
            {
                continue;
            }
            // A symlink into /nix/store or into a storage root (impermanence's file links) is
            // left out by `rasa diff` for its target; looked at once, when the path is new.
            if !ev.name.is_empty()
                && !ev.on_directory()
                && !self.record.knows(&path)
                && self.link_left_out(&path)
            {
                continue;
            }
            let writer = self.writers.of(ev.pid);
            self.record.add(&path, writer, event_bits(ev.mask), now);
        }
    }
}

/// Open the fanotify group and mark the filesystem of `root`. A btrfs subvolume other than the
/// top level cannot carry a filesystem mark (the kernel says `EXDEV`: its fsid differs from the
/// filesystem's), so then the mark goes on the top level, mounted privately for the moment it
/// takes; the mark stays with the filesystem after the unmount.
fn watch_filesystem(root: &Path) -> Result<nix::sys::fanotify::Fanotify> {
    let group = fanotify::init().map_err(|e| match e {
        Errno::EPERM => refuse(
            "fanotify needs CAP_SYS_ADMIN",
            "run `rasa watch` as root (the NixOS module's rasa-watch.service does)",
        ),
        Errno::EINVAL | Errno::ENOSYS => refuse(
            format!("this kernel cannot report fanotify events with file handles and names: {e}"),
            "use Linux 5.9 or later, built with CONFIG_FANOTIFY",
        ),
        e => anyhow::Error::new(e).context("creating the fanotify group"),
    })?;
    match fanotify::mark_filesystem(&group, root) {
        Ok(()) => return Ok(group),
        Err(Errno::EXDEV) => {}
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context(format!("marking the filesystem of {}", root.display())))
        }
    }
    let mount = toplevel::mount_at(root)
        .filter(|m| m.fstype == "btrfs")
        .ok_or_else(|| {
            refuse(
                format!(
                    "the filesystem of {} cannot be marked as a whole, and it is not a btrfs mount",
                    root.display()
                ),
                "pass the mount point of the root with --root",
            )
        })?;
    let top = TopLevel::mount(&mount.source, true)?;
    fanotify::mark_filesystem(&group, top.path()).with_context(|| {
        format!(
            "marking the filesystem of {} through its top level",
            mount.source.display()
        )
    })?;
    top.unmount()?;
    Ok(group)
}

/// Tell systemd the mark is in place (`Type=notify`), so units ordered after the watcher
/// start only once their writes are seen. `NOTIFY_SOCKET` is a path, or an abstract socket
/// name after `@`; without it (not started by systemd) there is nobody to tell.
fn notify_ready() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = target.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(Path::new(&target)),
    };
    let sent = UnixDatagram::unbound()
        .and_then(|socket| addr.and_then(|addr| socket.send_to_addr(b"READY=1", &addr)));
    if let Err(e) = sent {
        log::warn(format!(
            "cannot tell systemd that rasa watch is ready (NOTIFY_SOCKET={}): {e}",
            target.to_string_lossy()
        ));
    }
}

/// What one read of a burst returns at least (some 60 events), and how long to let the next
/// burst gather: well under the kernel queue's 16,384 events at any plausible write rate.
const BURST_BYTES: usize = 4096;
const BURST_PAUSE: Duration = Duration::from_millis(20);

pub fn run(args: Args) -> Result<u8> {
    if args.in_root_record.is_absolute() {
        return Err(refuse(
            format!(
                "--in-root-record must be relative to the root (got {})",
                args.in_root_record.display()
            ),
            "e.g. --root / --in-root-record var/lib/rasa/watch/record.jsonl",
        ));
    }
    let root = std::fs::canonicalize(&args.root).map_err(|e| {
        refuse(
            format!("cannot open --root {}: {e}", args.root.display()),
            "pass the mount point of the root to watch",
        )
    })?;
    let prefix = match root.as_os_str().as_bytes() {
        b"/" => Vec::new(),
        p => p.to_vec(),
    };
    let rules = rules_for(&args, root.as_os_str().as_bytes())?;
    let mount = open(
        &root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening {}", root.display()))?;
    let own_rel = args.in_root_record.parent().unwrap_or(Path::new(""));
    let mut own = b"/".to_vec();
    own.extend_from_slice(own_rel.as_os_str().as_bytes());
    let in_root = (!args.no_in_root_record).then(|| root.join(&args.in_root_record));

    // Signals arrive on a descriptor, so the loop sees them between reads and can drain the
    // queue and write the record before it exits.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals
        .thread_block()
        .context("blocking SIGTERM and SIGINT")?;
    let signal_fd = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("creating a signalfd")?;

    let group = watch_filesystem(&root)?;
    let mut watch = Watch {
        rules,
        resolver: Resolver {
            mount,
            prefix,
            cache: HashMap::new(),
        },
        writers: Writers {
            cache: HashMap::new(),
            since: Instant::now(),
        },
        record: Record::new(root.display().to_string(), args.max_entries, now_secs()),
        own,
        pid: std::process::id() as i32,
    };
    let write_record = |record: &mut Record, strict: bool| -> Result<()> {
        let now = now_secs();
        record.dirty = false;
        let mut targets = vec![args.record.clone()];
        targets.extend(in_root.clone());
        for target in targets {
            if let Err(e) = record::write_atomically(&target, |out| record.render(now, out)) {
                if strict {
                    return Err(e);
                }
                log::warn(format!("{e:#}"));
            }
        }
        Ok(())
    };
    // The first write says the mark is in place (and fails early on an unwritable target).
    write_record(&mut watch.record, true).map_err(|e| {
        refuse(
            format!("cannot write the watch record: {e:#}"),
            "pass a writable --record FILE, and --no-in-root-record when the root is read-only",
        )
    })?;
    notify_ready();
    log::info(format!(
        "watching the filesystem of {}; record in {}{}",
        root.display(),
        args.record.display(),
        in_root
            .as_ref()
            .map(|p| format!(" and {}", p.display()))
            .unwrap_or_default()
    ));

    let interval = Duration::from_secs(args.flush_interval.max(1));
    let mut next_flush = Instant::now() + interval;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let wait = next_flush.saturating_duration_since(Instant::now());
        let timeout = PollTimeout::try_from(wait.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        let mut fds = [
            PollFd::new(group.as_fd(), PollFlags::POLLIN),
            PollFd::new(signal_fd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(anyhow::Error::new(e).context("waiting for events")),
        }
        let stop = fds[1]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        // Read what is queued; on a stop, everything up to now, so nothing written before the
        // signal is missing from the last record.
        let mut read_bytes = 0;
        loop {
            match nix::unistd::read(group.as_fd(), &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    read_bytes += n;
                    watch.handle(&buf[..n], now_secs());
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(anyhow::Error::new(e).context("reading fanotify events")),
            }
        }
        if stop {
            let signal = signal_fd.read_signal().ok().flatten().map(|s| s.ssi_signo);
            write_record(&mut watch.record, false)?;
            log::info(format!(
                "stopping on signal {}: {} (path, writer) lines recorded, {} events dropped past \
                 the cap, {} queue overflows",
                signal.unwrap_or(0),
                watch.record.entries(),
                watch.record.header.dropped_events,
                watch.record.header.queue_overflows
            ));
            return Ok(exit::OK);
        }
        // Under a burst of writes, let events gather before reading again: one wake-up per
        // batch instead of one per event spares the writers the context switches (and the
        // kernel merges repeated events while they wait). Sporadic writes are still read at
        // once, while their writer is most likely alive to be looked up.
        if read_bytes >= BURST_BYTES {
            std::thread::sleep(BURST_PAUSE);
        }
        if Instant::now() >= next_flush {
            if watch.record.dirty {
                write_record(&mut watch.record, false)?;
            }
            next_flush = Instant::now() + interval;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_below_a_persisted_or_ignored_one_is_left_out() {
        let rules = Rules::new(
            &["/var/lib/nixos".into()],
            &["/persist".into()],
            &[],
            &["/var/cache/**".into()],
        )
        .unwrap();
        assert!(excluded(&rules, b"/var/lib/nixos/uid-map", false));
        assert!(excluded(&rules, b"/var/lib/nixos", true));
        assert!(excluded(&rules, b"/var/cache/x/y", false));
        assert!(excluded(&rules, b"/run/user/0/x", false));
        assert!(excluded(&rules, b"/tmp", true));
        assert!(!excluded(&rules, b"/var/lib/nixos-other/x", false));
        assert!(!excluded(&rules, b"/etc/foo", false));
        assert!(!excluded(&rules, b"/", true));
    }

    #[test]
    fn kernel_events_map_to_record_bits() {
        assert_eq!(
            event_bits(libc::FAN_CREATE | libc::FAN_ONDIR),
            event::CREATE
        );
        assert_eq!(
            event_bits(libc::FAN_MODIFY | libc::FAN_CLOSE_WRITE | libc::FAN_ATTRIB),
            event::WRITE | event::ATTRIB
        );
    }
}
