# Two boots of a LUKS2 + btrfs machine with rasa: the passphrase is typed at the console, the
# root is reset, the kept state survives with its owner and mode, the previous root is kept as
# configured and older ones are pruned after boot.
{ self }:
let
  common = import ./common.nix { inherit self; };
in
{
  name = "rasa-encrypted-btrfs-rollback";

  nodes.machine = { lib, ... }: {
    imports = [ common.node ];

    specialisation.rasa.configuration = {
      boot.initrd.luks.devices = lib.mkVMOverride {
        cryptroot.device = "/dev/vdb";
      };
      virtualisation.rootDevice = "/dev/mapper/cryptroot";
      virtualisation.fileSystems = common.fileSystems lib "/dev/mapper/cryptroot";
      rasa = {
        enable = true;
        # One old root kept, none by age: the second boot must prune the first boot's.
        retention = { keep = 1; keepDays = 0; };
        inherit (common.kept) directories files;
      };
    };
  };

  testScript = { nodes, ... }:
    let
      # The manifest of the system the first wiping boot starts.
      manifest = "${nodes.machine.system.build.toplevel}/specialisation/rasa/rasa-manifest.json";
    in
    ''
      ${common.pythonHelpers}

      def unlock():
          machine.wait_for_console_text("Please enter passphrase for disk cryptroot")
          machine.send_console("supersecret\n")
          machine.wait_for_console_text("installed the new root")
          machine.wait_for_unit("multi-user.target")

      with subtest("boot 0: format LUKS2 + btrfs"):
          machine.wait_for_unit("multi-user.target")
          machine.succeed("echo -n supersecret | cryptsetup luksFormat --type luks2 -q --iter-time=1 /dev/vdb -")
          machine.succeed("echo -n supersecret | cryptsetup luksOpen -q --key-file=- /dev/vdb cryptroot")
          format_btrfs("/dev/mapper/cryptroot")
          create_needed_for_boot("/dev/mapper/cryptroot", "${manifest}")
          machine.succeed("cryptsetup luksClose cryptroot")
          machine.succeed("bootctl set-default nixos-generation-1-specialisation-rasa.conf")
          machine.succeed("sync")
          machine.crash()

      with subtest("boot 1: unlock, roll back, write state"):
          machine.start()
          unlock()
          assert "/dev/mapper/cryptroot on / type btrfs" in machine.succeed("mount")
          # Mounted by the initrd from /persist, so this boot's uid and gid maps are kept.
          machine.succeed("findmnt /var/lib/nixos")
          machine.succeed("touch /test_flag")
          machine.succeed("mkdir -p /var/lib/machines")
          machine.succeed("btrfs subvolume create /var/lib/machines/rasa-nested")
          machine.succeed("touch /var/lib/machines/rasa-nested/inside")
          write_kept()
          machine.shutdown()

      with subtest("boot 2: the root is blank again, the kept state is back"):
          machine.start()
          unlock()
          machine.fail("test -e /test_flag")
          machine.fail("test -e /var/lib/machines/rasa-nested")
          check_kept()
          machine.succeed("findmnt /var/lib/nixos && test -s /var/lib/nixos/uid-map")

      with subtest("boot 2: the previous root is kept, older ones pruned"):
          # Done when it has exited once this boot (its Result is "success" before it starts, too).
          machine.wait_until_succeeds("test $(systemctl show -p ExecMainExitTimestampMonotonic --value rasa-prune.service) != 0")
          result = machine.succeed("systemctl show -p Result --value rasa-prune.service").strip()
          assert result == "success", f"rasa-prune.service: {result}"
          # Not /mnt: the root was just reset to the empty blank, which has no /mnt.
          machine.succeed("mount --mkdir -o subvolid=5 /dev/mapper/cryptroot /run/rasa-top")
          old_roots = machine.succeed("ls /run/rasa-top/old_roots").split()
          assert len(old_roots) == 1, f"expected one old root (keep = 1), found {old_roots}"
          machine.succeed(f"test -e /run/rasa-top/old_roots/{old_roots[0]}/test_flag")
          machine.succeed(f"test -e /run/rasa-top/old_roots/{old_roots[0]}/var/lib/machines/rasa-nested/inside")
          machine.succeed("btrfs property get -ts /run/rasa-top/root-blank ro | grep -q true")
          machine.succeed("umount /run/rasa-top")

      with subtest("boot 2: rasa check system passes"):
          machine.succeed("rasa check system >&2")
    '';
}
