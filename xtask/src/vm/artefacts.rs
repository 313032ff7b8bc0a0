//! What the boots need, built once and cached under build/vm: the rasa binaries, the
//! provisioning initrd, the provisioned base disk and the dracut initrds. Each artefact is
//! rebuilt only when a key over its inputs changes.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::qemu::{self, Ending};

/// The LUKS header's UUID, fixed so the kernel command line can name it.
pub const LUKS_UUID: &str = "6a0bd9e4-52c3-4e0e-9a3c-7f1d3b2a5c01";
/// The test disk's passphrase; also the content of the key file for unattended boots.
pub const PASSPHRASE: &str = "pass";
/// Bump to invalidate every cached artefact after a change to how they are built.
const RECIPE: &str = "vm-harness-1";

const PROVISION_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "dm-crypt",
    "xts",
    "algif_skcipher",
    "algif_hash",
    "crc32c_generic",
    "btrfs",
];
const DRACUT_MODULES: &str = "systemd systemd-initrd systemd-udevd systemd-journald \
systemd-tmpfiles systemd-ask-password dracut-systemd bash kernel-modules crypt dm btrfs \
rootfs-block fs-lib base udev-rules";
const DRACUT_DRIVERS: &str = "virtio_pci virtio_blk dm_crypt xts btrfs";

/// Which initrd a boot uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initrd {
    /// The committed unit with the release rasa: what a real host runs.
    Rollback,
    /// The committed unit pointed at a root subvolume that does not exist.
    BadConfig,
    /// The committed unit with a rasa built with `--features failpoints`.
    Failpoints,
    /// No rollback unit at all: the baseline for the boot-time figures.
    NoRollback,
}

impl Initrd {
    fn name(self) -> &'static str {
        match self {
            Initrd::Rollback => "rollback",
            Initrd::BadConfig => "bad-config",
            Initrd::Failpoints => "failpoints",
            Initrd::NoRollback => "no-rollback",
        }
    }
}

pub struct Artefacts {
    pub project: PathBuf,
    pub dir: PathBuf,
    pub kver: String,
    pub kernel: PathBuf,
    rasa: PathBuf,
    rasa_failpoints: PathBuf,
    base_key: Option<String>,
}

pub fn kernel_version() -> Result<String> {
    let mut versions: Vec<String> = std::fs::read_dir("/lib/modules")
        .context("reading /lib/modules (is linux-image-amd64 installed? `cargo xtask deps`)")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|v| Path::new(&format!("/boot/vmlinuz-{v}")).exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .context("no kernel with both /boot/vmlinuz-<version> and /lib/modules/<version>; install linux-image-amd64")
}

fn key_of(parts: &[&[u8]]) -> String {
    let mut h = DefaultHasher::new();
    RECIPE.hash(&mut h);
    for p in parts {
        p.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Rebuild `out` with `build` unless its stamp says it was built from the same inputs.
fn cached(out: &Path, key: &str, build: impl FnOnce(&Path) -> Result<()>) -> Result<bool> {
    let stamp = PathBuf::from(format!("{}.key", out.display()));
    if out.exists() && std::fs::read_to_string(&stamp).is_ok_and(|k| k == key) {
        return Ok(false);
    }
    let _ = std::fs::remove_file(&stamp);
    let tmp = PathBuf::from(format!("{}.tmp", out.display()));
    let _ = std::fs::remove_file(&tmp);
    build(&tmp)?;
    std::fs::rename(&tmp, out)?;
    std::fs::write(&stamp, key)?;
    Ok(true)
}

fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The shared libraries `ldd` says `binary` needs, the loader included.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Copy a host file into `root` at the same path (following symlinks).
fn copy_into(root: &Path, host: &Path) -> Result<()> {
    let dest = root.join(host.strip_prefix("/").unwrap_or(host));
    std::fs::create_dir_all(dest.parent().unwrap())?;
    std::fs::copy(host, &dest).with_context(|| format!("copying {}", host.display()))?;
    Ok(())
}

fn busybox_applets(bin: &Path) -> Result<()> {
    let list = Command::new("busybox").arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = bin.join(applet);
        if applet != "busybox" && !link.exists() {
            std::os::unix::fs::symlink("busybox", &link)?;
        }
    }
    Ok(())
}

impl Artefacts {
    /// Build rasa (release, and with failpoints into its own target dir) and find the kernel.
    pub fn prepare(project: &Path) -> Result<Artefacts> {
        let dir = project.join("build/vm");
        std::fs::create_dir_all(dir.join("logs"))?;
        let kver = kernel_version()?;
        let kernel = PathBuf::from(format!("/boot/vmlinuz-{kver}"));
        eprintln!("vm: building rasa (release, and release with failpoints)");
        // Output only on failure: cargo replays rasa's warnings on every run otherwise.
        run_quiet(
            Command::new("cargo")
                .args(["build", "--quiet", "--release", "-p", "rasa"])
                .current_dir(project),
        )?;
        // A separate target dir, so the two builds never overwrite each other's binary.
        run_quiet(
            Command::new("cargo")
                .args(["build", "--quiet", "--release", "-p", "rasa"])
                .args([
                    "--features",
                    "failpoints",
                    "--target-dir",
                    "target/failpoints",
                ])
                .current_dir(project),
        )?;
        Ok(Artefacts {
            project: project.to_path_buf(),
            dir,
            kver,
            kernel,
            rasa: project.join("target/release/rasa"),
            rasa_failpoints: project.join("target/failpoints/release/rasa"),
            base_key: None,
        })
    }

    fn vm_file(&self, name: &str) -> PathBuf {
        self.project.join("tests/vm").join(name)
    }

    pub fn unit_text(&self) -> Result<String> {
        Ok(String::from_utf8(read(&self.vm_file("rollback.service"))?)?)
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    /// The provisioned disk: LUKS2, btrfs with root, read-only root-blank, persist and nix (the
    /// stage-2 payload). Made in a VM because the host kernel has no dm-crypt.
    pub fn base_disk(&mut self) -> Result<PathBuf> {
        let provision_init = read(&self.vm_file("provision-init.sh"))?;
        let stage2_init = read(&self.vm_file("stage2-init.sh"))?;
        let rasa = read(&self.rasa)?;
        let key = key_of(&[
            self.kver.as_bytes(),
            &provision_init,
            &stage2_init,
            &rasa,
            LUKS_UUID.as_bytes(),
        ]);
        let initrd = self.dir.join("provision-initrd.cpio");
        let disk = self.dir.join("base.qcow2");
        cached(&initrd, &key, |out| {
            eprintln!("vm: building the provisioning initrd");
            self.build_provision_initrd(out, &provision_init, &stage2_init)
        })?;
        cached(&disk, &key, |out| {
            eprintln!("vm: provisioning the encrypted disk in a VM (LUKS2, btrfs, subvolumes)");
            run_quiet(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(out)
                    .arg("2G"),
            )?;
            let transcript = qemu::boot(&qemu::Boot {
                label: "provision".into(),
                kernel: &self.kernel,
                initrd: &initrd,
                disk: out,
                append: "console=ttyS0 panic=-1 quiet".into(),
                passphrase: None,
                cut_at: None,
                done_marker: "RASA-VM-PROVISIONED",
                timeout: Duration::from_secs(300),
                log: self.log("provision"),
                second_disk: None,
            })?;
            if transcript.ending != Ending::Completed {
                bail!(
                    "provisioning failed: {:?} (console log: {})",
                    transcript.ending,
                    transcript.log.display()
                );
            }
            eprintln!(
                "vm: provisioned in {:.1} s",
                transcript.elapsed.as_secs_f64()
            );
            Ok(())
        })?;
        self.base_key = Some(key);
        Ok(disk)
    }

    fn build_provision_initrd(&self, out: &Path, init: &[u8], stage2: &[u8]) -> Result<()> {
        let root = self.dir.join("provision-root");
        if root.exists() {
            std::fs::remove_dir_all(&root)?;
        }
        for d in [
            "bin",
            "proc",
            "sys",
            "dev",
            "run",
            "mnt",
            "payload/bin",
            "payload/lib",
            "payload/libexec",
        ] {
            std::fs::create_dir_all(root.join(d))?;
        }
        std::fs::copy("/usr/bin/busybox", root.join("bin/busybox"))?;
        busybox_applets(&root.join("bin"))?;
        for tool in [
            "/usr/sbin/cryptsetup",
            "/usr/sbin/mkfs.btrfs",
            "/usr/bin/btrfs",
        ] {
            let tool = Path::new(tool);
            std::fs::copy(tool, root.join("bin").join(tool.file_name().unwrap()))
                .with_context(|| format!("copying {} (is it installed?)", tool.display()))?;
            for lib in libraries(tool)? {
                copy_into(&root, &lib)?;
            }
        }
        // glibc loads libgcc_s at run time (thread cancellation), so ldd does not list it.
        copy_into(&root, Path::new("/lib/x86_64-linux-gnu/libgcc_s.so.1"))?;

        let mut order = String::new();
        let mut seen = std::collections::HashSet::new();
        for module in PROVISION_MODULES {
            let out = Command::new("modprobe")
                .args(["-S", &self.kver, "--show-depends", module])
                .output()?;
            if !out.status.success() {
                bail!(
                    "modprobe --show-depends {module}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(path) = line.strip_prefix("insmod ").map(|l| l.trim()) {
                    let path = path.split_whitespace().next().unwrap();
                    if seen.insert(path.to_owned()) {
                        copy_into(&root, Path::new(path))?;
                        order.push_str(path);
                        order.push('\n');
                    }
                }
            }
        }
        std::fs::write(root.join("modules.order"), order)?;
        std::fs::write(root.join("vm.key"), PASSPHRASE)?;
        let init = String::from_utf8(init.to_vec())?.replace("@LUKS_UUID@", LUKS_UUID);
        write_executable(&root.join("init"), init.as_bytes())?;

        // The nix subvolume's payload: everything stage 2 runs, since the root starts blank.
        let payload = root.join("payload");
        std::fs::copy("/usr/bin/busybox", payload.join("bin/busybox"))?;
        busybox_applets(&payload.join("bin"))?;
        write_executable(&payload.join("init"), stage2)?;
        for (name, binary) in [
            ("rasa", self.rasa.as_path()),
            ("btrfs", Path::new("/usr/bin/btrfs")),
        ] {
            std::fs::copy(binary, payload.join("libexec").join(name))?;
            for lib in libraries(binary)? {
                std::fs::copy(&lib, payload.join("lib").join(lib.file_name().unwrap()))?;
            }
            let _ = std::fs::remove_file(payload.join("bin").join(name));
            write_executable(
                &payload.join("bin").join(name),
                format!("#!/nix/bin/sh\nexec /nix/lib/ld-linux-x86-64.so.2 --library-path /nix/lib /nix/libexec/{name} \"$@\"\n").as_bytes(),
            )?;
        }
        std::fs::copy(
            "/lib/x86_64-linux-gnu/libgcc_s.so.1",
            payload.join("lib/libgcc_s.so.1"),
        )?;

        // Uncompressed: under TCG the kernel's decompression costs more than reading the bytes.
        let out_file = std::fs::File::create(out)?;
        let status = Command::new("sh")
            .args(["-c", "find . | LC_ALL=C sort | cpio -o -H newc --quiet"])
            .current_dir(&root)
            .stdout(out_file)
            .status()?;
        if !status.success() {
            bail!("cpio failed building the provisioning initrd");
        }
        Ok(())
    }

    /// A dracut systemd initrd with rasa and the unit (as `variant` wants them).
    pub fn initrd(&self, variant: Initrd) -> Result<PathBuf> {
        let unit = self.unit_text()?;
        let unit = match variant {
            Initrd::BadConfig => {
                if !unit.contains(" --root root ") {
                    bail!("tests/vm/rollback.service has no `--root root` to make wrong");
                }
                Some(unit.replace(" --root root ", " --root wrong "))
            }
            Initrd::NoRollback => None,
            Initrd::Rollback | Initrd::Failpoints => Some(unit),
        };
        let rasa_path = if variant == Initrd::Failpoints {
            &self.rasa_failpoints
        } else {
            &self.rasa
        };
        let rasa = read(rasa_path)?;
        let fstab = read(&self.vm_file("fstab"))?;
        let key = key_of(&[
            self.kver.as_bytes(),
            unit.as_deref().unwrap_or("").as_bytes(),
            &rasa,
            &fstab,
            DRACUT_MODULES.as_bytes(),
            DRACUT_DRIVERS.as_bytes(),
        ]);
        let out = self.dir.join(format!("initrd-{}.img", variant.name()));
        cached(&out, &key, |tmp| {
            eprintln!("vm: building the dracut initrd ({})", variant.name());
            let overlay = self.dir.join(format!("overlay-{}", variant.name()));
            if overlay.exists() {
                std::fs::remove_dir_all(&overlay)?;
            }
            let units = overlay.join("etc/systemd/system");
            std::fs::create_dir_all(units.join("initrd.target.wants"))?;
            std::fs::create_dir_all(overlay.join("usr/bin"))?;
            if let Some(unit) = &unit {
                std::fs::write(units.join("rollback.service"), unit)?;
                std::os::unix::fs::symlink(
                    "../rollback.service",
                    units.join("initrd.target.wants/rollback.service"),
                )?;
            }
            std::fs::copy(rasa_path, overlay.join("usr/bin/rasa"))?;
            std::fs::write(overlay.join("etc/vm.key"), PASSPHRASE)?;
            let mut install: Vec<String> = libraries(rasa_path)?
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            install.push("/lib/x86_64-linux-gnu/libgcc_s.so.1".into());
            run_quiet(
                Command::new("dracut")
                    .args([
                        "--force",
                        "--quiet",
                        "--no-hostonly",
                        "--no-hostonly-cmdline",
                    ])
                    .args(["--kver", &self.kver])
                    .args(["--modules", DRACUT_MODULES])
                    .args(["--drivers", DRACUT_DRIVERS])
                    .arg("--include")
                    .arg(&overlay)
                    .arg("/")
                    .arg("--add-fstab")
                    .arg(self.vm_file("fstab"))
                    .args(["--install", &install.join(" ")])
                    .args(["--compress", "zstd"])
                    .arg(tmp),
            )
        })?;
        Ok(out)
    }

    /// The kernel command line for the dracut initrd boots.
    pub fn append(&self, key_file: bool, extra: &str) -> String {
        let mut cmdline = format!(
            "console=ttyS0 panic=-1 printk.time=1 rd.luks.name={LUKS_UUID}=cryptroot \
             root=/dev/mapper/cryptroot rootfstype=btrfs rootflags=subvol=root rw init=/nix/init \
             rd.shell=0 rd.emergency=poweroff sysrq_always_enabled=1"
        );
        if key_file {
            cmdline.push_str(&format!(" rd.luks.key={LUKS_UUID}=/etc/vm.key"));
        }
        if !extra.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        cmdline
    }

    /// A new qcow2 overlay over `backing`, so scenarios share one provisioned disk.
    pub fn overlay(&self, backing: &Path, name: &str) -> Result<PathBuf> {
        let disk = self.dir.join(format!("{name}.qcow2"));
        let _ = std::fs::remove_file(&disk);
        run_quiet(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(backing)
                .arg(&disk),
        )?;
        Ok(disk)
    }

    pub fn base_path(&self) -> PathBuf {
        self.dir.join("base.qcow2")
    }

    /// Build several initrds at once: dracut is mostly single-threaded shell and cpio work.
    pub fn build_initrds(&self, variants: &[Initrd]) -> Result<()> {
        std::thread::scope(|scope| {
            let jobs: Vec<_> = variants
                .iter()
                .map(|&v| scope.spawn(move || self.initrd(v).map(|_| ())))
                .collect();
            jobs.into_iter()
                .try_for_each(|j| j.join().expect("dracut thread panicked"))
        })
    }

    pub fn base_key(&self) -> &str {
        self.base_key.as_deref().unwrap_or("")
    }
}

fn write_executable(path: &Path, content: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, content)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}
