//! Whether a copy is still what its source is: the first difference between two trees, walked
//! side by side by `fs::Trees` with one open directory per side, so a tree of any depth is
//! compared within any file limit.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result};
use nix::sys::stat::FileStat;

use super::attrs::xattrs_at;
use super::{replaced_while, same_content};
use crate::failpoint;
use crate::fs::{self, Here, Kind, Visit, Visitor};

/// The first difference between two trees, or `None` when they are the same in everything the
/// copy preserves (type, owner, mode, mtime, size, content, link target, device number, xattrs,
/// names). Sockets are ignored on both sides because the copy skips them, and so are the
/// directories of side `a` for which `left_out` holds (mount points the copy leaves out).
/// An error names the path it happened at, once.
pub fn first_difference(
    a_dir: BorrowedFd<'_>,
    a_name: &OsStr,
    b_dir: BorrowedFd<'_>,
    b_name: &OsStr,
    rel: &Path,
    left_out: &dyn Fn(&FileStat) -> bool,
) -> Result<Option<String>> {
    let (dirs, names) = ([a_dir, b_dir], [a_name, b_name]);
    let mut comparison = Comparison { left_out };
    super::walk(dirs, names, rel, &mut comparison, "comparing", show)
}

/// What the comparison does with each name met by the walk of both trees: compare it, and go
/// into a pair of directories holding the same names.
struct Comparison<'l> {
    left_out: &'l dyn Fn(&FileStat) -> bool,
}

impl Visitor<2> for Comparison<'_> {
    type Frame = ();
    /// The first difference.
    type Stop = String;
    type Error = anyhow::Error;

    fn visit(&mut self, here: Here<'_, 2>) -> Result<Visit<2, (), String>> {
        let b = match compare_entry(here)? {
            Compared::Differs(difference) => return Ok(Visit::Stop(difference)),
            Compared::Same(b) => b,
        };
        if Kind::of(&here.st) != Kind::Directory {
            return Ok(Visit::Next);
        }
        Ok(match open_pair(here, &b, self.left_out)? {
            Opened::Differs => Visit::Stop(differs(here.at, "list of names inside")),
            Opened::Pair(da, db, names) => Visit::Enter([da, db], names, ()),
        })
    }

    fn gone(&mut self, at: &Path) -> Result<Visit<2, (), String>> {
        Ok(Visit::Stop(on_one_side_only(at)))
    }
}

// One value at a time, returned and taken apart at once: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Compared {
    Differs(String),
    /// The same in everything but what is inside (for directories); side `b` as inspected.
    Same(FileStat),
}

/// Compare one name on both sides (`a` as inspected by the walk), all but what is inside a
/// directory.
fn compare_entry(here: Here<'_, 2>) -> Result<Compared> {
    let ([a_dir, b_dir], [a_name, b_name], a, rel) = (here.dirs, here.names, here.st, here.at);
    let Some(b) = fs::lstat_at(b_dir, b_name).context("inspecting it")? else {
        return Ok(Compared::Differs(on_one_side_only(rel)));
    };
    let at = |what: &str| Ok(Compared::Differs(differs(rel, what)));
    if a.st_mode != b.st_mode {
        return at("type or mode");
    }
    if (a.st_uid, a.st_gid) != (b.st_uid, b.st_gid) {
        return at("owner");
    }
    let kind = Kind::of(&a);
    if kind != Kind::Directory && (a.st_mtime, a.st_mtime_nsec) != (b.st_mtime, b.st_mtime_nsec) {
        return at("modification time");
    }
    if kind == Kind::File && a.st_size != b.st_size {
        return at("size");
    }
    if matches!(kind, Kind::CharDevice | Kind::BlockDevice) && a.st_rdev != b.st_rdev {
        return at("device number");
    }
    if kind == Kind::Symlink {
        let target = |dir, name| fs::read_link_at(dir, name).context("reading the symlink");
        if target(a_dir, a_name)? != target(b_dir, b_name)? {
            return at("symlink target");
        }
    }
    if kind != Kind::Socket && xattrs_at(a_dir, a_name)? != xattrs_at(b_dir, b_name)? {
        return at("extended attributes (xattrs, ACLs, capabilities)");
    }
    if kind == Kind::File {
        failpoint::hit("compare-before-opening-file");
        let fa = fs::open_verified(a_dir, a_name, &a).map_err(replaced_while("compared"))?;
        let fb = fs::open_verified(b_dir, b_name, &b).map_err(replaced_while("compared"))?;
        if !same_content(fa.as_fd(), fb.as_fd())? {
            return at("content");
        }
    }
    Ok(Compared::Same(b))
}

enum Opened {
    /// The two directories hold different names.
    Differs,
    /// Both directories, open, and the names inside them, sorted.
    Pair(OwnedFd, OwnedFd, Vec<OsString>),
}

/// Open a pair of directories compared equal so far and list what is inside them.
fn open_pair(
    here: Here<'_, 2>,
    b: &FileStat,
    left_out: &dyn Fn(&FileStat) -> bool,
) -> Result<Opened> {
    let ([a_dir, b_dir], [a_name, b_name]) = (here.dirs, here.names);
    let open = |dir, name, st| fs::open_verified(dir, name, st).map_err(replaced_while("compared"));
    let (da, db) = (open(a_dir, a_name, &here.st)?, open(b_dir, b_name, b)?);
    let na = kept_names(da.as_fd(), left_out)?;
    let nb = kept_names(db.as_fd(), &|_| false)?;
    Ok(if na == nb {
        Opened::Pair(da, db, na)
    } else {
        Opened::Differs
    })
}

/// The names in `dir` the copy keeps, sorted: sockets and, on the live side, mount points are
/// not copied, so not compared.
fn kept_names(dir: BorrowedFd<'_>, left_out: &dyn Fn(&FileStat) -> bool) -> Result<Vec<OsString>> {
    let mut kept = Vec::new();
    for name in fs::list(dir).context("listing the directory")? {
        match fs::lstat_at(dir, &name).context("inspecting what is inside")? {
            Some(st) if Kind::of(&st) == Kind::Socket || left_out(&st) => {}
            Some(_) => kept.push(name),
            None => {}
        }
    }
    kept.sort();
    Ok(kept)
}

fn on_one_side_only(rel: &Path) -> String {
    format!("{} exists on one side only", rel.display())
}

fn differs(rel: &Path, what: &str) -> String {
    format!("{}: {what} differs", show(rel))
}

fn show(rel: &Path) -> String {
    format!("{:?}", rel.as_os_str())
        .trim_matches('"')
        .to_owned()
}
