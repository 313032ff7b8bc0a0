# What both VM tests share: a machine that first boots the test driver's default disk, from which
# the test script formats a second disk (/dev/vdb) the way the guide does, and specialisations
# that boot from that disk (as nixpkgs' systemd-initrd-luks-password and -btrfs-raid tests do).
{ self }:
{
  # The base machine: systemd-boot, so the script can pick a specialisation for the next boot.
  node = { pkgs, ... }: {
    imports = [ self.nixosModules.default ];
    virtualisation = {
      emptyDiskImages = [ 2048 ];
      useBootLoader = true;
      useEFIBoot = true;
      # The root on /dev/vdb has no /nix/store of its own.
      mountHostNixStore = true;
      memorySize = 1536;
    };
    boot.loader.systemd-boot.enable = true;
    boot.initrd.systemd = {
      enable = true;
      emergencyAccess = true;
    };
    environment.systemPackages = [ pkgs.btrfs-progs pkgs.cryptsetup ];
    users.users.alice = {
      isNormalUser = true;
      uid = 1000;
    };
  };

  # `/` and the other subvolumes of `device`, in place of the driver's default filesystems.
  fileSystems = lib: device: {
    "/" = {
      inherit device;
      fsType = lib.mkForce "btrfs";
      options = [ "subvol=root" ];
      autoFormat = lib.mkForce false;
    };
    "/persist" = {
      inherit device;
      fsType = "btrfs";
      options = [ "subvol=persist" ];
      neededForBoot = true;
    };
    "/var/log" = {
      inherit device;
      fsType = "btrfs";
      options = [ "subvol=log" ];
      neededForBoot = true;
    };
  };

  # The state the tests keep, and expect back with its owner and mode.
  kept = {
    directories = [{ directory = "/var/lib/rasa-test"; user = "alice"; group = "users"; mode = "0750"; }];
    files = [ "/etc/rasa-test.conf" ];
  };

  # Python helpers for the test scripts; interpolate at the top level of a testScript (a Nix
  # string does not re-indent what it interpolates).
  pythonHelpers = ''
    def format_btrfs(device):
        """Lay out the btrfs the guide describes on an opened device."""
        machine.succeed(f"mkfs.btrfs -q {device}")
        machine.succeed(f"mkdir -p /mnt && mount -o subvolid=5 {device} /mnt")
        for subvolume in ["root", "persist", "nix", "log"]:
            machine.succeed(f"btrfs subvolume create /mnt/{subvolume}")
        # The blank is an empty subvolume made read-only, not a snapshot of a populated root.
        machine.succeed("btrfs subvolume create /mnt/root-blank")
        machine.succeed("btrfs property set -ts /mnt/root-blank ro true")
        machine.succeed("umount /mnt")


    def create_needed_for_boot(device, manifest):
        """Make the storage copies of the manifest's needed-for-boot entries (/var/lib/nixos), as
        `rasa setup` and the disko example do, before the first wiping boot: the initrd bind-mounts
        them before the activation script that would create them runs."""
        import json
        entries = json.loads(machine.succeed(f"cat {manifest}"))["entries"]
        needed = [e for e in entries if e.get("neededForBoot")]
        assert needed, "the manifest has no needed-for-boot entry (/var/lib/nixos)"
        machine.succeed(f"mkdir -p /run/rasa-persist && mount -o subvol=persist {device} /run/rasa-persist")
        for e in needed:
            assert e["storageRoot"] == "/persist", e
            machine.succeed(f"install -d -o {e['user']} -g {e['group']} -m {e['mode']} /run/rasa-persist{e['path']}")
        machine.succeed("umount /run/rasa-persist")


    def write_kept():
        """Write the kept state (its directory is made by impermanence, or by the test)."""
        machine.succeed("install -o alice -g users -m 0640 /dev/null /var/lib/rasa-test/data")
        machine.succeed("echo kept > /var/lib/rasa-test/data")
        machine.succeed("echo 'setting = 1' > /etc/rasa-test.conf && chmod 0600 /etc/rasa-test.conf")


    def owner_mode(path):
        return machine.succeed(f"stat -c '%U:%G %a' {path}").strip()


    def check_kept():
        """The kept state is back, with its owner, group, mode and content."""
        for path, expected in [
            ("/var/lib/rasa-test", "alice:users 750"),
            ("/var/lib/rasa-test/data", "alice:users 640"),
            ("/etc/rasa-test.conf", "root:root 600"),
        ]:
            got = owner_mode(path)
            assert got == expected, f"{path}: expected {expected}, got {got}"
        assert machine.succeed("cat /var/lib/rasa-test/data").strip() == "kept"
        assert machine.succeed("cat /etc/rasa-test.conf").strip() == "setting = 1"
  '';
}
