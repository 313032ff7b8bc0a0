//! The ioctls the copy uses on single files. `FS_IOC_GETFLAGS`/`FS_IOC_SETFLAGS` (the `chattr`
//! flags) and `FICLONE` (reflink) are generic Linux ioctls, not btrfs ones, but they live here
//! so that every `unsafe` of rasa stays in `src/btrfs/`: the rest of the program calls these
//! safe functions.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::libc;

mod ioctl {
    use nix::libc;
    // The kernel reads and writes an `int` for both, whatever the `long` in their request
    // numbers says, so the "bad" forms take the request number as the headers define it.
    nix::ioctl_read_bad!(get_flags, libc::FS_IOC_GETFLAGS, libc::c_int);
    nix::ioctl_write_ptr_bad!(set_flags, libc::FS_IOC_SETFLAGS, libc::c_int);
    nix::ioctl_write_int_bad!(ficlone, libc::FICLONE);
}

/// The `chattr` flags of an open regular file or directory.
pub fn inode_flags(fd: BorrowedFd<'_>) -> nix::Result<libc::c_long> {
    let mut flags: libc::c_int = 0;
    // SAFETY: the kernel writes one int to the pointer.
    unsafe { ioctl::get_flags(fd.as_raw_fd(), &mut flags) }?;
    Ok(libc::c_long::from(flags))
}

/// Set the `chattr` flags of an open regular file or directory (all of them: read, change and
/// write back).
pub fn set_inode_flags(fd: BorrowedFd<'_>, flags: libc::c_long) -> nix::Result<()> {
    let value = flags as libc::c_int;
    // SAFETY: the kernel reads one int from the pointer.
    unsafe { ioctl::set_flags(fd.as_raw_fd(), &value) }?;
    Ok(())
}

/// Make `dst` share all of `src`'s extents (a reflink copy); both on one filesystem that
/// supports it, `dst` open for writing.
pub fn clone_file(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> nix::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument; both are open.
    unsafe { ioctl::ficlone(dst.as_raw_fd(), src.as_raw_fd()) }?;
    Ok(())
}
