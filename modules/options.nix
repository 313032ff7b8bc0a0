# rasa's options, declared apart from what they do (wiring.nix, presets.nix), so that the option
# documentation (docs/options.md) is generated from this file and the presets module.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption types literalExpression;
  # A subvolume at the top level of the filesystem, as `rasa` accepts it (src/layout.rs,
  # check_name): rasa refuses anything else, so the type does.
  subvolumeName = types.addCheck (types.strMatching "[^/]+")
    (name: name != "." && name != ".." && lib.stringLength name <= 200)
  // {
    description = "subvolume name (at the top level: no \"/\", not \".\" or \"..\", at most 200 bytes)";
  };
in
{
  options.rasa = {
    enable = lib.mkEnableOption "a blank btrfs root on every boot, with opted-in state kept in the storage root (rasa)";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ../nix/package.nix { };
      defaultText = literalExpression "pkgs.callPackage <rasa>/nix/package.nix { }";
      example = literalExpression "inputs.rasa.packages.\${pkgs.system}.default";
      description = "The rasa package, used in the initrd and by the prune service. The build-time manifest check runs rasa built from the same source for the build platform (`pkgs.pkgsBuildHost`), so that cross builds can run it.";
    };

    device = mkOption {
      type = types.nullOr types.str;
      default = config.fileSystems."/".device or null;
      defaultText = literalExpression ''config.fileSystems."/".device'';
      example = "/dev/mapper/cryptroot";
      description = ''
        The block device that holds the btrfs filesystem. On LUKS, the unlocked device
        (`/dev/mapper/<name>`); the rollback is then ordered after that device's unlock, found in
        {option}`boot.initrd.luks.devices`.
      '';
    };

    subvolumes = {
      root = mkOption {
        type = subvolumeName;
        default = "root";
        example = "@";
        description = "The subvolume `/` is mounted from, reset on every boot.";
      };
      blank = mkOption {
        type = types.nullOr subvolumeName;
        default = "root-blank";
        example = null;
        description = ''
          The read-only subvolume every boot starts from (a snapshot of it becomes the new root).
          `null` starts every boot from a new empty subvolume instead (`rasa rollback --empty`).
        '';
      };
      oldRoots = mkOption {
        type = subvolumeName;
        default = "old_roots";
        example = "previous-roots";
        description = "The directory at the top level where previous roots are kept for recovery, one per boot.";
      };
      persist = mkOption {
        type = subvolumeName;
        default = "persist";
        example = "@persist";
        description = ''
          The persistent subvolume, mounted at {option}`rasa.storageRoot`. rasa never touches it;
          the name is checked against the others so that a typo cannot make it the root.
        '';
      };
    };

    retention = {
      keep = mkOption {
        type = types.ints.u32;
        default = 5;
        example = 10;
        description = "The newest old roots always kept. 0 keeps none by count.";
      };
      keepDays = mkOption {
        type = types.ints.u32;
        default = 7;
        example = 30;
        description = "Old roots retired less than this many days ago are kept as well. 0 keeps none by age.";
      };
    };

    storageRoot = mkOption {
      type = types.strMatching "/[^/].*[^/]|/[^/]";
      default = "/persist";
      example = "/nix/persist";
      description = ''
        Where the persistent subvolume is mounted; the persisted copy of `/a/b` is at
        `<storageRoot>/a/b`. Its filesystem must be `neededForBoot`.
      '';
    };

    directories = mkOption {
      type = types.listOf (types.either types.str (types.attrsOf types.anything));
      default = [ ];
      example = literalExpression ''[ "/var/lib/libvirt" { directory = "/var/lib/private/foo"; mode = "0700"; } ]'';
      description = ''
        Directories to keep, passed to `environment.persistence.<storageRoot>.directories`
        (impermanence's syntax: a path, or `{ directory; user; group; mode; }`).
      '';
    };

    files = mkOption {
      type = types.listOf (types.either types.str (types.attrsOf types.anything));
      default = [ ];
      example = literalExpression ''[ "/etc/nix/id_rsa" { file = "/etc/foo.conf"; parentDirectory.mode = "0700"; } ]'';
      description = "Files to keep, passed to `environment.persistence.<storageRoot>.files`.";
    };

    users = mkOption {
      type = types.attrsOf (types.submodule {
        options = {
          directories = mkOption {
            type = types.listOf (types.either types.str (types.attrsOf types.anything));
            default = [ ];
            example = [ "Documents" { directory = ".ssh"; mode = "0700"; } ];
            description = "Directories relative to the user's home.";
          };
          files = mkOption {
            type = types.listOf (types.either types.str (types.attrsOf types.anything));
            default = [ ];
            example = [ ".bash_history" ];
            description = "Files relative to the user's home.";
          };
        };
      });
      default = { };
      example = literalExpression ''{ alice.directories = [ "Documents" { directory = ".ssh"; mode = "0700"; } ]; }'';
      description = "Per-user state, passed to `environment.persistence.<storageRoot>.users`.";
    };

    watch.enable = lib.mkEnableOption ''
      `rasa watch` from early in stage 2 (before `sysinit.target`): it records, for each path the
      next boot erases, the unit that wrote it, in `/run/rasa/watch.jsonl` and inside the root
      (`/var/lib/rasa/watch/record.jsonl`, which moves with the root to the old roots); see
      docs/watch.md'';

    shutdownReport.enable = lib.mkEnableOption ''
      a unit that, when the machine shuts down, logs to the journal what the coming boot will
      erase (`rasa diff`'s summary), so that `journalctl -b -1 -u rasa-shutdown-report` shows it
      after the reboot'';

    prometheus = {
      enable = mkOption {
        type = types.bool;
        default = false;
        example = true;
        description = ''
          A timer that writes `rasa diff --prometheus` for node_exporter's textfile collector:
          the paths and bytes the next boot erases by the unit that wrote them, the old roots
          kept, and the last rollback's result, duration and time (from the record
          `rasa rollback` leaves in /run/rasa/rollback.json; left out when there is none). Point
          the collector at the file's directory (docs/nixos.md, "A fleet view").
        '';
      };
      file = mkOption {
        type = types.strMatching "/.+/[^/]+\\.prom";
        default = "/run/rasa-metrics/rasa.prom";
        example = "/var/lib/prometheus-node-exporter-text-files/rasa.prom";
        description = ''
          The metrics file, replaced atomically at each run. The collector reads only names
          ending in `.prom`. Its directory is created (0755, root) by systemd-tmpfiles when
          missing, and left as it is when it exists; pass it to node_exporter as
          `--collector.textfile.directory`. Not under /run/rasa, which rasa keeps 0700 (the
          watch record is there), so node_exporter, running as its own user, could not read it.
        '';
      };
      interval = mkOption {
        type = types.str;
        default = "*:0/15";
        example = "hourly";
        description = ''
          How often to write the file: a systemd calendar event (`OnCalendar=`, see
          systemd.time(7)); it is also written a few minutes after boot.
        '';
      };
    };

    bootMenuEntry.enable = mkOption {
      type = types.bool;
      default = true;
      description = ''
        A boot-menu entry that boots the previous root once: the specialisation
        `rasa-previous-root`, which only adds the kernel parameter `rasa.boot-old-root`, so that
        the initrd puts a writable snapshot of the newest old root in place as the root (the old
        root itself is kept, and today's root is kept as an old root too); the next normal boot
        resets as usual. systemd-boot and GRUB list specialisations (GRUB in a submenu); the
        entry is there before it is needed, which is the point. It costs a second evaluation of
        the system when it is built and one more entry per generation; the closure is shared.
        To boot a named old root instead, edit the entry's command line to
        `rasa.boot-old-root=NAME` (`rasa old-roots list` shows the names).
      '';
    };

    diffIgnore = mkOption {
      type = types.listOf types.str;
      default = [ "/var/cache/**" "/home/*/.cache/**" "/root/.cache/**" ];
      example = [ "/var/cache/**" "/home/*/.mozilla/firefox/*/cache2/**" ];
      description = "Glob patterns of absolute paths that `rasa diff` leaves out of its report.";
    };
  };
}
