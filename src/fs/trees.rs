//! The one walk of a tree: every command that goes through a tree (copy, compare, remove,
//! measure, the uid/gid check) does it with [`Trees`] and keeps only what it does with each name.
//!
//! It walks `N` trees in step (one for a measure or a removal; a source and its copy; the two
//! sides of a comparison) in pre-order with an explicit stack, holding one open directory per
//! tree however deep it is (see [`Cursor`]): a 2,000-level tree needs no more descriptors than a
//! flat one and no deep recursion. Going back up checks, through `..`, that each parent is the
//! directory the walk came down from, so a tree moved under the walk stops it
//! ([`super::CHANGED`]) instead of walking somewhere else.
//!
//! Each name is inspected (`lstat_at`, never following) on the first tree and handed to a
//! [`Visitor`], which does its own work and says whether to go into it (with the directories
//! it opened and verified on each side and the names inside to walk). The walk keeps the path
//! it is at, from the start, so that an error names it once.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::stat::FileStat;

use super::{lstat_at, Cursor};

/// Which step of the walk itself failed, for the caller to word the error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failed {
    /// Inspecting a name (`lstat_at`).
    Inspecting,
    /// Going into a directory the visitor opened.
    Entering,
    /// Going back up: [`super::CHANGED`] when a parent is not the directory the walk came down
    /// from (the tree was moved).
    GoingUp,
}

/// What to do after visiting one name.
pub enum Visit<const N: usize, F, S> {
    /// Nothing to go into: not a directory, left out, or gone.
    Next,
    /// Go into this directory: its descriptors (one per tree, opened and verified by the
    /// visitor), the names inside it to walk, and what the visitor wants back when it is done.
    Enter([OwnedFd; N], Vec<OsString>, F),
    /// End the walk here with this outcome.
    Stop(S),
}

/// Where a visit happens: the directory of the name on each tree and the name on each (the
/// same one below the start), the path from the start (the name included), and the name as
/// inspected on the first tree.
#[derive(Clone, Copy)]
pub struct Here<'a, const N: usize> {
    pub dirs: [BorrowedFd<'a>; N],
    pub names: [&'a OsStr; N],
    pub at: &'a Path,
    /// The start itself (not a name inside a walked directory).
    pub top: bool,
    pub st: FileStat,
}

/// What one walk does with what it meets.
pub trait Visitor<const N: usize> {
    /// Kept for each directory entered, given back to [`Visitor::finish`].
    type Frame;
    /// The outcome of a walk ended early ([`Visit::Stop`]).
    type Stop;
    type Error;

    /// One name that exists on the first tree.
    fn visit(
        &mut self,
        here: Here<'_, N>,
    ) -> Result<Visit<N, Self::Frame, Self::Stop>, Self::Error>;

    /// A name (at `at`) that no longer exists on the first tree: gone since it was listed or
    /// planned, so nothing to do unless the visitor says otherwise.
    fn gone(&mut self, _at: &Path) -> Result<Visit<N, Self::Frame, Self::Stop>, Self::Error> {
        Ok(Visit::Next)
    }

    /// Everything inside a directory has been visited; the walk is still in it (`dirs`).
    fn finish(
        &mut self,
        _dirs: [BorrowedFd<'_>; N],
        _frame: Self::Frame,
        _at: &Path,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The walk went back up from the directory `names` to its parents `dirs`, and closed it.
    fn left(&mut self, _dirs: [BorrowedFd<'_>; N], _names: [&OsStr; N]) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// An error of the walk: of one of its own steps, or of the visitor.
#[derive(Debug)]
pub enum Error<E> {
    Walk(Failed, nix::Error),
    Visitor(E),
}

impl<E> From<E> for Error<E> {
    fn from(e: E) -> Self {
        Error::Visitor(e)
    }
}

/// An error of the walk and the path it happened at (from the start).
pub type ErrorAt<E> = (PathBuf, Error<E>);

/// What visitor `V` says about one name.
pub type VisitOf<const N: usize, V> = Visit<N, <V as Visitor<N>>::Frame, <V as Visitor<N>>::Stop>;

/// A step of the walk itself failed at `step`.
fn failed<E>(step: Failed) -> impl Fn(nix::Error) -> Error<E> {
    move |e| Error::Walk(step, e)
}

/// Where a step left the walk.
pub enum Step<S> {
    /// More to walk.
    Going,
    /// The visitor ended it.
    Stopped(S),
    /// Everything was walked.
    Done,
}

/// One level entered: its name, the names still to visit, the visitor's frame.
struct Level<F> {
    name: OsString,
    names: std::vec::IntoIter<OsString>,
    frame: F,
}

/// A walk of `N` trees in step, one [`Trees::step`] at a time (see the module).
pub struct Trees<const N: usize, F> {
    parents: [OwnedFd; N],
    names: [OsString; N],
    started: bool,
    /// One per tree while inside the start.
    cursors: Vec<Cursor>,
    levels: Vec<Level<F>>,
    at: PathBuf,
}

impl<const N: usize, F> Trees<N, F> {
    /// Walk `parents[i]/names[i]` (of any type), naming paths from `at` (the path shown for
    /// the start).
    pub fn new(
        parents: [BorrowedFd<'_>; N],
        names: [&OsStr; N],
        at: &Path,
    ) -> nix::Result<Trees<N, F>> {
        let mut owned = Vec::with_capacity(N);
        for parent in parents {
            owned.push(nix::unistd::dup(parent)?);
        }
        Ok(Trees {
            parents: owned
                .try_into()
                .unwrap_or_else(|_| unreachable!("N parents")),
            names: names.map(OsStr::to_os_string),
            started: false,
            cursors: Vec::new(),
            levels: Vec::new(),
            at: at.to_path_buf(),
        })
    }

    /// The path the walk is at (where an error happened).
    pub fn at(&self) -> &Path {
        &self.at
    }

    fn dirs(&self) -> [BorrowedFd<'_>; N] {
        std::array::from_fn(|i| self.cursors[i].dir())
    }

    /// Visit one name, or finish and leave one directory.
    pub fn step<V: Visitor<N, Frame = F>>(
        &mut self,
        v: &mut V,
    ) -> Result<Step<V::Stop>, Error<V::Error>> {
        if !self.started {
            self.started = true;
            let dirs = self.parents.each_ref().map(AsFd::as_fd);
            let names = self.names.each_ref().map(OsString::as_os_str);
            let visit = inspect_and_visit(v, dirs, names, &self.at, true)?;
            return self.go(visit, OsString::new());
        }
        let Some(level) = self.levels.last_mut() else {
            return Ok(Step::Done);
        };
        let Some(name) = level.names.next() else {
            return self.leave(v);
        };
        self.at.push(&name);
        let visit = inspect_and_visit(v, self.dirs(), [name.as_os_str(); N], &self.at, false)?;
        self.go(visit, name)
    }

    /// Do what the visitor said about `name`.
    fn go<S, E>(&mut self, visit: Visit<N, F, S>, name: OsString) -> Result<Step<S>, Error<E>> {
        match visit {
            // The start is not a directory (or is gone, or left out): nothing else to walk.
            Visit::Next if self.levels.is_empty() => Ok(Step::Done),
            Visit::Next => {
                self.at.pop();
                Ok(Step::Going)
            }
            Visit::Stop(outcome) => Ok(Step::Stopped(outcome)),
            Visit::Enter(fds, names, frame) => {
                if self.cursors.is_empty() {
                    for fd in fds {
                        let cursor = Cursor::new(fd).map_err(failed(Failed::Entering))?;
                        self.cursors.push(cursor);
                    }
                } else {
                    for (cursor, fd) in self.cursors.iter_mut().zip(fds) {
                        cursor.enter(fd).map_err(failed(Failed::Entering))?;
                    }
                }
                self.levels.push(Level {
                    name,
                    names: names.into_iter(),
                    frame,
                });
                Ok(Step::Going)
            }
        }
    }

    /// Everything in the current directory was visited: finish it and go back up.
    fn leave<V: Visitor<N, Frame = F>>(
        &mut self,
        v: &mut V,
    ) -> Result<Step<V::Stop>, Error<V::Error>> {
        let level = self.levels.pop().expect("a level is being walked");
        v.finish(self.dirs(), level.frame, &self.at)?;
        if self.levels.is_empty() {
            // The start: its parents are the ones the walk was given.
            self.cursors.clear();
            let dirs = self.parents.each_ref().map(AsFd::as_fd);
            v.left(dirs, self.names.each_ref().map(OsString::as_os_str))?;
            return Ok(Step::Done);
        }
        for cursor in &mut self.cursors {
            cursor.leave().map_err(failed(Failed::GoingUp))?;
        }
        v.left(self.dirs(), [level.name.as_os_str(); N])?;
        self.at.pop();
        Ok(Step::Going)
    }

    /// Walk to the end (or until the visitor stops it). An error comes with the path it
    /// happened at.
    pub fn run<V: Visitor<N, Frame = F>>(
        mut self,
        v: &mut V,
    ) -> Result<Option<V::Stop>, ErrorAt<V::Error>> {
        loop {
            match self.step(v) {
                Ok(Step::Going) => {}
                Ok(Step::Stopped(outcome)) => return Ok(Some(outcome)),
                Ok(Step::Done) => return Ok(None),
                Err(e) => return Err((self.at, e)),
            }
        }
    }
}

/// Inspect `names[0]` in `dirs[0]`, never following it, and let the visitor say what to do.
fn inspect_and_visit<const N: usize, V: Visitor<N>>(
    v: &mut V,
    dirs: [BorrowedFd<'_>; N],
    names: [&OsStr; N],
    at: &Path,
    top: bool,
) -> Result<VisitOf<N, V>, Error<V::Error>> {
    let Some(st) = lstat_at(dirs[0], names[0]).map_err(failed(Failed::Inspecting))? else {
        return Ok(v.gone(at)?);
    };
    let here = Here {
        dirs,
        names,
        at,
        top,
        st,
    };
    Ok(v.visit(here)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{list, open_verified, Kind, CHANGED};
    use std::convert::Infallible;

    /// Goes into every directory on both trees; at `a/b/c` it moves the second tree's `b`.
    struct MovingTheSecondTree<'t> {
        second: &'t Path,
        visited: Vec<PathBuf>,
    }

    impl Visitor<2> for MovingTheSecondTree<'_> {
        type Frame = ();
        type Stop = Infallible;
        type Error = nix::Error;

        fn visit(&mut self, here: Here<'_, 2>) -> nix::Result<Visit<2, (), Infallible>> {
            self.visited.push(here.at.to_path_buf());
            if here.at == Path::new("a/b/c") {
                let (from, to) = (self.second.join("a/b"), self.second.join("elsewhere/b"));
                std::fs::rename(from, to).unwrap();
            }
            if Kind::of(&here.st) != Kind::Directory {
                return Ok(Visit::Next);
            }
            let second = lstat_at(here.dirs[1], here.names[1])?.ok_or(nix::Error::ENOENT)?;
            let fds = [
                open_verified(here.dirs[0], here.names[0], &here.st)?,
                open_verified(here.dirs[1], here.names[1], &second)?,
            ];
            let names = list(fds[0].as_fd())?;
            Ok(Visit::Enter(fds, names, ()))
        }
    }

    #[test]
    fn the_second_tree_moved_during_a_paired_walk_stops_it_where_it_was_moved() {
        let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for tree in [first.path(), second.path()] {
            std::fs::create_dir_all(tree.join("a/b/c")).unwrap();
            std::fs::create_dir(tree.join("elsewhere")).unwrap();
        }
        let open = |path: &Path| -> OwnedFd { std::fs::File::open(path).unwrap().into() };
        let dirs = [open(first.path()), open(second.path())];
        let name = OsStr::new("a");
        let trees: Trees<2, ()> = Trees::new(
            [dirs[0].as_fd(), dirs[1].as_fd()],
            [name, name],
            Path::new("a"),
        )
        .unwrap();
        let mut visitor = MovingTheSecondTree {
            second: second.path(),
            visited: Vec::new(),
        };
        match trees.run(&mut visitor) {
            Err((at, Error::Walk(Failed::GoingUp, e))) => {
                assert_eq!((at, e), (PathBuf::from("a/b"), CHANGED));
            }
            Err((at, e)) => panic!("{at:?}: {e:?}"),
            Ok(_) => panic!("the walk went on: {:?}", visitor.visited),
        }
        assert_eq!(visitor.visited, ["a", "a/b", "a/b/c"].map(PathBuf::from));
    }
}
