//! Whether two files hold the same bytes, without reading what need not be read: a rerun of
//! `migrate` compares every stored file with its source, and a 256 GiB VM image with a few MiB
//! of data, or a copy that is a reflink of its source, must not cost a read of every byte.
//!
//! Holes are found with `SEEK_DATA`/`SEEK_HOLE` and never read (a hole reads as zeros, so where
//! one side has a hole the other side's data is checked for zeros). Ranges where both files
//! point at the same place on the same filesystem (`FIEMAP`: an extent shared by reflink or
//! snapshot) are equal without being read, unless the extent is of a kind where the address
//! does not pin the bytes (compressed, inline, delayed, unwritten; see `btrfs::fiemap`).

use std::ops::Range;
use std::os::fd::BorrowedFd;

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::sys::stat::FileStat;
use nix::unistd::{lseek, Whence};

use crate::btrfs::fiemap;

const CHUNK: usize = 1 << 20;

/// True when `a` and `b` have the same length and the same bytes.
pub fn same_content(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> Result<bool> {
    let (sa, sb) = (
        nix::sys::stat::fstat(a).context("inspecting a file to compare")?,
        nix::sys::stat::fstat(b).context("inspecting a file to compare")?,
    );
    if sa.st_size != sb.st_size {
        return Ok(false);
    }
    let size = sa.st_size as u64;
    let shared = if same_filesystem(a, &sa, b, &sb) {
        shared_ranges(a, b, size)
    } else {
        Vec::new()
    };
    let mut buffers = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut pos = 0;
    while pos < size {
        let (a_data, a_end) = segment(a, pos, size)?;
        let (b_data, b_end) = segment(b, pos, size)?;
        let end = a_end.min(b_end);
        if a_data || b_data {
            for range in unshared(pos..end, &shared) {
                let equal = match (a_data, b_data) {
                    (true, true) => same_bytes(a, b, range, &mut buffers)?,
                    (true, false) => all_zero(a, range, &mut buffers.0)?,
                    _ => all_zero(b, range, &mut buffers.1)?,
                };
                if !equal {
                    return Ok(false);
                }
            }
        }
        pos = end;
    }
    Ok(true)
}

/// Physical addresses mean the same thing only within one filesystem. Subvolumes of one btrfs
/// have different `st_dev`s but one filesystem UUID.
fn same_filesystem(a: BorrowedFd<'_>, sa: &FileStat, b: BorrowedFd<'_>, sb: &FileStat) -> bool {
    match (crate::btrfs::fsid(a), crate::btrfs::fsid(b)) {
        (Some(x), Some(y)) => x == y,
        (None, None) => sa.st_dev == sb.st_dev,
        _ => false,
    }
}

/// Whether `pos` is in data or in a hole, and where that run ends (at most `size`).
fn segment(fd: BorrowedFd<'_>, pos: u64, size: u64) -> Result<(bool, u64)> {
    match lseek(fd, pos as i64, Whence::SeekData) {
        Ok(data) if data as u64 > pos => Ok((false, (data as u64).min(size))),
        Ok(_) => {
            let hole = lseek(fd, pos as i64, Whence::SeekHole).context("SEEK_HOLE")?;
            Ok((true, (hole as u64).clamp(pos + 1, size)))
        }
        // No data after `pos`: a hole to the end.
        Err(Errno::ENXIO) => Ok((false, size)),
        // A filesystem without hole support: all data.
        Err(Errno::EINVAL | Errno::EOPNOTSUPP) => Ok((true, size)),
        Err(e) => Err(e).context("SEEK_DATA"),
    }
}

/// The file ranges at which `a` and `b` name the same plain extent of one filesystem, sorted.
/// Empty when either cannot be mapped.
fn shared_ranges(a: BorrowedFd<'_>, b: BorrowedFd<'_>, size: u64) -> Vec<Range<u64>> {
    let plain = |fd| -> Vec<fiemap::Extent> {
        fiemap::extents(fd, size)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.flags & fiemap::NOT_PLAIN == 0 && e.length > 0)
            .collect()
    };
    let (ea, eb) = (plain(a), plain(b));
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < ea.len() && j < eb.len() {
        let (x, y) = (&ea[i], &eb[j]);
        let (x_end, y_end) = (x.logical + x.length, y.logical + y.length);
        let start = x.logical.max(y.logical);
        let end = x_end.min(y_end).min(size);
        // The same offset into the file lands on the same address on both sides.
        if start < end && x.physical.wrapping_sub(x.logical) == y.physical.wrapping_sub(y.logical) {
            out.push(start..end);
        }
        if x_end <= y_end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The parts of `range` not covered by the sorted, disjoint `shared` ranges.
fn unshared(range: Range<u64>, shared: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut pos = range.start;
    let first = shared.partition_point(|s| s.end <= range.start);
    for s in &shared[first..] {
        if s.start >= range.end {
            break;
        }
        if s.start > pos {
            out.push(pos..s.start);
        }
        pos = pos.max(s.end);
    }
    if pos < range.end {
        out.push(pos..range.end);
    }
    out
}

/// Read exactly `buf.len()` bytes at `pos`, or fewer at the end of the file.
fn read_at(fd: BorrowedFd<'_>, buf: &mut [u8], pos: u64) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match nix::sys::uio::pread(fd, &mut buf[done..], (pos + done as u64) as i64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e).context("reading for comparison"),
        }
    }
    Ok(done)
}

fn same_bytes(
    a: BorrowedFd<'_>,
    b: BorrowedFd<'_>,
    range: Range<u64>,
    (ba, bb): &mut (Vec<u8>, Vec<u8>),
) -> Result<bool> {
    let mut pos = range.start;
    while pos < range.end {
        let want = ((range.end - pos) as usize).min(CHUNK);
        let na = read_at(a, &mut ba[..want], pos)?;
        let nb = read_at(b, &mut bb[..want], pos)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na < want {
            // Both ended early: the files shrank while compared.
            return Ok(false);
        }
        pos += want as u64;
    }
    Ok(true)
}

fn all_zero(fd: BorrowedFd<'_>, range: Range<u64>, buf: &mut [u8]) -> Result<bool> {
    let mut pos = range.start;
    while pos < range.end {
        let want = ((range.end - pos) as usize).min(CHUNK);
        let n = read_at(fd, &mut buf[..want], pos)?;
        if n < want || buf[..n].iter().any(|&byte| byte != 0) {
            return Ok(false);
        }
        pos += want as u64;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::single_range_in_vec_init)]
    use super::unshared;

    #[test]
    fn unshared_leaves_out_what_is_shared() {
        assert_eq!(unshared(0..100, &[]), vec![0..100]);
        assert_eq!(unshared(0..100, &[0..100]), vec![]);
        assert_eq!(
            unshared(10..100, &[0..20, 50..60, 90..200]),
            vec![20..50, 60..90]
        );
        assert_eq!(unshared(10..20, &[0..5, 30..40]), vec![10..20]);
    }
}
