//! The list of paths a diff found, stored compactly: a million new files are a million paths,
//! and a `Vec<u8>` each (24 bytes of vector, a heap block of 32 or more, the allocator's
//! bookkeeping) cost more than the paths themselves. Here every path lives in one byte arena and
//! each entry is 20 bytes, so the list holds about the bytes of its paths plus 20 per path.

use super::{Kind, Status};

/// One path the next boot erases, as the list hands it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found<'a> {
    /// Absolute, as on the live system: `/etc/foo`.
    pub path: &'a [u8],
    pub kind: Kind,
    pub status: Status,
    /// Bytes (the file's length, a symlink's target length; 0 for directories).
    pub size: u64,
}

/// 20 bytes: packed to 4-byte alignment (8 + 8 + 4 would otherwise round up to 24), with the
/// path's length, kind and status sharing one word.
#[derive(Clone, Copy, Debug)]
#[repr(C, packed(4))]
struct Entry {
    /// Where the path starts in the arena; also the order in which entries were added, which
    /// breaks ties between equal paths (the first added wins).
    start: u64,
    size: u64,
    /// The path's length (low 24 bits: 16 MiB, far beyond any walkable path), then the kind
    /// and the status (4 bits each).
    meta: u32,
}

const LEN_BITS: u32 = 24;
const KINDS: [Kind; 4] = [Kind::File, Kind::Directory, Kind::Symlink, Kind::Other];
const STATUSES: [Status; 3] = [Status::New, Status::Modified, Status::Unstored];

impl Entry {
    fn len(&self) -> usize {
        (self.meta & ((1 << LEN_BITS) - 1)) as usize
    }

    fn kind(&self) -> Kind {
        KINDS[(self.meta >> LEN_BITS & 0xf) as usize]
    }

    fn status(&self) -> Status {
        STATUSES[(self.meta >> (LEN_BITS + 4)) as usize]
    }

    fn meta(len: usize, kind: Kind, status: Status) -> u32 {
        let len = u32::try_from(len)
            .ok()
            .filter(|&l| l < 1 << LEN_BITS)
            .expect("a path shorter than 16 MiB");
        let kind = KINDS.iter().position(|&k| k == kind).expect("every kind") as u32;
        let status = STATUSES
            .iter()
            .position(|&s| s == status)
            .expect("every status") as u32;
        len | kind << LEN_BITS | status << (LEN_BITS + 4)
    }

    fn set_status(&mut self, status: Status) {
        self.meta = Entry::meta(self.len(), self.kind(), status);
    }
}

#[derive(Default, Debug)]
pub struct FoundList {
    arena: Vec<u8>,
    entries: Vec<Entry>,
}

impl FoundList {
    pub fn push(&mut self, path: &[u8], kind: Kind, status: Status, size: u64) {
        let start = self.arena.len() as u64;
        self.arena.extend_from_slice(path);
        self.entries.push(Entry {
            start,
            size,
            meta: Entry::meta(path.len(), kind, status),
        });
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn view<'a>(arena: &'a [u8], e: &Entry) -> Found<'a> {
        let start = e.start as usize;
        Found {
            path: &arena[start..start + e.len()],
            kind: e.kind(),
            status: e.status(),
            size: e.size,
        }
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = Found<'_>> + Clone + '_ {
        self.entries.iter().map(|e| Self::view(&self.arena, e))
    }

    /// Mark every entry from `from` on with `status`.
    pub fn set_status_from(&mut self, from: usize, status: Status) {
        for e in &mut self.entries[from..] {
            e.set_status(status);
        }
    }

    /// Move everything in `other` to the end of this list (`other` keeps its memory, for
    /// reuse).
    pub fn append(&mut self, other: &mut FoundList) {
        let offset = self.arena.len() as u64;
        self.arena.extend_from_slice(&other.arena);
        other.arena.clear();
        self.entries.extend(other.entries.drain(..).map(|e| Entry {
            start: e.start + offset,
            ..e
        }));
    }

    /// Sort the entries from `from` on by path (equal paths in the order they were added),
    /// without allocating: the arena offset breaks ties.
    pub fn sort_from(&mut self, from: usize) {
        let arena = &self.arena;
        self.entries[from..].sort_unstable_by(|a, b| {
            Self::view(arena, a)
                .path
                .cmp(Self::view(arena, b).path)
                .then({ a.start }.cmp(&{ b.start }))
        });
    }

    /// Sort by path and keep one entry per path: the first added, marked
    /// [`Status::Unstored`] when any of its duplicates is.
    pub fn sort_dedup(&mut self) {
        self.sort_from(0);
        let arena = &self.arena;
        self.entries.dedup_by(|later, earlier| {
            if Self::view(arena, later).path == Self::view(arena, earlier).path {
                if later.status() == Status::Unstored {
                    earlier.set_status(Status::Unstored);
                }
                true
            } else {
                false
            }
        });
    }

    /// Whether `path` is in the list (which must be sorted).
    pub fn contains_sorted(&self, path: &[u8]) -> bool {
        self.entries
            .binary_search_by(|e| Self::view(&self.arena, e).path.cmp(path))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_twenty_bytes_and_keeps_its_fields() {
        assert_eq!(std::mem::size_of::<Entry>(), 20);
        for kind in KINDS {
            for status in STATUSES {
                let mut e = Entry {
                    start: 7,
                    size: u64::MAX,
                    meta: Entry::meta((1 << LEN_BITS) - 1, kind, status),
                };
                assert_eq!(
                    (e.len(), e.kind(), e.status()),
                    ((1 << LEN_BITS) - 1, kind, status)
                );
                e.set_status(Status::Unstored);
                assert_eq!((e.kind(), e.status()), (kind, Status::Unstored));
            }
        }
    }

    #[test]
    fn sorts_and_keeps_the_first_of_equal_paths() {
        let mut a = FoundList::default();
        a.push(b"/b", Kind::File, Status::New, 1);
        a.push(b"/a", Kind::File, Status::Modified, 2);
        let mut b = FoundList::default();
        b.push(b"/a", Kind::File, Status::Unstored, 3);
        b.push(b"/c/d", Kind::Directory, Status::New, 0);
        a.append(&mut b);
        assert!(b.is_empty());
        a.sort_dedup();
        let got: Vec<_> = a.iter().map(|f| (f.path, f.status, f.size)).collect();
        assert_eq!(
            got,
            [
                (&b"/a"[..], Status::Unstored, 2),
                (&b"/b"[..], Status::New, 1),
                (&b"/c/d"[..], Status::New, 0)
            ]
        );
        assert!(a.contains_sorted(b"/c/d"));
        assert!(!a.contains_sorted(b"/c"));
    }
}
