# Adopting rasa on a machine that already runs on btrfs: state written while nothing is wiped is
# copied into /persist by the migrate app (`nix run .#migrate`), and survives the first wiping
# boot with its owner and mode.
{ self, migrate }:
let
  common = import ./common.nix { inherit self; };
  layout = lib: {
    virtualisation.rootDevice = "/dev/vdb";
    virtualisation.fileSystems = common.fileSystems lib "/dev/vdb";
  };
in
{
  name = "rasa-migrate";

  nodes.machine = { lib, ... }: {
    imports = [ common.node ];

    # Before: the btrfs layout, nothing wiped yet.
    specialisation.plain.configuration = layout lib;

    # After: rasa enabled, keeping the same state.
    specialisation.wiping.configuration = layout lib // {
      rasa = {
        enable = true;
        inherit (common.kept) directories files;
      };
    };
  };

  testScript = { nodes, ... }:
    let
      # The next boot's manifest, from the system the test built (the new root has no profiles).
      manifest = "${nodes.machine.system.build.toplevel}/specialisation/wiping/etc/rasa/manifest.json";
    in
    ''
      ${common.pythonHelpers}

      with subtest("boot 0: format btrfs"):
          machine.wait_for_unit("multi-user.target")
          format_btrfs("/dev/vdb")
          machine.succeed("bootctl set-default nixos-generation-1-specialisation-plain.conf")
          machine.succeed("sync")
          machine.crash()

      with subtest("boot 1: state on a root that is not wiped yet"):
          machine.start()
          machine.wait_for_unit("multi-user.target")
          assert "/dev/vdb on / type btrfs" in machine.succeed("mount")
          machine.succeed("install -d -o alice -g users -m 0750 /var/lib/rasa-test")
          write_kept()
          machine.succeed("touch /test_flag")

      with subtest("boot 1: the migrate app plans, then copies"):
          manifest = "${manifest}"
          machine.succeed(f"${migrate} --manifest {manifest} >&2")
          machine.fail("test -e /persist/var/lib/rasa-test/data")
          machine.succeed(f"${migrate} --manifest {manifest} --apply >&2")
          machine.succeed("test -e /persist/var/lib/rasa-test/data")
          machine.succeed("bootctl set-default nixos-generation-1-specialisation-wiping.conf")
          machine.shutdown()

      with subtest("boot 2: wiped, and the state survived with its metadata"):
          machine.start()
          machine.wait_for_console_text("installed the new root")
          machine.wait_for_unit("multi-user.target")
          machine.fail("test -e /test_flag")
          check_kept()
          # Copied by migrate before this first wiping boot, so the initrd could mount it.
          machine.succeed("findmnt /var/lib/nixos && test -s /var/lib/nixos/uid-map")
          machine.succeed("rasa check system >&2")
    '';
}
