//! `rasa diff`: what exists on the live root that the next boot will not bring back.
//!
//! Two engines answer the same question. On btrfs the filesystem is asked which inodes changed
//! since the blank ([`btrfs_engine`]); anywhere else, or with `--engine walk`, the tree is
//! walked and compared with the blank when there is one ([`walk`]). Both apply the same
//! [`rules`] and report the same [`Found`] list, which the tests check on the same tree.

mod btrfs_engine;
mod found;
mod nix_fragment;
mod prometheus;
mod report;
pub mod rules;
mod walk;
mod writers;

use std::ffi::OsStr;
use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::sys::stat::FileStat;
use serde::Serialize;

use crate::btrfs::{self, find_new::InodeItem};
use crate::error::{exit, refuse};
use crate::layout::{Layout, LayoutArgs};
use crate::log;
use crate::manifest::{self, Manifest};
use crate::old_roots;
use crate::rollback::record::Record;
use crate::toplevel::{self, TopLevel};
pub use found::{Found, FoundList};

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  rasa diff                               # summary of what the next boot erases
  rasa diff --long                        # every path
  rasa diff --nix                         # an environment.persistence fragment to paste
  rasa diff --json | jq '.entries[].path'
  rasa diff --ignore '/var/cache/**' --ignore '/root/.bash_history'
  rasa diff --old-root 20261122T193000Z   # what that past boot erased (copy it back from there)
  rasa diff --engine walk --live-root /   # no btrfs: walk the tree (e.g. a tmpfs root)
  rasa diff --exit-code                   # exit 4 when unpersisted state exists (for scripts)

Left out: what the blank holds unchanged, the manifest's persisted paths and its diffIgnore
globs, symlinks into /nix/store, /proc /sys /dev /run /tmp and every other mount on /.
Not left out: subvolumes nested in the root (the next boot erases them with it), and manifest
entries whose storage copy does not exist yet (status `unstored`: run rasa migrate --apply).
Paths that are not UTF-8 are printed with \\xNN escapes (JSON also gives their bytes).")]
pub struct Args {
    #[command(flatten)]
    pub layout: LayoutArgs,

    /// How to find changes: by btrfs generation, or by walking the tree. [default: btrfs when
    /// the root is a btrfs subvolume related to the blank, the walk otherwise]
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto, hide_default_value = true)]
    pub engine: EngineChoice,

    /// The live tree to look at. [default: the root subvolume (what / is mounted from), or /
    /// when / is not btrfs]
    #[arg(long, value_name = "PATH")]
    pub live_root: Option<PathBuf>,

    /// Show what the boot that retired this old root erased: the old root compared with the
    /// blank (see `rasa old-roots list`).
    #[arg(long, value_name = "NAME", conflicts_with = "live_root")]
    pub old_root: Option<String>,

    /// The manifest whose persisted paths and diffIgnore globs are left out. [default: the
    /// next boot's, then /etc/rasa/manifest.json; without one nothing counts as persisted]
    #[arg(long, value_name = "PATH")]
    pub manifest: Option<PathBuf>,

    /// Leave out absolute paths matching this glob (and everything below them); repeatable.
    /// `*` stays inside one directory, `**` crosses any number.
    #[arg(long = "ignore", value_name = "GLOB")]
    pub ignore: Vec<String>,

    /// Print every path instead of the summary.
    #[arg(long, conflicts_with_all = ["json", "nix"])]
    pub long: bool,

    /// Print the result as JSON on stdout.
    #[arg(long, conflicts_with = "nix")]
    pub json: bool,

    /// Print an `environment.persistence` fragment that would keep what remains.
    #[arg(long)]
    pub nix: bool,

    /// Exit with 4 when something unpersisted remains (0 otherwise).
    #[arg(long)]
    pub exit_code: bool,

    /// Read who wrote each path from this `rasa watch` record. [default: /run/rasa/watch.jsonl
    /// for the running root; with --old-root, the record inside it
    /// (var/lib/rasa/watch/record.jsonl)]
    #[arg(long, value_name = "PATH", conflicts_with = "no_watch_record")]
    pub watch_record: Option<PathBuf>,

    /// Write the result as a node_exporter textfile-collector file (e.g.
    /// /var/lib/prometheus-node-exporter-text-files/rasa.prom) instead of printing it: paths and
    /// bytes the next boot erases by unit, and the old roots kept. Replaced atomically.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["long", "json", "nix"])]
    pub prometheus: Option<PathBuf>,

    /// With --prometheus, export the last rollback's result, duration and time from this record
    /// (written by `rasa rollback --record-file`); without one, those metrics are left out.
    #[arg(long, value_name = "PATH", env = crate::rollback::record::ENV, default_value = crate::rollback::record::DEFAULT_PATH)]
    pub rollback_record: PathBuf,

    /// Do not read a watch record, even where there is one.
    #[arg(long)]
    pub no_watch_record: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineChoice {
    Auto,
    Btrfs,
    Walk,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Directory,
    Symlink,
    Other,
}

impl Kind {
    pub fn from_mode(mode: u32) -> Kind {
        match mode & nix::libc::S_IFMT {
            nix::libc::S_IFREG => Kind::File,
            nix::libc::S_IFDIR => Kind::Directory,
            nix::libc::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The blank has nothing at this path, or something else (another inode).
    New,
    /// The blank has this inode at this path, with other contents or metadata.
    Modified,
    /// Under a manifest entry whose storage copy does not exist yet: the next boot mounts an
    /// empty copy over it (whatever the blank holds there too).
    Unstored,
}

/// What is said about [`Status::Unstored`] paths, wherever they are shown.
pub const UNSTORED_NOTE: &str = "in the manifest but not yet in storage (run rasa migrate --apply)";

/// What decides "unchanged": both engines build it, from `lstat` or from the inode item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub ino: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Meta {
    pub fn from_stat(st: &FileStat) -> Meta {
        Meta {
            ino: st.st_ino,
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }

    pub fn from_item(ino: u64, item: &InodeItem) -> Meta {
        Meta {
            ino,
            mode: item.mode,
            uid: item.uid,
            gid: item.gid,
            size: item.size,
            mtime: (item.mtime.0 as i64, item.mtime.1 as i64),
            ctime: (item.ctime.0 as i64, item.ctime.1 as i64),
        }
    }

    /// Unchanged since the blank, as far as the inode's own fields tell. A directory's times
    /// and size change with its entries, which are judged on their own, so only its mode and
    /// owner count here; its extended attributes (ACLs among them) and `chattr` flags are
    /// compared separately when [`Meta::needs_attribute_check`] says so. For anything else the ctime is the witness
    /// of every other change: the kernel sets it on each write, chmod, chown, link and xattr
    /// change, and no one can set it back (a content change hidden with `touch -r` included).
    pub fn same_as(&self, blank: &Meta) -> bool {
        let basics = self.ino == blank.ino
            && self.mode == blank.mode
            && self.uid == blank.uid
            && self.gid == blank.gid;
        if Kind::from_mode(self.mode) == Kind::Directory {
            basics
        } else {
            basics
                && self.size == blank.size
                && self.mtime == blank.mtime
                && self.ctime == blank.ctime
        }
    }

    /// A directory whose ctime moved may have changed extended attributes or `chattr` flags
    /// (or only its entries): those must be compared with the blank's. An unchanged ctime
    /// rules that out.
    pub fn needs_attribute_check(&self, blank: &Meta) -> bool {
        Kind::from_mode(self.mode) == Kind::Directory && self.ctime != blank.ctime
    }

    pub fn reported_size(&self) -> u64 {
        match Kind::from_mode(self.mode) {
            Kind::File | Kind::Symlink => self.size,
            _ => 0,
        }
    }
}

/// Whether the directories `name` in `live_dir` and in `blank_dir` have the same extended
/// attributes (POSIX ACLs, capabilities, security labels, user attributes) and `chattr` flags:
/// the next boot brings back the blank's. Anything that cannot be read counts as different, so
/// a doubt is reported rather than called safe.
pub fn same_dir_attributes(
    live_dir: std::os::fd::BorrowedFd<'_>,
    blank_dir: std::os::fd::BorrowedFd<'_>,
    name: &OsStr,
) -> bool {
    let read = |dir: std::os::fd::BorrowedFd<'_>| {
        let (fd, _) = crate::fs::open_dir(dir, name).ok()??;
        let xattrs =
            crate::copy::read_xattrs_sorted(&crate::copy::XattrSource::Fd(fd.as_fd())).ok()?;
        Some((
            xattrs,
            crate::btrfs::file::inode_flags(fd.as_fd()).unwrap_or(0),
        ))
    };
    match (read(live_dir), read(blank_dir)) {
        (Some(live), Some(blank)) => live == blank,
        _ => false,
    }
}

/// A path for people: UTF-8 as is, except that control characters, backslashes and bytes that
/// are not UTF-8 are written `\n`, `\t`, `\\` and `\xNN`, so every path is one line and
/// nothing is lost.
pub fn escape(path: &[u8]) -> String {
    if path
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'\\')
    {
        // Plain ASCII, by far the common case: nothing to escape.
        return String::from_utf8(path.to_vec()).expect("ASCII");
    }
    let mut out = String::with_capacity(path.len());
    for chunk in path.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// What was compared with what, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct Source {
    pub engine: &'static str,
    /// The tree looked at: `root`, `old_roots/<name>` or a path.
    pub tree: String,
    /// The blank it was compared with; `None`: everything counts as new.
    pub compared_with: Option<String>,
    pub manifest: Option<String>,
    /// Where the persistent copies live (for --nix).
    #[serde(skip)]
    pub storage_root: String,
    /// The units the manifest says keep state, and where (its `services`): who a path belongs
    /// to when no watch record names its writer.
    #[serde(skip)]
    pub services: Vec<crate::manifest::Service>,
}

impl Source {
    /// The tree is an old root (`<old-roots>/<name>`): subvolume names are plain, and a live
    /// root is given as an absolute path, so only an old root is a relative path.
    pub fn is_old_root(&self) -> bool {
        self.tree.contains('/') && !self.tree.starts_with('/')
    }
}

pub struct Outcome {
    pub source: Source,
    pub found: FoundList,
    pub rules: rules::Rules,
    /// Who wrote each path, when a watch record was read.
    pub writers: Option<writers::Writers>,
    /// The tree is what the running system has at `/` (so this boot's watch record is its).
    running_root: bool,
    /// How many old roots the filesystem keeps (`None`: not a rasa layout).
    pub old_roots: Option<usize>,
}

pub fn run(args: Args) -> Result<u8> {
    if let Some(file) = &args.prometheus {
        prometheus::check_target(file)?;
    }
    let outcome = collect(&args)?;
    if let Some(file) = &args.prometheus {
        let last_rollback = match Record::read(&args.rollback_record) {
            Ok(record) => record,
            Err(e) => {
                // The diff metrics are still worth having; the rollback ones are left out.
                log::warn(format!("leaving out the last rollback's metrics: {e:#}"));
                None
            }
        };
        prometheus::write(&outcome, last_rollback.as_ref(), file)?;
        return Ok(if args.exit_code && !outcome.found.is_empty() {
            exit::PROBLEMS
        } else {
            exit::OK
        });
    }
    let mut stdout = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let written = if args.json {
        report::json(&outcome, &mut stdout)
    } else if args.nix {
        nix_fragment::render(&outcome, &mut stdout)
    } else if args.long {
        report::long(&outcome, &mut stdout)
    } else {
        report::summary(&outcome, &mut stdout)
    }
    .and_then(|()| stdout.flush().map_err(Into::into));
    // A reader that stopped early (`rasa diff --long | head`) is not a failure.
    match written {
        Err(e) if is_broken_pipe(&e) => {}
        other => other?,
    }
    // On a broken pipe the rest is dropped unwritten (BufWriter ignores errors when dropped).
    drop(stdout);
    let code = if args.exit_code && !outcome.found.is_empty() {
        exit::PROBLEMS
    } else {
        exit::OK
    };
    // The process ends here: freeing a large diff's paths one by one would only delay that.
    std::mem::forget(outcome);
    Ok(code)
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || cause
                .downcast_ref::<serde_json::Error>()
                .and_then(|json| json.io_error_kind())
                .is_some_and(|kind| kind == std::io::ErrorKind::BrokenPipe)
    })
}

fn load_manifest(explicit: Option<&Path>) -> Result<Option<(PathBuf, Manifest)>> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => match manifest::locate(None) {
            Ok((path, _)) => path,
            Err(_) => {
                log::warn(format!(
                    "no manifest found at {}: nothing counts as persisted (pass --manifest PATH)",
                    manifest::search_path_text()
                ));
                return Ok(None);
            }
        },
    };
    match manifest::load(&path) {
        Ok(manifest) => Ok(Some((path, manifest))),
        Err(e) if crate::error::exit_code_for(&e) == exit::REFUSED => Err(e),
        Err(e) => Err(refuse(
            format!("cannot read the manifest {}: {e:#}", path.display()),
            "make it readable (run as root), or pass another one with --manifest PATH",
        )),
    }
}

/// What the rules are built from; the mounts are added once the tree is known.
pub struct RuleInputs {
    persisted: Vec<String>,
    /// Entries whose storage copy does not exist (a subset of `persisted`).
    unstored: Vec<String>,
    storage_roots: Vec<String>,
    ignore: Vec<String>,
    manifest: Option<String>,
    storage_root: String,
    services: Vec<crate::manifest::Service>,
}

impl RuleInputs {
    pub fn rules(&self, mounts: &[Vec<u8>]) -> Result<rules::Rules> {
        Ok(
            rules::Rules::new(&self.persisted, &self.storage_roots, mounts, &self.ignore)?
                .with_unstored(&self.unstored),
        )
    }

    fn source(&self, engine: &'static str, tree: String, compared_with: Option<String>) -> Source {
        Source {
            engine,
            tree,
            compared_with,
            manifest: self.manifest.clone(),
            storage_root: self.storage_root.clone(),
            services: self.services.clone(),
        }
    }
}

/// What the rules are built from, as `rasa diff` finds it: the manifest (`explicit`, else the
/// next boot's, else /etc/rasa/manifest.json; none is a warning) and the ignore globs. `rasa
/// watch` builds its rules from the same inputs.
pub fn rule_inputs(explicit: Option<&Path>, ignore: &[String]) -> Result<RuleInputs> {
    let manifest = load_manifest(explicit)?;
    let mut inputs = RuleInputs {
        persisted: Vec::new(),
        unstored: Vec::new(),
        storage_roots: Vec::new(),
        ignore: ignore.to_vec(),
        manifest: manifest.as_ref().map(|(p, _)| p.display().to_string()),
        storage_root: String::new(),
        services: Vec::new(),
    };
    if let Some((_, m)) = &manifest {
        inputs.ignore.extend(m.diff_ignore.iter().cloned());
        inputs.services = m.services.clone();
        for entry in &m.entries {
            inputs.persisted.push(entry.path.clone());
            // What the next boot does: mount (or link) storageRoot+path over the path. With no
            // copy there, it makes an empty one, and the live data is gone.
            if std::fs::symlink_metadata(entry.storage_path()).is_err() {
                log::warn(format!(
                    "{} is {UNSTORED_NOTE}: the next boot mounts an empty {} over it, so it counts as erased",
                    entry.path,
                    entry.storage_path().display()
                ));
                inputs.unstored.push(entry.path.clone());
            }
            if !inputs.storage_roots.contains(&entry.storage_root) {
                inputs.storage_roots.push(entry.storage_root.clone());
            }
        }
    }
    inputs.storage_root = inputs
        .storage_roots
        .first()
        .cloned()
        .unwrap_or_else(|| "/persist".to_owned());
    Ok(inputs)
}

fn collect(args: &Args) -> Result<Outcome> {
    let mut outcome = collect_found(args)?;
    if args.no_watch_record {
        outcome.writers = None;
    } else if let Some(path) = &args.watch_record {
        outcome.writers = Some(writers::explicit(path)?);
    } else if outcome.running_root {
        // This boot's record describes the running root.
        outcome.writers = writers::live();
    }
    if !args.no_watch_record {
        outcome.writers = writers::with_declared(outcome.writers.take(), &outcome.source.services);
    }
    if let Some(caveat) = outcome.writers.as_ref().and_then(|w| w.caveat()) {
        log::warn(caveat);
    }
    Ok(outcome)
}

fn collect_found(args: &Args) -> Result<Outcome> {
    let inputs = rule_inputs(args.manifest.as_deref(), &args.ignore)?;
    // Refuse bad patterns before touching any disk.
    inputs.rules(&[])?;

    // The layout is needed for the btrfs engine, for old roots and for a blank. Without an
    // explicit device, a root that is not btrfs is simply walked.
    let layout = if args.engine == EngineChoice::Btrfs
        || args.old_root.is_some()
        || args.layout.device.is_some()
    {
        Some(args.layout.validate()?)
    } else {
        args.layout.validate().ok()
    };

    if let Some(name) = &args.old_root {
        let layout = layout.expect("validated above");
        return from_layout(args, &layout, Some(name), None, &inputs);
    }
    let Some(path) = &args.live_root else {
        return match &layout {
            Some(layout) => from_layout(args, layout, None, None, &inputs),
            None => walk_path(Path::new("/"), &inputs),
        };
    };
    let root_subvolume = match &layout {
        Some(layout) => is_root_subvolume(path, layout)?,
        None => false,
    };
    if root_subvolume {
        let live = btrfs::open_dir_at(nix::fcntl::AT_FDCWD, path.as_os_str())
            .with_context(|| format!("opening {}", path.display()))?;
        let layout = layout.expect("checked above");
        return from_layout(args, &layout, None, Some((live, path.clone())), &inputs);
    }
    if args.engine == EngineChoice::Btrfs {
        let dir = btrfs::open_dir_at(nix::fcntl::AT_FDCWD, path.as_os_str())
            .with_context(|| format!("opening {}", path.display()))?;
        if !btrfs::is_btrfs(dir.as_fd())? {
            return Err(refuse(
                format!(
                    "{} is not on btrfs, so the btrfs engine cannot read it",
                    path.display()
                ),
                "use --engine walk (or leave --engine out to choose automatically)",
            ));
        }
        return Err(refuse(
            format!(
                "{} is not the top of the root subvolume {:?} on {}",
                path.display(),
                args.layout.root,
                layout
                    .as_ref()
                    .map(|l| l.device.display().to_string())
                    .unwrap_or_default()
            ),
            "point --device and --root at the filesystem that holds it, or use --engine walk",
        ));
    }
    walk_path(path, &inputs)
}

/// Walk a directory that has no blank sharing its inode numbers: everything counts as new.
fn walk_path(path: &Path, inputs: &RuleInputs) -> Result<Outcome> {
    let live = btrfs::open_dir_at(nix::fcntl::AT_FDCWD, path.as_os_str())
        .with_context(|| format!("opening {}", path.display()))?;
    let rules = inputs.rules(&rules::mounts_below(path.as_os_str().as_bytes()))?;
    log::info(format!(
        "walking {} with no blank to compare with: everything on it counts as new",
        path.display()
    ));
    let mut found = walk_all(&rules, nix::unistd::dup(live.as_fd())?, None)?;
    add_unstored(&rules, &live, &mut found)?;
    Ok(Outcome {
        source: inputs.source("walk", path.display().to_string(), None),
        found,
        rules,
        writers: None,
        running_root: path == Path::new("/"),
        old_roots: None,
    })
}

/// Is `path` the top of the layout's root subvolume (so the blank's inode numbers apply)?
fn is_root_subvolume(path: &Path, layout: &Layout) -> Result<bool> {
    let dir = btrfs::open_dir_at(nix::fcntl::AT_FDCWD, path.as_os_str())
        .with_context(|| format!("opening {}", path.display()))?;
    if !btrfs::is_btrfs(dir.as_fd())?
        || nix::sys::stat::fstat(dir.as_fd())?.st_ino != btrfs::FIRST_FREE_OBJECTID
        || toplevel::check_device(&layout.device).is_err()
    {
        return Ok(false);
    }
    let info = btrfs::subvol_info(dir.as_fd())?;
    let top = TopLevel::mount(&layout.device, true)?;
    let same = btrfs::open_dir_at(top.fd(), layout.root_os())
        .ok()
        .and_then(|root| btrfs::subvol_info(root.as_fd()).ok())
        .is_some_and(|root| root.uuid == info.uuid);
    top.unmount()?;
    Ok(same)
}

/// Look at the root (or an old root) of the layout, compared with its blank. `live` is the
/// root as mounted on the running system when the user pointed at it with --live-root.
fn from_layout(
    args: &Args,
    layout: &Layout,
    old_root: Option<&str>,
    live: Option<(OwnedFd, PathBuf)>,
    inputs: &RuleInputs,
) -> Result<Outcome> {
    toplevel::check_device(&layout.device)?;
    let top = TopLevel::mount(&layout.device, true)?;
    let (tree, tree_name) = match old_root {
        Some(name) => {
            let known = old_roots::scan(top.fd(), &layout.old_roots)?;
            if !known.iter().any(|r| r.name == name) {
                return Err(old_roots::unknown_old_root(
                    name,
                    layout,
                    &known,
                    "pick a NAME from `rasa old-roots list`",
                ));
            }
            let dir = btrfs::open_dir_at(top.fd(), OsStr::new(&layout.old_roots))?;
            (
                btrfs::open_dir_at(dir.as_fd(), OsStr::new(name))
                    .with_context(|| format!("opening {}/{name}", layout.old_roots))?,
                format!("{}/{name}", layout.old_roots),
            )
        }
        None => match btrfs::open_dir_at(top.fd(), layout.root_os()) {
            Ok(fd) if top.is_subvolume(layout.root_os())? => (fd, layout.root.clone()),
            _ => {
                return Err(refuse(
                    format!(
                        "there is no root subvolume {:?} on {}",
                        layout.root,
                        layout.device.display()
                    ),
                    "pass the name of the subvolume / is mounted from with --root",
                ))
            }
        },
    };
    let tree_info = btrfs::subvol_info(tree.as_fd())?;
    // For --prometheus; a listing that fails says nothing about the diff.
    let old_roots = old_roots::scan(top.fd(), &layout.old_roots)
        .ok()
        .map(|roots| roots.len());
    let blank = match &layout.blank {
        None => None,
        Some(name) => {
            if !top.is_subvolume(OsStr::new(name))? {
                return Err(refuse(
                    format!(
                        "there is no blank subvolume {name:?} on {}",
                        layout.device.display()
                    ),
                    "pass its name with --blank NAME, or --empty if each boot starts from an empty subvolume",
                ));
            }
            let fd = btrfs::open_dir_at(top.fd(), OsStr::new(name))?;
            let info = btrfs::subvol_info(fd.as_fd())?;
            Some((fd, info, name.clone()))
        }
    };
    // None: no blank (everything is new). Some(None): a blank unrelated to the tree.
    let marker = blank
        .as_ref()
        .map(|(_, info, _)| btrfs_engine::marker(&tree_info, info));
    let related = !matches!(marker, Some(None));
    let engine = match args.engine {
        EngineChoice::Btrfs if !related => {
            return Err(refuse(
                format!(
                    "{tree_name} and the blank {:?} are not snapshots of one another, so their inode numbers say nothing about each other",
                    layout.blank.as_deref().unwrap_or_default()
                ),
                "use --engine walk, or pass the right --blank",
            ))
        }
        EngineChoice::Btrfs => "btrfs",
        EngineChoice::Auto if related => "btrfs",
        _ => "walk",
    };
    if !related {
        log::warn(format!(
            "{tree_name} is not a snapshot of {:?} (nor the other way round): everything on it counts as new",
            layout.blank.as_deref().unwrap_or_default()
        ));
    }
    // Mounts matter only for the tree the running system has at /.
    let running_root = old_root.is_none() && is_running_root(&tree)?;
    let (live_fd, display, mounts) = match live {
        Some((fd, path)) => {
            let mounts = rules::mounts_below(path.as_os_str().as_bytes());
            let mounts = separate_mounts(&tree, tree_info.id, &fd, mounts);
            drop(tree);
            (fd, path.display().to_string(), mounts)
        }
        None => {
            let mounts = if running_root {
                let slash = btrfs::open_dir_at(nix::fcntl::AT_FDCWD, OsStr::new("/"))
                    .context("opening /")?;
                separate_mounts(&tree, tree_info.id, &slash, rules::mounts_below(b"/"))
            } else {
                Vec::new()
            };
            (tree, tree_name, mounts)
        }
    };
    let rules = inputs.rules(&mounts)?;
    let blank = blank.filter(|_| related);
    let mut found = if engine == "btrfs" {
        let blank_arg = blank.as_ref().map(|(fd, _, _)| btrfs_engine::Blank {
            fd,
            marker: marker.flatten().unwrap_or(0),
        });
        let progress = spinner("{spinner} read {pos} changed inodes");
        let found = btrfs_engine::run(
            top.fd(),
            &live_fd,
            tree_info.id,
            blank_arg,
            &rules,
            progress.as_ref(),
        )?;
        if let Some(bar) = progress {
            bar.finish_and_clear();
        }
        found
    } else {
        let blank_fd = blank
            .as_ref()
            .map(|(fd, _, _)| nix::unistd::dup(fd.as_fd()))
            .transpose()?;
        walk_all(&rules, nix::unistd::dup(live_fd.as_fd())?, blank_fd)?
    };
    add_unstored(&rules, &live_fd, &mut found)?;
    let compared_with = blank.map(|(_, _, name)| name);
    // An old root carries the record of the boot it served.
    let writers = match old_root {
        Some(_) if !args.no_watch_record && args.watch_record.is_none() => {
            writers::in_tree(live_fd.as_fd(), &display)
        }
        _ => None,
    };
    // Every fd below the mount must be closed before it can be unmounted.
    drop(live_fd);
    top.unmount()?;
    Ok(Outcome {
        source: inputs.source(engine, display, compared_with),
        found,
        rules,
        writers,
        running_root,
        old_roots,
    })
}

/// The mount points that hold something the next boot keeps: all but those where a subvolume
/// nested in the tree is mounted at its own place (snapper's `/.snapshots` inside the root, for
/// one), which `rollback` moves away with the root like any other nested subvolume.
fn separate_mounts(
    tree: &OwnedFd,
    tree_id: u64,
    live: &OwnedFd,
    mounts: Vec<Vec<u8>>,
) -> Vec<Vec<u8>> {
    mounts
        .into_iter()
        .filter(|point| !nested_mounted_in_place(tree, tree_id, live, point))
        .collect()
}

fn nested_mounted_in_place(tree: &OwnedFd, tree_id: u64, live: &OwnedFd, point: &[u8]) -> bool {
    let Some(split) = point.iter().rposition(|&b| b == b'/') else {
        return false;
    };
    let name = OsStr::from_bytes(&point[split + 1..]);
    // In the tree itself (no mounts there): is this place a subvolume nested right here?
    let nested = walk::open_beneath(tree, &point[..split])
        .ok()
        .and_then(|parent| {
            let parent_ino = nix::sys::stat::fstat(parent.as_fd()).ok()?.st_ino;
            let (child, _) = crate::fs::open_dir(parent.as_fd(), name).ok()??;
            let info = btrfs::subvol_info(child.as_fd()).ok()?;
            (info.parent_id == tree_id && info.dirid == parent_ino).then_some(info.uuid)
        });
    let Some(uuid) = nested else {
        return false;
    };
    // And what is mounted there on the live system is that same subvolume.
    walk::open_beneath(live, point)
        .ok()
        .and_then(|mounted| btrfs::subvol_info(mounted.as_fd()).ok())
        .is_some_and(|info| info.uuid == uuid)
}

/// Is this subvolume the one mounted at / right now?
fn is_running_root(tree: &OwnedFd) -> Result<bool> {
    let tree_st = nix::sys::stat::fstat(tree.as_fd())?;
    Ok(nix::sys::stat::stat("/").is_ok_and(|root| {
        root.st_dev == tree_st.st_dev && root.st_ino == btrfs::FIRST_FREE_OBJECTID
    }))
}

/// A spinner on stderr when it is a terminal (a large tree on a cold cache takes a while).
pub(crate) fn spinner(template: &'static str) -> Option<indicatif::ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(indicatif::ProgressStyle::with_template(template).expect("valid template"));
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    })
}

/// Add what lies under the manifest entries that are not in storage yet: each such entry,
/// and everything below it, as the live tree has it, since the next boot hides all of it under
/// an empty copy (what equals the blank included). The engines left these paths out.
fn add_unstored(rules: &rules::Rules, live: &OwnedFd, found: &mut FoundList) -> Result<()> {
    let unstored = rules.unstored();
    if unstored.is_empty() {
        return Ok(());
    }
    for entry in unstored {
        // Below a path left out for another reason (a mount, an ignore glob, a persisted
        // directory): that reason stands.
        let excluded_above = entry
            .iter()
            .enumerate()
            .filter(|&(i, &b)| b == b'/' && i > 0)
            .any(|(i, _)| {
                rules
                    .check(&entry[..i], true, None)
                    .is_some_and(|r| r != rules::Reason::Unstored)
            });
        // Something mounted there (a /home subvolume of its own, say) is not the root's to lose.
        if excluded_above || rules.is_mount(&entry) {
            continue;
        }
        let Some(st) = walk::stat_beneath(live, &entry) else {
            // Nothing there, nothing to lose.
            continue;
        };
        let kind = Kind::from_mode(st.st_mode);
        if kind == Kind::Symlink {
            let target = walk::readlink_beneath(live, &entry).unwrap_or_default();
            // impermanence's link to its copy: nothing here but the link, which comes back.
            if rules.points_into_storage(&target) {
                continue;
            }
        }
        let first = found.len();
        found.push(
            &entry,
            kind,
            Status::Unstored,
            Meta::from_stat(&st).reported_size(),
        );
        if kind == Kind::Directory {
            let walk = walk::Walk::new(rules, live, None)?;
            found.append(&mut walk.run(live, None, entry.clone(), false)?);
        }
        found.set_status_from(first, Status::Unstored);
    }
    // An entry may also have been reported by an engine (e.g. as a nested subvolume).
    found.sort_dedup();
    Ok(())
}

fn walk_all(rules: &rules::Rules, live: OwnedFd, blank: Option<OwnedFd>) -> Result<FoundList> {
    let progress = spinner("{spinner} walked {pos} entries");
    let walk = walk::Walk::new(rules, &live, progress.clone())?;
    let found = walk.run(&live, blank.as_ref(), Vec::new(), true)?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_is_not_plain_text() {
        assert_eq!(escape(b"/etc/caf\xc3\xa9"), "/etc/café");
        assert_eq!(escape(b"/a\xffb"), "/a\\xffb");
        assert_eq!(escape(b"/a\\b\nc"), "/a\\\\b\\nc");
        assert_eq!(escape(b"/\x1b"), "/\\x1b");
    }
}
