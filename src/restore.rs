//! `rasa restore`: copy paths back from an old root, with migrate's copy engine.
//!
//! Shaped like `rollback` and `migrate`: inspect into a [`Plan`] that changes nothing (which old
//! root holds each path, how big it is, what it would replace), then print it or, with
//! `--apply`, execute it. The old roots are read through the top level mounted read-only in a
//! private namespace, every path opened beneath the old root with the descriptor layer (a
//! symlink on the way is reported, never followed). Each path is copied by `copy::Copier` into
//! `.<name>.rasa-restore` beside its destination and renamed into place only when complete and
//! synced, as migrate does: the destination never holds half a copy.
//!
//! A path the manifest persists, with its copy in storage, is served from storage: the old
//! roots hold only the empty mount point (or the link) there, so restoring from them would put
//! an empty directory over the user's data. Such a path is reported and left alone, also when
//! the user deleted it from the live path: that deleted it from storage, which no old root
//! holds.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::btrfs;
use crate::copy::{self, Copier};
use crate::error::{exit, refuse};
use crate::failpoint;
use crate::fs::{self, Beneath, Kind, MountRoots};
use crate::layout::LayoutArgs;
use crate::log;
use crate::manifest::{self, EntryKind, Manifest};
use crate::migrate::apply::{backup_name, make_dir, rename_noreplace, temp_name_for};
use crate::migrate::plan::{fs_error, open_storage_root};
use crate::migrate::ConflictPolicy;
use crate::old_roots;
use crate::toplevel::{self, TopLevel};

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  # Dry run: which old root, how big, what it would replace:
  rasa restore /etc/nixos/configuration.nix
  # Copy it back from the newest old root that holds it:
  rasa restore /etc/nixos/configuration.nix --apply
  # From a given old root:
  rasa restore /home/alice/notes --from 20261122T193000Z --apply
  # Straight into /persist, printing the rasa.directories line to add:
  rasa restore /var/lib/foo --persist --apply
  # Keep what is there now as a backup beside it:
  rasa restore /etc/foo --apply --on-conflict replace-with-backup

A path the manifest persists is served from storage and never restored from an old root.
Exit codes: 0 done (or nothing to do), 3 refused (nothing changed), 4 not found, a problem or a
conflict left alone, 1 failed part-way (rerun; no path is ever left half-copied under its name).")]
pub struct Args {
    /// Absolute paths as they were on the root, e.g. /etc/nixos/configuration.nix.
    #[arg(value_name = "PATH", required = true)]
    pub paths: Vec<PathBuf>,

    /// The old root to copy from (a NAME of `rasa old-roots list`) [default: the newest that
    /// holds each path].
    #[arg(long, value_name = "OLD_ROOT")]
    pub from: Option<String>,

    /// Copy (without it, nothing is changed).
    #[arg(long)]
    pub apply: bool,

    /// Copy back to the live path (the default).
    #[arg(long, conflicts_with = "persist")]
    pub to_live: bool,

    /// Copy into the storage root instead of the live path, and print the `rasa.directories` or
    /// `rasa.files` line that keeps it from the next boot on.
    #[arg(long)]
    pub persist: bool,

    /// The storage root for --persist [default: the manifest's first, else /persist].
    #[arg(long, value_name = "PATH", requires = "persist")]
    pub storage_root: Option<String>,

    /// What to do when the destination holds a different version: `stop` (copy nothing for
    /// it, exit 4), `keep-storage` (keep what the destination holds), `replace-with-backup`
    /// (rename it to `<name>.rasa-backup-<unix time>`, then copy). Migrate's policies.
    #[arg(
        long,
        value_enum,
        value_name = "POLICY",
        default_value = "stop",
        hide_possible_values = true
    )]
    pub on_conflict: ConflictPolicy,

    /// The manifest that says what is persisted [default: the next boot's, then
    /// /etc/rasa/manifest.json].
    #[arg(long, value_name = "PATH")]
    pub manifest: Option<PathBuf>,

    /// Where the live paths are: `/` on a running system, the system's mount point from an
    /// installer or a rescue system.
    #[arg(long, value_name = "PATH", default_value = "/")]
    pub live_root: PathBuf,

    /// Print the plan (or, with --apply, the result) as JSON on stdout.
    #[arg(long)]
    pub json: bool,

    /// Block device that holds the btrfs filesystem [default: the btrfs device mounted at /].
    #[arg(long, value_name = "DEVICE", env = "RASA_DEVICE")]
    pub device: Option<PathBuf>,

    /// Directory at the top level where previous roots are kept.
    #[arg(long, value_name = "NAME", default_value = "old_roots")]
    pub old_roots: String,
}

impl Args {
    /// The layout flags restore has (`--persist` is its own flag here, not the subvolume name).
    fn layout(&self) -> LayoutArgs {
        LayoutArgs {
            device: self.device.clone(),
            root: "root".into(),
            blank: "root-blank".into(),
            empty: false,
            old_roots: self.old_roots.clone(),
            persist: "persist".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Will be (or was) copied.
    Copy,
    /// The destination already holds the same thing.
    Identical,
    /// The destination holds another version; `resolution` says what is done.
    Conflict,
    /// Persisted by the manifest and in storage: served from there, not from an old root.
    Persisted,
    /// Inside another path given on the command line, whose copy holds it.
    Covered,
    /// No old root holds it.
    NotFound,
    /// Cannot be restored as it is; `fix` says what to do.
    Problem,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Planned {
    pub path: String,
    pub action: Action,
    /// The old root it is copied from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Whether `from` was chosen as the newest old root holding the path (no --from).
    pub newest_holding: bool,
    /// What the copy will be written to.
    pub destination: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub bytes: u64,
    pub items: u64,
    /// What the destination holds now, which the copy would replace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<ConflictPolicy>,
    /// Newer old roots passed over because a symlink stands on the way to the path in them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub passed_over: Vec<String>,
    /// With --persist: the line to add to the configuration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nix_line: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<copy::Stats>,
}

impl Planned {
    fn covered(path: &str, outer: &str, destination: &Destination) -> Planned {
        Planned {
            path: path.to_owned(),
            action: Action::Covered,
            from: None,
            newest_holding: false,
            destination: destination.shown(path),
            kind: None,
            bytes: 0,
            items: 0,
            replaces: None,
            reason: Some(format!("inside {outer}, which is restored with it")),
            fix: None,
            resolution: None,
            passed_over: Vec::new(),
            nix_line: None,
            backup: None,
            result: None,
        }
    }

    fn will_copy(&self) -> bool {
        self.action == Action::Copy
            || (self.action == Action::Conflict
                && self.resolution == Some(ConflictPolicy::ReplaceWithBackup))
    }

    fn unresolved(&self) -> bool {
        matches!(self.action, Action::NotFound | Action::Problem)
            || (self.action == Action::Conflict && self.resolution == Some(ConflictPolicy::Stop))
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub applied: bool,
    pub persist: bool,
    pub entries: Vec<Planned>,
}

/// Where copies go: the live root or a storage root, both under `--live-root`.
struct Destination {
    fd: OwnedFd,
    /// `""` for the live root, the storage root (e.g. `/persist`) otherwise.
    prefix: String,
}

impl Destination {
    fn shown(&self, path: &str) -> String {
        format!("{}{path}", self.prefix.trim_end_matches('/'))
    }
}

pub fn run(args: Args) -> Result<u8> {
    let mut paths: Vec<String> = Vec::new();
    for path in &args.paths {
        let path = normalized(path)?;
        if !paths.contains(&path) {
            paths.push(path);
        }
    }
    let manifest = load_manifest(args.manifest.as_deref())?;
    let layout = args.layout().validate()?;
    toplevel::check_device(&layout.device)?;
    let (live, live_root) = crate::migrate::open_live_root(&args.live_root)?;
    let destination = if args.persist {
        let root = args.storage_root.clone().unwrap_or_else(|| {
            manifest
                .as_ref()
                .and_then(|m| m.entries.first())
                .map_or_else(|| "/persist".to_owned(), |e| e.storage_root.clone())
        });
        Destination {
            fd: open_storage_root(live.as_fd(), &live_root, &root)?,
            prefix: root,
        }
    } else {
        Destination {
            fd: nix::unistd::dup(live.as_fd())?,
            prefix: String::new(),
        }
    };

    let top = TopLevel::mount(&layout.device, true)?;
    let scan = old_roots::scan(top.fd(), &layout.old_roots)?;
    let candidates: Vec<String> = match &args.from {
        Some(name) => {
            if !scan.iter().any(|r| &r.name == name) {
                return Err(old_roots::unknown_old_root(
                    name,
                    &layout,
                    &scan,
                    "pick a NAME from `rasa old-roots list`, or leave --from out to use the newest that holds the path",
                ));
            }
            vec![name.clone()]
        }
        None => scan.iter().rev().map(|r| r.name.clone()).collect(),
    };
    let old_roots_dir = btrfs::open_dir_at(top.fd(), OsStr::new(&layout.old_roots))
        .with_context(|| format!("opening {}", layout.old_roots));
    let opened: Vec<(String, OwnedFd)> = if candidates.is_empty() {
        Vec::new()
    } else {
        let dir = old_roots_dir?;
        candidates
            .iter()
            .map(|name| {
                btrfs::open_dir_at(dir.as_fd(), OsStr::new(name))
                    .with_context(|| format!("opening {}/{name}", layout.old_roots))
                    .map(|fd| (name.clone(), fd))
            })
            .collect::<Result<_>>()?
    };
    let mounts = MountRoots::below(top.path());

    let mut entries = Vec::new();
    for path in &paths {
        if let Some(outer) = paths
            .iter()
            .find(|outer| *outer != path && Path::new(path).starts_with(outer))
        {
            entries.push(Planned::covered(path, outer, &destination));
            continue;
        }
        entries.push(plan_one(
            path,
            &opened,
            args.from.is_some(),
            &destination,
            manifest.as_ref(),
            &live_root,
            &mounts,
            &args,
        )?);
    }
    if args.apply {
        let total = entries
            .iter()
            .filter(|p| p.will_copy())
            .map(|p| p.bytes)
            .sum();
        let bar = crate::log::copy_progress(total);
        for planned in entries.iter_mut().filter(|p| p.will_copy()) {
            let from = planned.from.clone().expect("a copy has a source");
            let source = &opened.iter().find(|(n, _)| *n == from).expect("opened").1;
            bar.set_message(planned.path.clone());
            apply_one(planned, source.as_fd(), &destination, &|n| bar.inc(n)).map_err(|e| {
                bar.abandon();
                e.context(format!(
                    "restoring {} (paths before it are complete; rerun to finish)",
                    planned.path
                ))
            })?;
        }
        bar.finish_and_clear();
    }
    drop(opened);
    top.unmount()?;

    let report = Report {
        applied: args.apply,
        persist: args.persist,
        entries,
    };
    let text = if args.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        render(&report, &layout.old_roots)
    };
    log::print_stdout(&text)?;
    Ok(if report.entries.iter().any(Planned::unresolved) {
        exit::PROBLEMS
    } else {
        exit::OK
    })
}

/// An absolute path without `.`, `..` or empty components, not `/` itself.
pub fn normalized(path: &Path) -> Result<String> {
    let bad = |why: &str| {
        refuse(
            format!("cannot restore {:?}: {why}", path.display().to_string()),
            "give the absolute path the file had on the root, e.g. /etc/nixos/configuration.nix",
        )
    };
    if !path.is_absolute() {
        return Err(bad("it is not an absolute path"));
    }
    let mut out = String::new();
    for component in path.components() {
        match component {
            Component::RootDir => {}
            Component::Normal(part) => {
                out.push('/');
                out.push_str(part.to_str().ok_or_else(|| bad("it is not UTF-8"))?);
            }
            _ => return Err(bad("it contains `.` or `..`")),
        }
    }
    if out.is_empty() {
        return Err(bad(
            "that is the whole root (boot the old root instead, see the guide)",
        ));
    }
    Ok(out)
}

fn load_manifest(explicit: Option<&Path>) -> Result<Option<Manifest>> {
    if let Some(path) = explicit {
        return manifest::load(path).map(Some);
    }
    match manifest::locate(None) {
        Ok((path, _)) => manifest::load(&path).map(Some),
        Err(_) => {
            log::warn(format!(
                "no manifest found at {}: nothing counts as persisted (pass --manifest PATH)",
                manifest::search_path_text()
            ));
            Ok(None)
        }
    }
}

/// The manifest entry that persists `path` (the path itself or a directory above it) and whose
/// storage copy exists.
fn persisted_by<'m>(
    manifest: Option<&'m Manifest>,
    path: &str,
    live_root: &Path,
) -> Option<(&'m manifest::Entry, PathBuf)> {
    manifest?.entries.iter().find_map(|entry| {
        let covers = entry.path == path
            || (entry.kind == EntryKind::Directory && Path::new(path).starts_with(&entry.path));
        let stored = live_root.join(
            entry
                .storage_path()
                .strip_prefix("/")
                .unwrap_or(&entry.storage_path()),
        );
        (covers && std::fs::symlink_metadata(&stored).is_ok()).then_some((entry, stored))
    })
}

/// Where a path is in one old root (`path` as [`normalized`] gives it).
pub enum Found {
    At(OwnedFd, nix::sys::stat::FileStat),
    Absent,
    /// A symlink on the way (component path and target): not followed.
    Symlink(String, String),
}

pub fn find_in(root: BorrowedFd<'_>, path: &str) -> Result<Found> {
    let parts = fs::components(OsStr::new(path));
    let (name, parents) = parts.split_last().expect("normalized: not /");
    Ok(
        match fs::open_dir_beneath(root, parents).map_err(|e| fs_error(path, e))? {
            Beneath::Dir(fd, _) => match fs::lstat_at(fd.as_fd(), name)? {
                Some(st) => Found::At(fd, st),
                None => Found::Absent,
            },
            Beneath::Symlink { at, target } => Found::Symlink(
                fs::joined(&parts[..=at]),
                Path::new(&target).display().to_string(),
            ),
            Beneath::Missing { .. } | Beneath::NotDirectory { .. } => Found::Absent,
        },
    )
}

#[allow(clippy::too_many_arguments)]
fn plan_one(
    path: &str,
    old_roots: &[(String, OwnedFd)],
    explicit_from: bool,
    destination: &Destination,
    manifest: Option<&Manifest>,
    live_root: &Path,
    mounts: &MountRoots,
    args: &Args,
) -> Result<Planned> {
    let mut planned = Planned {
        path: path.to_owned(),
        action: Action::Copy,
        from: None,
        newest_holding: !explicit_from,
        destination: destination.shown(path),
        kind: None,
        bytes: 0,
        items: 0,
        replaces: None,
        reason: None,
        fix: None,
        resolution: None,
        passed_over: Vec::new(),
        nix_line: None,
        backup: None,
        result: None,
    };
    if let Some((entry, stored)) = persisted_by(manifest, path, live_root) {
        planned.action = Action::Persisted;
        planned.reason = Some(format!(
            "persisted by the manifest entry {} and served from storage ({}), which no boot \
             erases; the old roots hold only the empty mount point there",
            entry.path,
            stored.display()
        ));
        planned.fix = Some(format!(
            "if it was deleted, it was deleted in {}: get it back from a backup or snapshot \
             of the persistent subvolume",
            entry.storage_root
        ));
        return Ok(planned);
    }
    // Inside a persisted directory it would be put under (or over) a bind mount from storage,
    // and a replaced directory would take the mounts along into its backup.
    let inside: Vec<&str> = manifest
        .map(|m| {
            m.entries
                .iter()
                .filter(|e| e.path != path && Path::new(&e.path).starts_with(path))
                .map(|e| e.path.as_str())
                .collect()
        })
        .unwrap_or_default();
    if !inside.is_empty() {
        planned.action = Action::Problem;
        planned.reason = Some(format!(
            "it holds paths the manifest persists ({}), which are served from storage",
            inside.join(", ")
        ));
        planned.fix = Some(format!(
            "restore the paths inside {path} that are not persisted, one by one (`rasa old-roots \
             mount NAME` to see them)"
        ));
        return Ok(planned);
    }
    let parts = fs::components(OsStr::new(path));
    let (name, parents) = parts.split_last().expect("normalized: not /");
    let mut source = None;
    for (root_name, root) in old_roots {
        match find_in(root.as_fd(), path)? {
            Found::At(parent, st) => {
                source = Some((root_name.clone(), parent, st));
                break;
            }
            Found::Absent => {}
            Found::Symlink(link, target) => planned.passed_over.push(format!(
                "{root_name}: {link} is a symlink to {target} there (not followed)"
            )),
        }
    }
    let Some((root_name, source_parent, source_st)) = source else {
        if explicit_from && !planned.passed_over.is_empty() {
            planned.action = Action::Problem;
            planned.reason = Some(format!(
                "in the old root {}",
                planned.passed_over.join("; ")
            ));
            planned.fix = Some(
                "restore the path the symlink points to instead (rasa never follows a symlink in \
                 an old root), or browse it with `rasa old-roots mount NAME`"
                    .into(),
            );
        } else {
            planned.action = Action::NotFound;
            planned.reason = Some(if old_roots.is_empty() {
                "there are no old roots".to_owned()
            } else {
                format!(
                    "not in {} (of {} old root{} looked at)",
                    if explicit_from {
                        "that old root"
                    } else {
                        "any old root"
                    },
                    old_roots.len(),
                    if old_roots.len() == 1 { "" } else { "s" }
                )
            });
            planned.fix = Some(
                "check the spelling with `rasa old-roots list --has PATH`; a path that was \
                 persisted is in storage, not in the old roots"
                    .into(),
            );
        }
        return Ok(planned);
    };
    planned.from = Some(root_name);
    let kind = Kind::of(&source_st);
    planned.kind = Some(kind.described());
    if args.persist {
        let list = if kind == Kind::Directory {
            "directories"
        } else {
            "files"
        };
        planned.nix_line = Some(format!("rasa.{list} = [ \"{path}\" ];"));
    }
    if kind == Kind::Socket {
        planned.action = Action::Problem;
        planned.reason = Some("a socket: only its server can make one".into());
        planned.fix = Some("restart the service that makes it".into());
        return Ok(planned);
    }
    let size = fs::measure(source_parent.as_fd(), name, mounts).map_err(|(rel, e)| {
        fs_error(
            &Path::new(path)
                .parent()
                .unwrap_or(Path::new("/"))
                .join(rel)
                .display()
                .to_string(),
            e,
        )
    })?;
    planned.bytes = size.bytes;
    planned.items = size.items;

    let dest_parent = match fs::open_dir_beneath(destination.fd.as_fd(), parents)
        .map_err(|e| fs_error(&planned.destination, e))?
    {
        Beneath::Dir(fd, _) => Some(fd),
        Beneath::Missing { .. } => None,
        Beneath::Symlink { at, target } => {
            planned.action = Action::Problem;
            planned.reason = Some(format!(
                "{} is a symlink to {}: rasa never writes through a symlink",
                destination.shown(&fs::joined(&parents[..=at])),
                Path::new(&target).display()
            ));
            planned.fix = Some(
                "restore the path the symlink points to instead, or replace the symlink with a \
                 directory, then rerun"
                    .into(),
            );
            return Ok(planned);
        }
        Beneath::NotDirectory { at, kind } => {
            planned.action = Action::Problem;
            planned.reason = Some(format!(
                "{} is {}, so {path} cannot be put below it",
                destination.shown(&fs::joined(&parents[..=at])),
                kind.described()
            ));
            planned.fix = Some("move what is in the way, then rerun".into());
            return Ok(planned);
        }
    };
    let existing = match &dest_parent {
        Some(fd) => fs::lstat_at(fd.as_fd(), name)?,
        None => None,
    };
    let (Some(existing), Some(dest_parent)) = (existing, dest_parent) else {
        return Ok(planned);
    };
    planned.replaces = Some(describe(&existing));
    let difference = copy::first_difference(
        source_parent.as_fd(),
        name,
        dest_parent.as_fd(),
        name,
        Path::new(name),
        &|_| false,
    )?;
    match difference {
        None => planned.action = Action::Identical,
        Some(difference) => {
            planned.action = Action::Conflict;
            planned.reason = Some(difference);
            planned.resolution = Some(args.on_conflict);
        }
    }
    Ok(planned)
}

fn describe(st: &nix::sys::stat::FileStat) -> String {
    let kind = Kind::of(st);
    match kind {
        Kind::File => format!(
            "{} of {}",
            kind.described(),
            indicatif::HumanBytes(st.st_size as u64)
        ),
        _ => kind.described().to_owned(),
    }
}

/// Copy one planned path: parents made as the old root has them, the copy under a temporary
/// name, synced, the version it replaces renamed to a backup (replace-with-backup), the copy
/// renamed into place, synced.
fn apply_one(
    planned: &mut Planned,
    old_root: BorrowedFd<'_>,
    destination: &Destination,
    progress: &dyn Fn(u64),
) -> Result<()> {
    let parts = fs::components(OsStr::new(&planned.path));
    let (name, parents) = parts.split_last().expect("normalized: not /");
    let Found::At(source_parent, _) = find_in(old_root, &planned.path)? else {
        anyhow::bail!("it changed in the old root since the plan was made");
    };
    let dest_parent = ensure_parents(old_root, destination, parents)?;
    let temp = temp_name_for(name, "restore");
    copy::remove_tree(dest_parent.as_fd(), &temp)
        .with_context(|| format!("removing the leftover {}", Path::new(&temp).display()))?;
    let reflink = matches!(
        (btrfs::fsid(source_parent.as_fd()), btrfs::fsid(dest_parent.as_fd())),
        (Some(a), Some(b)) if a == b
    );
    let after_file = || failpoint::hit("restore-copied-file");
    let mut copier = Copier::new(reflink, progress, &after_file);
    copier.copy(source_parent.as_fd(), name, dest_parent.as_fd(), &temp)?;
    copy::sync_filesystem(dest_parent.as_fd())?;
    if planned.action == Action::Conflict {
        let backup = backup_name(name);
        rename_noreplace(dest_parent.as_fd(), name, &backup)?;
        planned.backup = Some(format!(
            "{}/{}",
            Path::new(&planned.destination)
                .parent()
                .unwrap_or(Path::new("/"))
                .display()
                .to_string()
                .trim_end_matches('/'),
            Path::new(&backup).display()
        ));
    }
    rename_noreplace(dest_parent.as_fd(), &temp, name)?;
    copy::sync_filesystem(dest_parent.as_fd())?;
    planned.result = Some(copier.stats);
    Ok(())
}

/// Open the destination's directories above a path, making each missing one with the owner
/// and mode its counterpart has in the old root (never wider than it was).
fn ensure_parents(
    old_root: BorrowedFd<'_>,
    destination: &Destination,
    parents: &[OsString],
) -> Result<OwnedFd> {
    let mut source = nix::unistd::dup(old_root)?;
    let mut current = nix::unistd::dup(destination.fd.as_fd())?;
    for (i, part) in parents.iter().enumerate() {
        let shown = || destination.shown(&fs::joined(&parents[..=i]));
        let (next_source, source_st) = fs::open_dir(source.as_fd(), part)
            .map_err(|e| fs_error(&fs::joined(&parents[..=i]), e))?
            .with_context(|| {
                format!("{} vanished from the old root", fs::joined(&parents[..=i]))
            })?;
        source = next_source;
        match fs::lstat_at(current.as_fd(), part)? {
            Some(st) if Kind::of(&st) == Kind::Directory => {}
            Some(st) => anyhow::bail!(
                "{} became {} since the plan was made",
                shown(),
                Kind::of(&st).described()
            ),
            None => make_dir(
                current.as_fd(),
                part,
                source_st.st_uid,
                source_st.st_gid,
                source_st.st_mode & 0o7777,
            )?,
        }
        current = match fs::open_dir(current.as_fd(), part).map_err(|e| fs_error(&shown(), e))? {
            Some((fd, _)) => fd,
            None => anyhow::bail!("{} vanished while it was being created", shown()),
        };
    }
    Ok(current)
}

fn render(report: &Report, old_roots_dir: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for p in &report.entries {
        let from = p.from.as_deref().unwrap_or_default();
        let chosen = if p.newest_holding {
            " (the newest old root that holds it)"
        } else {
            ""
        };
        let _ = match p.action {
            Action::Copy | Action::Conflict | Action::Identical => writeln!(
                out,
                "{}: from old root {from}{chosen}\n  {old_roots_dir}/{from}{} -> {}: {}, {} in {} item{}",
                p.path,
                p.path,
                p.destination,
                p.kind.unwrap_or_default(),
                indicatif::HumanBytes(p.bytes),
                p.items,
                if p.items == 1 { "" } else { "s" }
            ),
            _ => writeln!(out, "{}:", p.path),
        };
        for passed in &p.passed_over {
            let _ = writeln!(out, "  passed over {passed}");
        }
        let line = match (p.action, p.resolution) {
            (Action::Copy, _) if report.applied => "  copied (it did not exist there)".to_owned(),
            (Action::Copy, _) => "  would copy (nothing is there now)".to_owned(),
            (Action::Identical, _) => format!(
                "  identical: {} already holds the same; nothing to do",
                p.destination
            ),
            (Action::Conflict, Some(ConflictPolicy::Stop)) => format!(
                "  CONFLICT: {} holds {} that differs ({}); left alone (pass --on-conflict)",
                p.destination,
                p.replaces.as_deref().unwrap_or_default(),
                p.reason.as_deref().unwrap_or_default()
            ),
            (Action::Conflict, Some(ConflictPolicy::KeepStorage)) => format!(
                "  conflict: {} holds {} that differs ({}); kept as it is",
                p.destination,
                p.replaces.as_deref().unwrap_or_default(),
                p.reason.as_deref().unwrap_or_default()
            ),
            (Action::Conflict, _) => match &p.backup {
                Some(backup) => format!("  copied; the version it replaced is now {backup}"),
                None => format!(
                    "  would replace {} ({}), keeping it as <name>.rasa-backup-<time>",
                    p.replaces.as_deref().unwrap_or_default(),
                    p.reason.as_deref().unwrap_or_default()
                ),
            },
            (Action::Covered, _) => format!("  {}", p.reason.as_deref().unwrap_or_default()),
            (Action::Persisted, _) => format!(
                "  not restored: {}\n  fix: {}",
                p.reason.as_deref().unwrap_or_default(),
                p.fix.as_deref().unwrap_or_default()
            ),
            (Action::NotFound, _) | (Action::Problem, _) => format!(
                "  {}: {}\n  fix: {}",
                if p.action == Action::NotFound {
                    "NOT FOUND"
                } else {
                    "PROBLEM"
                },
                p.reason.as_deref().unwrap_or_default(),
                p.fix.as_deref().unwrap_or_default()
            ),
        };
        let _ = writeln!(out, "{line}");
    }
    let lines: Vec<&str> = report
        .entries
        .iter()
        .filter(|p| p.will_copy() || p.action == Action::Identical)
        .filter_map(|p| p.nix_line.as_deref())
        .collect();
    if !lines.is_empty() {
        let _ = writeln!(
            out,
            "\nto keep {} from the next boot on, add to your configuration and rebuild:",
            if lines.len() == 1 { "it" } else { "them" }
        );
        for line in lines {
            let _ = writeln!(out, "  {line}");
        }
    }
    if !report.applied && report.entries.iter().any(Planned::will_copy) {
        let _ = writeln!(
            out,
            "\ndry run: nothing was changed; rerun with --apply to copy"
        );
    }
    out
}
