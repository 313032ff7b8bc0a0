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
    /// Held from a writable mount to its unmount: see [`TopLevel::lock`].
    lock: Option<nix::fcntl::Flock<OwnedFd>>,
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
            lock: None,
            mounted: false,
        };
        let flags = if read_only {
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME
        } else {
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME
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
        if !read_only {
            top.lock()?;
        }
        Ok(top)
    }

    /// Take the filesystem's one rasa lock, waiting (with a message) while another rasa holds
    /// it. Every command that changes the top level mounts it writable through here, so none
    /// can forget the lock: two rollbacks at once could otherwise each retire the other's new
    /// root and leave neither `root` nor `root.rasa-new`.
    ///
    /// The lock is a `flock` on the top-level directory: every mount of the filesystem, in any
    /// mount namespace (rasa mounts it in a private one) and in the initrd, shares that one
    /// inode, flock is per open file description, and the kernel drops it when the holder dies,
    /// so a crash never leaves a stale lock.
    fn lock(&mut self) -> Result<()> {
        use nix::fcntl::{Flock, FlockArg};
        let fd = btrfs::open_dir_at(self.fd(), OsStr::new("."))
            .context("opening the top level to lock it")?;
        let held = match Flock::lock(fd, FlockArg::LockExclusiveNonblock) {
            Ok(held) => held,
            Err((fd, nix::errno::Errno::EWOULDBLOCK)) => {
                log::info(
                    "another rasa is changing this filesystem (rollback, prune or setup); waiting for it to finish",
                );
                Flock::lock(fd, FlockArg::LockExclusive)
                    .map_err(|(_, e)| e)
                    .context("waiting for the rasa lock on the top level")?
            }
            Err((_, e)) => return Err(e).context("locking the top level"),
        };
        self.lock = Some(held);
        Ok(())
    }

    /// The subvolumes of this filesystem mounted anywhere in this mount namespace (a copy of
    /// the caller's): the running system's `/`, a boot from an old root, a manual mount.
    /// Our own top-level mount is left out.
    pub fn mounted_subvolumes(&self) -> Vec<(u64, PathBuf)> {
        let all = mounts();
        let Some(own) = all.iter().rev().find(|m| m.mount_point == self.dir) else {
            return Vec::new();
        };
        all.iter()
            .filter(|m| m.fstype == "btrfs" && m.dev == own.dev && m.mount_point != self.dir)
            .filter_map(|m| Some((m.subvolid()?, m.mount_point.clone())))
            .collect()
    }

    /// The subvolume a mount without `subvol=`/`subvolid=` gets (`btrfs subvolume
    /// set-default`): the location of the `default` entry in the root tree's directory.
    pub fn default_subvolume(&self) -> Result<u64> {
        use btrfs::tree::{search, SearchKey, DIR_ITEM_KEY, ROOT_TREE_OBJECTID};
        /// BTRFS_ROOT_TREE_DIR_OBJECTID: the directory in the root tree that holds `default`.
        const ROOT_TREE_DIR: u64 = 6;
        let mut found = btrfs::FS_TREE_OBJECTID;
        let key = SearchKey::range(
            ROOT_TREE_OBJECTID,
            (ROOT_TREE_DIR, DIR_ITEM_KEY, 0),
            (ROOT_TREE_DIR, DIR_ITEM_KEY, u64::MAX),
        );
        search(self.fd(), key, 4096, |item| {
            // struct btrfs_dir_item { btrfs_disk_key location (17); le64 transid; le16 data_len;
            // le16 name_len; u8 type; } name
            let d = item.data;
            if item.objectid == ROOT_TREE_DIR && item.item_type == DIR_ITEM_KEY && d.len() >= 30 {
                let name_len = u16::from_le_bytes([d[27], d[28]]) as usize;
                if d.get(30..30 + name_len) == Some(b"default".as_slice()) {
                    found = u64::from_le_bytes(d[0..8].try_into().unwrap());
                    return false;
                }
            }
            true
        })
        .context("reading the default subvolume")?;
        Ok(found)
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
        self.lock = None;
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
    /// `major:minor` of the filesystem: the same for every mount of one btrfs filesystem.
    pub dev: String,
    /// The filesystem's own options (`subvolid=256,subvol=/root` for btrfs).
    pub super_options: String,
}

impl MountInfo {
    /// The btrfs subvolume id this mount shows, from `subvolid=`.
    pub fn subvolid(&self) -> Option<u64> {
        self.super_options
            .split(',')
            .find_map(|o| o.strip_prefix("subvolid="))
            .and_then(|id| id.parse().ok())
    }
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
                dev: text_of(left.get(2)?),
                fs_root: text_of(left.get(3)?),
                mount_point: path(left.get(4)?),
                fstype: text_of(right.next()?),
                source: path(right.next()?),
                super_options: text_of(right.next().unwrap_or_default()),
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
