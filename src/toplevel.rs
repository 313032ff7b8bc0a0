//! The btrfs top level (subvolid=5), mounted where nobody else can see it.
//!
//! rasa enters a private mount namespace before mounting, so the mount never propagates to the
//! host (or into `/sysroot` in the initrd), and the kernel tears it down if rasa dies half-way:
//! a crash can never leave a stray mount of the whole filesystem behind. The mount is still
//! unmounted explicitly on every exit path, so the filesystem is synced before rasa returns.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::btrfs;
use crate::error::refuse;
use crate::log;

/// Offset of the primary superblock and of its magic inside it.
const SUPERBLOCK_OFFSET: u64 = 0x1_0000;
const MAGIC_OFFSET: u64 = 0x40;
const MAGIC: &[u8; 8] = b"_BHRfS_M";

pub struct TopLevel {
    dir: PathBuf,
    fd: Option<OwnedFd>,
    mounted: bool,
}

/// Refuse early, before any mount, when the device is missing or does not hold btrfs.
pub fn check_device(device: &Path) -> Result<()> {
    let meta = match std::fs::metadata(device) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(refuse(
                format!("device {} does not exist", device.display()),
                "pass the device that holds the btrfs filesystem with --device \
                 (for LUKS, the unlocked /dev/mapper/<name>, not the partition)",
            ))
        }
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", device.display())),
    };
    if !meta.file_type().is_block_device() && !meta.is_file() {
        return Err(refuse(
            format!(
                "{} is neither a block device nor an image file",
                device.display()
            ),
            "pass the device that holds the btrfs filesystem with --device",
        ));
    }
    let mut magic = [0u8; 8];
    let read = File::open(device)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(SUPERBLOCK_OFFSET + MAGIC_OFFSET))?;
            f.read_exact(&mut magic)
        })
        .with_context(|| format!("reading the superblock of {}", device.display()));
    if read.is_err() || &magic != MAGIC {
        let locked = if is_luks(device) {
            " (it is a LUKS container: unlock it and pass /dev/mapper/<name>)"
        } else {
            ""
        };
        return Err(refuse(
            format!(
                "{} does not hold a btrfs filesystem{locked}",
                device.display()
            ),
            "pass the device that holds the btrfs filesystem with --device",
        ));
    }
    Ok(())
}

fn is_luks(device: &Path) -> bool {
    let mut head = [0u8; 6];
    File::open(device)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == b"LUKS\xba\xbe"
}

impl TopLevel {
    /// Mount the top level of `device` on a fresh directory under `/run` (or the temp dir).
    pub fn mount(device: &Path, read_only: bool) -> Result<TopLevel> {
        unshare(CloneFlags::CLONE_NEWNS)
            .context("entering a private mount namespace (rasa must run as root)")?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .context("making the mount namespace private")?;
        let base = if Path::new("/run").is_dir() {
            PathBuf::from("/run")
        } else {
            std::env::temp_dir()
        };
        let dir = nix::unistd::mkdtemp(&base.join("rasa-top.XXXXXX"))
            .context("creating a temporary mount point")?;
        let mut top = TopLevel {
            dir,
            fd: None,
            mounted: false,
        };
        let flags = if read_only {
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV
        } else {
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV
        };
        if let Err(e) = mount(
            Some(device),
            &top.dir,
            Some("btrfs"),
            flags,
            Some("subvolid=5"),
        ) {
            return Err(refuse(
                format!("cannot mount the top level (subvolid=5) of {}: {e}", device.display()),
                "check `dmesg` for the kernel's reason; the device must be an unlocked, healthy btrfs",
            ));
        }
        top.mounted = true;
        let fd = btrfs::open_dir_at(nix::fcntl::AT_FDCWD, top.dir.as_os_str())
            .context("opening the top level")?;
        top.fd = Some(fd);
        log::info(format!(
            "mounted the top level of {} privately",
            device.display()
        ));
        Ok(top)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_ref().expect("top level is open").as_fd()
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Unmount now, reporting errors (drop does the same but can only log them).
    pub fn unmount(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        self.fd = None;
        if self.mounted {
            self.mounted = false;
            umount2(&self.dir, MntFlags::empty())
                .with_context(|| format!("unmounting {}", self.dir.display()))?;
        }
        let _ = std::fs::remove_dir(&self.dir);
        Ok(())
    }

    pub fn is_subvolume(&self, name: &OsStr) -> Result<bool> {
        btrfs::is_subvolume_at(self.fd(), name)
    }
}

impl Drop for TopLevel {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            log::warn(format!("{e:#}"));
        }
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountInfo {
    pub mount_point: PathBuf,
    /// The directory of the filesystem that is the root of this mount: `/root` for a btrfs
    /// mount with `subvol=root`.
    pub fs_root: String,
    pub fstype: String,
    pub source: PathBuf,
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
pub fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if field[i] == b'\\' => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            _ => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// Every mount of this process's namespace, in mountinfo order. Paths are kept byte for byte.
pub fn mounts() -> Vec<MountInfo> {
    use std::os::unix::ffi::OsStringExt;
    let text = std::fs::read("/proc/self/mountinfo").unwrap_or_default();
    let path =
        |field: &[u8]| PathBuf::from(std::ffi::OsString::from_vec(unescape_mountinfo(field)));
    let text_of = |field: &[u8]| String::from_utf8_lossy(&unescape_mountinfo(field)).into_owned();
    text.split(|&b| b == b'\n')
        .filter_map(|line| {
            let sep = line.windows(3).position(|w| w == b" - ")?;
            let left: Vec<&[u8]> = line[..sep].split(|&b| b == b' ').collect();
            let mut right = line[sep + 3..].split(|&b| b == b' ');
            Some(MountInfo {
                fs_root: text_of(left.get(3)?),
                mount_point: path(left.get(4)?),
                fstype: text_of(right.next()?),
                source: path(right.next()?),
            })
        })
        .collect()
}

/// What is mounted at `path` (the topmost mount there), if anything.
pub fn mount_at(path: &Path) -> Option<MountInfo> {
    mounts().into_iter().rev().find(|m| m.mount_point == path)
}

/// The device mounted at `/`, when it is btrfs: the default `--device` on a running system.
pub fn root_device() -> Option<PathBuf> {
    mount_at(Path::new("/"))
        .filter(|m| m.fstype == "btrfs")
        .map(|m| m.source)
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes() {
        use super::unescape_mountinfo;
        assert_eq!(unescape_mountinfo(br"/mnt/a\040b"), b"/mnt/a b".to_vec());
        assert_eq!(unescape_mountinfo(br"/x\\"), br"/x\\".to_vec());
        assert_eq!(unescape_mountinfo(br"/y\04"), br"/y\04".to_vec());
    }
}
