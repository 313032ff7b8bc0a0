//! Is a hibernated system waiting to resume from this disk?
//!
//! Hibernation writes the running system's memory to swap and marks the swap header with a
//! signature. When the next boot resumes, the kernel jumps back into that system and rasa never
//! runs. When the resume does not happen (a failed or skipped resume, a resume device the initrd
//! did not wait for), the boot reaches rasa with the hibernated system's root still on disk: the
//! memory image refers to files that system had open. Wiping that root and resuming later (or
//! resuming on a later boot) corrupts it. So rollback looks for the signature first and, when
//! one is there, leaves the root alone for this boot and says why.
//!
//! Where the image is:
//! - `resume=` on the kernel command line (NixOS's `boot.resumeDevice`): a device path,
//!   `UUID=`/`PARTUUID=`/`LABEL=`/`PARTLABEL=`, or `MAJOR:MINOR`; with `resume_offset=` (in
//!   pages) for a swap *file*, the header is that many pages into the device;
//! - systemd's `HibernateLocation` EFI variable (systemd 255 and later, when hibernating without
//!   `resume=`): JSON with the swap's filesystem `uuid` and `offset`.
//!
//! The signatures are the ones util-linux's blkid reports as `swsuspend`, at the end of the
//! header page: the kernel's `S1SUSPEND` (and the older `S2SUSPEND`), uswsusp's `ULSUSPEND`, and
//! `LINHIB0001`. `noresume` on the command line means the user chose to throw the image away
//! (swapon reinitialises such a swap later in this boot), so nothing is pending then.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The page size swap headers are written with on the architectures NixOS supports here.
const PAGE_SIZE: u64 = 4096;
/// Where the signature sits in the header page: its last 10 bytes.
const SIGNATURE_OFFSET: u64 = PAGE_SIZE - 10;
const SIGNATURES: [&[u8]; 4] = [b"S1SUSPEND", b"S2SUSPEND", b"ULSUSPEND", b"LINHIB0001"];

/// systemd's `HibernateLocation` variable (vendor GUID of systemd's own variables).
pub const HIBERNATE_LOCATION_EFIVAR: &str =
    "/sys/firmware/efi/efivars/HibernateLocation-8cf2644b-4b0b-428f-9387-6d876050dc67";

/// A place where a hibernation image may be, and what was found there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeLocation {
    /// How the location was named, for messages (`resume=UUID=…`, `HibernateLocation`).
    pub named_by: String,
    pub device: PathBuf,
    /// Byte offset of the swap header on the device.
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing configured anywhere: the machine does not hibernate.
    NoResumeConfigured,
    /// `noresume` is on the command line: any image is being discarded on purpose.
    ResumeDisabled,
    /// A location is configured and holds no image.
    NoImage(ResumeLocation),
    /// A location is configured but could not be read; carries why.
    Unreadable(ResumeLocation, String),
    /// A hibernation image is waiting at this location; carries the signature found.
    ImagePresent(ResumeLocation, String),
}

/// Where to look, from the kernel command line and the EFI variable's contents (if any).
/// `dev_dir` is `/dev` outside tests.
pub fn locations(
    cmdline: &str,
    efi_location: Option<&[u8]>,
    dev_dir: &Path,
) -> Vec<ResumeLocation> {
    let param = |key: &str| {
        cmdline
            .split_whitespace()
            .filter_map(|arg| arg.strip_prefix(key))
            .next_back()
    };
    let mut found = Vec::new();
    if let Some(spec) = param("resume=").filter(|s| !s.is_empty()) {
        let pages = param("resume_offset=")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        found.push(ResumeLocation {
            named_by: format!("resume={spec}"),
            device: device_path(spec, dev_dir),
            offset: pages * PAGE_SIZE,
        });
    }
    if let Some(location) = efi_location.and_then(|raw| from_efi_variable(raw, dev_dir)) {
        found.push(location);
    }
    found
}

/// Look at every configured location; the first image found wins.
pub fn inspect(cmdline: &str, efi_location: Option<&[u8]>, dev_dir: &Path) -> Verdict {
    if cmdline.split_whitespace().any(|arg| arg == "noresume") {
        return Verdict::ResumeDisabled;
    }
    let mut verdict = Verdict::NoResumeConfigured;
    for location in locations(cmdline, efi_location, dev_dir) {
        let this = match read_signature(&location.device, location.offset) {
            Ok(Some(signature)) => return Verdict::ImagePresent(location, signature),
            Ok(None) => Verdict::NoImage(location),
            Err(why) => Verdict::Unreadable(location, why),
        };
        // An unreadable location says more than an empty one, so it is the one reported.
        if !matches!(verdict, Verdict::Unreadable(..)) {
            verdict = this;
        }
    }
    verdict
}

/// The verdict for this machine: `/proc/cmdline`, the EFI variable, `/dev`.
pub fn inspect_this_machine() -> Verdict {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let efi = std::fs::read(HIBERNATE_LOCATION_EFIVAR).ok();
    inspect(&cmdline, efi.as_deref(), Path::new("/dev"))
}

fn device_path(spec: &str, dev_dir: &Path) -> PathBuf {
    let by = |dir: &str, value: &str| dev_dir.join("disk").join(dir).join(value);
    if let Some(v) = spec.strip_prefix("UUID=") {
        by("by-uuid", &v.to_ascii_lowercase())
    } else if let Some(v) = spec.strip_prefix("PARTUUID=") {
        by("by-partuuid", &v.to_ascii_lowercase())
    } else if let Some(v) = spec.strip_prefix("LABEL=") {
        by("by-label", v)
    } else if let Some(v) = spec.strip_prefix("PARTLABEL=") {
        by("by-partlabel", v)
    } else if is_major_minor(spec) {
        dev_dir.join("block").join(spec)
    } else {
        PathBuf::from(spec)
    }
}

fn is_major_minor(spec: &str) -> bool {
    spec.split_once(':').is_some_and(|(major, minor)| {
        [major, minor]
            .iter()
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// EFI variables start with 4 bytes of attributes; systemd's value is JSON such as
/// `{"uuid":"…","offset":0,"kernelVersion":"…",…}` naming the swap's filesystem UUID and, for a
/// swap file, the header's offset in pages.
fn from_efi_variable(raw: &[u8], dev_dir: &Path) -> Option<ResumeLocation> {
    let json: serde_json::Value = serde_json::from_slice(raw.get(4..)?).ok()?;
    let uuid = json.get("uuid")?.as_str()?;
    let pages = json.get("offset").and_then(|o| o.as_u64()).unwrap_or(0);
    Some(ResumeLocation {
        named_by: format!("systemd's HibernateLocation EFI variable (uuid {uuid})"),
        device: device_path(&format!("UUID={uuid}"), dev_dir),
        offset: pages * PAGE_SIZE,
    })
}

fn read_signature(device: &Path, header_offset: u64) -> Result<Option<String>, String> {
    let file = File::open(device).map_err(|e| format!("cannot open {}: {e}", device.display()))?;
    let mut tail = [0u8; 10];
    file.read_exact_at(&mut tail, header_offset + SIGNATURE_OFFSET)
        .map_err(|e| format!("cannot read the swap header of {}: {e}", device.display()))?;
    Ok(SIGNATURES
        .iter()
        .find(|sig| tail.starts_with(sig))
        .map(|sig| String::from_utf8_lossy(sig).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A swap area as mkswap writes it (SWAPSPACE2 in the header), optionally hibernated into.
    fn swap_file(dir: &Path, name: &str, pages_before: u64, signature: &[u8]) -> PathBuf {
        let path = dir.join(name);
        let file = File::create(&path).unwrap();
        file.set_len((pages_before + 4) * PAGE_SIZE).unwrap();
        let at = pages_before * PAGE_SIZE + SIGNATURE_OFFSET;
        file.write_all_at(signature, at).unwrap();
        path
    }

    #[test]
    fn a_kernel_hibernation_image_is_found_and_a_plain_swap_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let image = swap_file(dir.path(), "hibernated", 0, b"S1SUSPEND\0");
        let plain = swap_file(dir.path(), "swap", 0, b"SWAPSPACE2");
        let dev = dir.path();
        let cmdline = format!("quiet resume={} root=x", image.display());
        assert!(matches!(
            inspect(&cmdline, None, dev),
            Verdict::ImagePresent(_, sig) if sig == "S1SUSPEND"
        ));
        let cmdline = format!("resume={}", plain.display());
        assert!(matches!(inspect(&cmdline, None, dev), Verdict::NoImage(_)));
    }

    #[test]
    fn a_swap_file_is_read_at_resume_offset_pages() {
        let dir = tempfile::tempdir().unwrap();
        let device = swap_file(dir.path(), "btrfs-with-swapfile", 7, b"S1SUSPEND\0");
        let at_zero = format!("resume={}", device.display());
        assert!(matches!(
            inspect(&at_zero, None, dir.path()),
            Verdict::NoImage(_)
        ));
        let at_seven = format!("resume={} resume_offset=7", device.display());
        assert!(matches!(
            inspect(&at_seven, None, dir.path()),
            Verdict::ImagePresent(location, _) if location.offset == 7 * PAGE_SIZE
        ));
    }

    #[test]
    fn uuid_label_and_major_minor_name_device_links() {
        let dev = Path::new("/dev");
        let loc = |spec: &str| {
            locations(&format!("resume={spec}"), None, dev)[0]
                .device
                .clone()
        };
        assert_eq!(loc("UUID=ABCD-12"), Path::new("/dev/disk/by-uuid/abcd-12"));
        assert_eq!(loc("PARTUUID=Ab"), Path::new("/dev/disk/by-partuuid/ab"));
        assert_eq!(loc("LABEL=swap"), Path::new("/dev/disk/by-label/swap"));
        assert_eq!(
            loc("PARTLABEL=Swap"),
            Path::new("/dev/disk/by-partlabel/Swap")
        );
        assert_eq!(loc("254:1"), Path::new("/dev/block/254:1"));
        assert_eq!(loc("/dev/mapper/swap"), Path::new("/dev/mapper/swap"));
    }

    #[test]
    fn systemds_efi_variable_names_the_swap_by_uuid_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let by_uuid = dir.path().join("disk/by-uuid");
        std::fs::create_dir_all(&by_uuid).unwrap();
        swap_file(&by_uuid, "0f3c", 3, b"S1SUSPEND\0");
        let mut raw = vec![7, 0, 0, 0];
        raw.extend_from_slice(br#"{"uuid":"0F3C","offset":3,"kernelVersion":"6.6"}"#);
        assert!(matches!(
            inspect("quiet", Some(&raw), dir.path()),
            Verdict::ImagePresent(location, _) if location.named_by.contains("HibernateLocation")
        ));
    }

    #[test]
    fn noresume_discards_the_image_and_nothing_configured_is_said_so() {
        let dir = tempfile::tempdir().unwrap();
        let image = swap_file(dir.path(), "hibernated", 0, b"S1SUSPEND\0");
        let cmdline = format!("resume={} noresume", image.display());
        assert_eq!(inspect(&cmdline, None, dir.path()), Verdict::ResumeDisabled);
        assert_eq!(
            inspect("quiet", None, dir.path()),
            Verdict::NoResumeConfigured
        );
    }

    #[test]
    fn a_missing_resume_device_is_unreadable_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let cmdline = format!("resume={}", dir.path().join("gone").display());
        assert!(matches!(
            inspect(&cmdline, None, dir.path()),
            Verdict::Unreadable(_, why) if why.contains("cannot open")
        ));
    }
}
