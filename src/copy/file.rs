//! The content of one regular file: a reflink where allowed and possible, else the data ranges
//! only, so holes stay holes.

use std::os::fd::BorrowedFd;

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::failpoint;

/// The first `size` bytes of `src` into the empty `dst`: a reflink when `reflink` and possible
/// (true), else a byte copy that keeps holes.
pub(super) fn copy_content(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    size: u64,
    reflink: bool,
    buffer: &mut Vec<u8>,
) -> Result<bool> {
    if reflink && size > 0 && crate::btrfs::file::clone_file(src, dst).is_ok() {
        return Ok(true);
    }
    copy_data(src, dst, size, buffer)?;
    Ok(false)
}

/// Copy `size` bytes, recreating holes: only the ranges SEEK_DATA reports are written, and the
/// final length is set with ftruncate so a trailing hole stays a hole.
fn copy_data(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    size: u64,
    buffer: &mut Vec<u8>,
) -> Result<()> {
    let mut offset: i64 = 0;
    let size = size as i64;
    while offset < size {
        let (start, end) = match lseek(src, offset, Whence::SeekData) {
            Ok(data) => {
                let hole = lseek(src, data, Whence::SeekHole).unwrap_or(size);
                (data, hole.min(size))
            }
            // No data after `offset`: a hole to the end.
            Err(Errno::ENXIO) => break,
            // No hole support: all of it is data.
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => (offset, size),
            Err(e) => return Err(e).context("SEEK_DATA"),
        };
        copy_range(src, dst, start, end, buffer)?;
        failpoint::hit("copy-data-extent");
        offset = end;
    }
    nix::unistd::ftruncate(dst, size).context("setting the file length")?;
    Ok(())
}

fn copy_range(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    start: i64,
    end: i64,
    buffer: &mut Vec<u8>,
) -> Result<()> {
    let mut pos = start;
    let mut kernel_copy = true;
    while pos < end {
        let want = (end - pos) as usize;
        if kernel_copy {
            let (mut in_off, mut out_off) = (pos, pos);
            match nix::fcntl::copy_file_range(
                src,
                Some(&mut in_off),
                dst,
                Some(&mut out_off),
                want.min(1 << 30),
            ) {
                Ok(0) => {
                    // The file shrank while we copied: the caller sees it changed and starts again.
                    return Ok(());
                }
                Ok(n) => {
                    pos += n as i64;
                    continue;
                }
                Err(
                    Errno::EXDEV | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EBADF,
                ) => {
                    kernel_copy = false;
                }
                Err(e) => return Err(e).context("copy_file_range"),
            }
        }
        if buffer.is_empty() {
            buffer.resize(1 << 20, 0);
        }
        let chunk = want.min(buffer.len());
        let n = nix::sys::uio::pread(src, &mut buffer[..chunk], pos).context("reading")?;
        if n == 0 {
            return Ok(());
        }
        let mut written = 0usize;
        while written < n {
            written += nix::sys::uio::pwrite(dst, &buffer[written..n], pos + written as i64)
                .context("writing")?;
        }
        pos += n as i64;
    }
    Ok(())
}
