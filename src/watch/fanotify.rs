//! The kernel side of `rasa watch`: a fanotify group that reports directory-entry events as
//! (directory file handle, name), the parsing of what it reads, and turning a handle back into
//! an open directory.
//!
//! nix's `Fanotify` opens the group and places the mark (its flag types accept the
//! `FAN_REPORT_*` bits it has no names for), but its `read_events` keeps only the fixed
//! metadata and drops the information records that carry the handle and the name, so the
//! events are parsed here from the bytes `read(2)` returns, without `unsafe`. The one system
//! call nix has no wrapper for is `open_by_handle_at(2)`: [`open_directory`] is the only
//! `unsafe` block of `rasa watch`.
//!
//! No permission event is ever asked for (`FAN_CLASS_NOTIF`): the kernel queues a notification
//! and the writer goes on; a writer never waits for this process.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::libc;
use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};

/// The events recorded: entries created, deleted, moved in or out, contents written, metadata
/// (mode, owner, times, xattrs) changed; for directories as well as files.
pub fn mask() -> MaskFlags {
    MaskFlags::FAN_CREATE
        | MaskFlags::FAN_DELETE
        | MaskFlags::FAN_MOVED_FROM
        | MaskFlags::FAN_MOVED_TO
        | MaskFlags::FAN_MODIFY
        | MaskFlags::FAN_CLOSE_WRITE
        | MaskFlags::FAN_ATTRIB
        | MaskFlags::FAN_ONDIR
}

/// A notification-only group that reports each event with its directory's handle and the
/// entry's name. The kernel's queue stays bounded (no `FAN_UNLIMITED_QUEUE`): past its limit it
/// drops events and says so with `FAN_Q_OVERFLOW`, which the record counts.
pub fn init() -> nix::Result<Fanotify> {
    Fanotify::init(
        InitFlags::FAN_CLASS_NOTIF
            | InitFlags::FAN_CLOEXEC
            | InitFlags::FAN_NONBLOCK
            | InitFlags::from_bits_retain(libc::FAN_REPORT_DFID_NAME),
        EventFFlags::O_RDONLY | EventFFlags::O_CLOEXEC,
    )
}

/// Mark the whole filesystem that holds `path` (every subvolume, every mount of it).
pub fn mark_filesystem(group: &Fanotify, path: &std::path::Path) -> nix::Result<()> {
    group.mark(
        MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
        mask(),
        nix::fcntl::AT_FDCWD,
        Some(path),
    )
}

/// One event as read: what happened, who did it, in which directory, to which name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    pub mask: u64,
    pub pid: i32,
    /// `struct file_handle`'s `handle_type` and `f_handle` bytes, of the directory.
    pub handle_type: i32,
    pub handle: &'a [u8],
    /// The entry in that directory; empty when the event is about the directory itself.
    pub name: &'a [u8],
}

impl Event<'_> {
    pub fn overflow(&self) -> bool {
        self.mask & libc::FAN_Q_OVERFLOW != 0
    }

    pub fn on_directory(&self) -> bool {
        self.mask & libc::FAN_ONDIR != 0
    }
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

/// Layout of `struct fanotify_event_metadata` (24 bytes): event_len u32, vers u8, reserved u8,
/// metadata_len u16, mask u64, fd i32, pid i32.
const METADATA_LEN: usize = 24;
/// `struct fanotify_event_info_header` (4 bytes) then `__kernel_fsid_t` (8 bytes), then
/// `struct file_handle`: handle_bytes u32, handle_type i32, f_handle[handle_bytes], and for a
/// DFID_NAME record the entry's name, NUL-terminated.
const FID_HANDLE_OFFSET: usize = 4 + 8;

/// The events in what one `read(2)` returned. A record that does not parse ends the batch
/// (the kernel writes whole events, so that is a version this code does not know).
pub fn parse(buf: &[u8]) -> Vec<Event<'_>> {
    let mut events = Vec::new();
    let mut offset = 0;
    while let Some(event_len) = u32_at(buf, offset) {
        let event_len = event_len as usize;
        let Some(event) = buf.get(offset..offset + event_len) else {
            break;
        };
        if event_len < METADATA_LEN || event[4] != libc::FANOTIFY_METADATA_VERSION {
            break;
        }
        let metadata_len = u16_at(event, 6).unwrap_or(0) as usize;
        let mask = u64_at(event, 8).unwrap_or(0);
        let pid = u32_at(event, 20).unwrap_or(0) as i32;
        let mut parsed = Event {
            mask,
            pid,
            handle_type: 0,
            handle: &[],
            name: &[],
        };
        let mut info = metadata_len.max(METADATA_LEN);
        while info + 4 <= event_len {
            let info_type = event[info];
            let info_len = u16_at(event, info + 2).unwrap_or(0) as usize;
            if info_len == 0 || info + info_len > event_len {
                break;
            }
            let record = &event[info..info + info_len];
            if info_type == libc::FAN_EVENT_INFO_TYPE_DFID_NAME
                || info_type == libc::FAN_EVENT_INFO_TYPE_DFID
            {
                if let (Some(bytes), Some(kind)) = (
                    u32_at(record, FID_HANDLE_OFFSET),
                    u32_at(record, FID_HANDLE_OFFSET + 4),
                ) {
                    let start = FID_HANDLE_OFFSET + 8;
                    if let Some(handle) = record.get(start..start + bytes as usize) {
                        parsed.handle_type = kind as i32;
                        parsed.handle = handle;
                        if info_type == libc::FAN_EVENT_INFO_TYPE_DFID_NAME {
                            let rest = &record[start + bytes as usize..];
                            let name = rest.split(|&b| b == 0).next().unwrap_or(&[]);
                            parsed.name = if name == b"." { &[] } else { name };
                        }
                    }
                }
            }
            info += info_len;
        }
        events.push(parsed);
        offset += event_len;
    }
    events
}

/// Open the directory a handle names, through the mount `mount` (the kernel only accepts a
/// handle whose directory is reachable from that mount's root: anything else, such as another
/// subvolume not mounted below it, is `ESTALE`).
// The one `unsafe` outside src/btrfs/: a system call nix has no wrapper for (see main.rs).
#[allow(unsafe_code)]
pub fn open_directory(
    mount: BorrowedFd<'_>,
    handle_type: i32,
    handle: &[u8],
) -> nix::Result<OwnedFd> {
    // `struct file_handle` as the kernel reads it: handle_bytes, handle_type, then the bytes;
    // built in u32 words so that it has the struct's alignment.
    let mut words: Vec<u32> = Vec::with_capacity(2 + handle.len().div_ceil(4));
    words.push(handle.len() as u32);
    words.push(handle_type as u32);
    for chunk in handle.chunks(4) {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        words.push(u32::from_ne_bytes(word));
    }
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: `words` is a live, writable, 4-byte-aligned buffer holding a complete
    // `struct file_handle` whose `handle_bytes` matches the bytes that follow it; the kernel
    // reads at most that many. A non-negative return is a new descriptor that nothing else
    // owns, so `OwnedFd` may take it (and closes it on drop).
    let fd = unsafe {
        let fd = libc::open_by_handle_at(
            mount.as_raw_fd(),
            words.as_mut_ptr().cast::<libc::file_handle>(),
            flags,
        );
        if fd < 0 {
            return Err(Errno::last());
        }
        OwnedFd::from_raw_fd(fd)
    };
    Ok(fd)
}

/// The path of an open descriptor in this process's mount namespace.
pub fn path_of(fd: &OwnedFd) -> nix::Result<Vec<u8>> {
    use std::os::unix::ffi::OsStringExt;
    let link = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    nix::fcntl::readlink(link.as_str()).map(|p| p.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One DFID_NAME event laid out as the kernel writes it.
    fn event_bytes(mask: u64, pid: i32, handle: &[u8], name: &[u8]) -> Vec<u8> {
        let mut info = vec![libc::FAN_EVENT_INFO_TYPE_DFID_NAME, 0, 0, 0];
        info.extend_from_slice(&[7u8; 8]); // fsid
        info.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
        info.extend_from_slice(&1i32.to_ne_bytes());
        info.extend_from_slice(handle);
        info.extend_from_slice(name);
        info.push(0);
        while info.len() % 4 != 0 {
            info.push(0);
        }
        let info_len = info.len() as u16;
        info[2..4].copy_from_slice(&info_len.to_ne_bytes());
        let mut out = Vec::new();
        out.extend_from_slice(&((METADATA_LEN + info.len()) as u32).to_ne_bytes());
        out.push(libc::FANOTIFY_METADATA_VERSION);
        out.push(0);
        out.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        out.extend_from_slice(&mask.to_ne_bytes());
        out.extend_from_slice(&(-1i32).to_ne_bytes());
        out.extend_from_slice(&pid.to_ne_bytes());
        out.extend_from_slice(&info);
        out
    }

    #[test]
    fn parses_handle_and_name_of_consecutive_events() {
        let mut buf = event_bytes(libc::FAN_CREATE, 42, &[1, 2, 3, 4, 5, 6, 7, 8], b"file");
        buf.extend(event_bytes(
            libc::FAN_ATTRIB | libc::FAN_ONDIR,
            7,
            &[9; 12],
            b".",
        ));
        let events = parse(&buf);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].pid, 42);
        assert_eq!(events[0].handle, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(events[0].handle_type, 1);
        assert_eq!(events[0].name, b"file");
        assert!(!events[0].on_directory());
        assert_eq!(events[1].name, b"", "'.' is the directory itself");
        assert!(events[1].on_directory());
    }

    #[test]
    fn truncated_or_foreign_input_is_not_read_past() {
        let buf = event_bytes(libc::FAN_CREATE, 1, &[1; 8], b"x");
        assert!(parse(&buf[..buf.len() - 1]).is_empty());
        let mut wrong_version = buf.clone();
        wrong_version[4] = 99;
        assert!(parse(&wrong_version).is_empty());
        assert!(parse(&[]).is_empty());
    }
}
