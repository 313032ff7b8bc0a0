# rasa's NixOS module: a blank btrfs root on every boot, the opted-in state kept in the storage root.
#
# It wires three things from one set of options, so they cannot disagree:
#   - boot.initrd.systemd.services.rollback: `rasa rollback` before / is mounted;
#   - systemd.services.rasa-prune: deletes old roots past retention after boot;
#   - /etc/rasa/manifest.json: the settings and every persisted path, read by `rasa migrate`,
#     `rasa diff` and `rasa check`, and validated with `rasa check manifest` at build time.
# The persisted paths themselves are impermanence's `environment.persistence`; the manifest is
# rendered from its final value, so entries configured there directly are covered as well.
{ config
, options
, lib
, pkgs
, utils
, ...
}:
let
  inherit (lib) mkOption types literalExpression;

  cfg = config.rasa;
  sv = cfg.subvolumes;
  presets = import ./presets.nix { inherit lib config; };
  manifest = import ./manifest.nix {
    inherit lib config pkgs;
    rasa = cfg.package;
    extraFiles = presets.extraManifestPaths;
  };

  rasaExe = lib.getExe' cfg.package "rasa";

  # The flags rollback and prune share, so the two can never act on different layouts.
  layoutFlags =
    [ "--device" cfg.device "--root" sv.root ]
    ++ (if sv.blank == null then [ "--empty" ] else [ "--blank" sv.blank ])
    ++ [ "--old-roots" sv.oldRoots "--persist" sv.persist ];
  retentionFlags = [
    "--keep"
    (toString cfg.retention.keep)
    "--keep-days"
    (toString cfg.retention.keepDays)
  ];
  # systemd reads ExecStart with shell-like quoting plus %-specifiers.
  execStart = args: lib.replaceStrings [ "%" ] [ "%%" ] (lib.escapeShellArgs ([ rasaExe ] ++ args));

  deviceUnit = "${utils.escapeSystemdPath cfg.device}.device";
  luksDevices = config.boot.initrd.luks.devices;
  # The unlock that backs the device. When the device is named some other way (by-uuid, by-label),
  # order after every LUKS unlock: After= on a unit that is not started costs nothing, and a
  # missing order would let the rollback race the unlock.
  luksNames =
    let
      direct = lib.filter (name: "/dev/mapper/${name}" == cfg.device) (lib.attrNames luksDevices);
    in
    if direct != [ ] then direct else lib.attrNames luksDevices;
  cryptsetupUnits = map (name: "systemd-cryptsetup@${utils.escapeSystemdPath name}.service") luksNames;

  rootFs = config.fileSystems."/" or null;
  subvolOption = name: [ "subvol=${name}" "subvol=/${name}" ];
  # The filesystem the storage root lives on: the longest mount point that contains it.
  storageFs =
    let
      contains = fs: fs.mountPoint == "/" || fs.mountPoint == cfg.storageRoot || lib.hasPrefix "${fs.mountPoint}/" cfg.storageRoot;
      candidates = lib.filter contains (lib.attrValues config.fileSystems);
    in
    if candidates == [ ] then null
    else lib.last (lib.sortOn (fs: lib.stringLength fs.mountPoint) candidates);

  namedSubvolumes =
    [
      { option = "rasa.subvolumes.root"; value = sv.root; }
      { option = "rasa.subvolumes.oldRoots"; value = sv.oldRoots; }
      { option = "rasa.subvolumes.persist"; value = sv.persist; }
    ]
    ++ lib.optional (sv.blank != null) { option = "rasa.subvolumes.blank"; value = sv.blank; };
  plainName = name: name != "" && name != "." && name != ".." && !(lib.hasInfix "/" name);
  collisions = lib.concatLists (lib.imap0
    (i: a: map (b: { inherit a b; }) (lib.filter (b: b.value == a.value) (lib.drop (i + 1) namedSubvolumes)))
    namedSubvolumes);

  shadowPersisted = lib.any (e: e.path == "/etc/shadow" || e.path == "/etc" || (e.kind == "directory" && lib.hasPrefix "${e.path}/" "/etc/shadow")) manifest.entries;

  fsExample = mountPoint: subvol: ''fileSystems."${mountPoint}" = { device = "${toString cfg.device}"; fsType = "btrfs"; options = [ "subvol=${subvol}" ]; neededForBoot = true; };'';
  retentionValid = n: n >= 0 && n <= 4294967295;

  assertions =
    [
      {
        assertion = options ? environment.persistence;
        message = "rasa: impermanence's module is not imported, and rasa keeps state through environment.persistence; import rasa's nixosModules.default (which bundles it), or add inputs.impermanence.nixosModules.impermanence to your imports.";
      }
      {
        assertion = config.boot.initrd.systemd.enable;
        message = "rasa: the rollback runs as a unit in a systemd initrd; set boot.initrd.systemd.enable = true;";
      }
      {
        assertion = cfg.device != null;
        message = ''rasa: no btrfs device: set rasa.device (for example "/dev/mapper/cryptroot"), or fileSystems."/".device, from which it defaults.'';
      }
      {
        assertion = rootFs != null && rootFs.fsType == "btrfs";
        message = ''rasa: / must be a btrfs subvolume that rasa resets, but fileSystems."/" ${if rootFs == null then "is not set" else "has fsType = \"${rootFs.fsType}\""}; set ${fsExample "/" sv.root}'';
      }
      {
        assertion = rootFs == null || cfg.device == null || rootFs.device == cfg.device;
        message = ''rasa: rasa.device is "${toString cfg.device}" but / is mounted from fileSystems."/".device = "${toString (rootFs.device or null)}"; they must name the same device: set rasa.device = "${toString (rootFs.device or null)}"; (or leave rasa.device at its default).'';
      }
      {
        assertion = rootFs == null || lib.any (o: lib.elem o (subvolOption sv.root)) rootFs.options;
        message = ''rasa: / must be mounted from the subvolume rasa resets, "${sv.root}": add "subvol=${sv.root}" to fileSystems."/".options, or set rasa.subvolumes.root to the subvolume / is mounted from.'';
      }
      {
        assertion = storageFs != null && storageFs.mountPoint != "/";
        message = ''rasa: the storage root ${cfg.storageRoot} is on the root filesystem, which rasa wipes on every boot; mount the persistent subvolume there: ${fsExample cfg.storageRoot sv.persist}'';
      }
      {
        assertion = storageFs == null || storageFs.mountPoint == "/" || utils.fsNeededForBoot storageFs;
        message = ''rasa: the filesystem of the storage root ${cfg.storageRoot} must be mounted in the initrd, before the persisted paths are bind-mounted: set fileSystems."${storageFs.mountPoint}".neededForBoot = true;'';
      }
      {
        assertion =
          storageFs == null || storageFs.mountPoint == "/" || storageFs.device != cfg.device
          || lib.any (o: lib.elem o (subvolOption sv.persist)) storageFs.options;
        message = ''rasa: ${storageFs.mountPoint} is mounted from rasa's device but not from the subvolume rasa.subvolumes.persist = "${sv.persist}", so rasa cannot tell the persistent subvolume from the ones it may reset: add "subvol=${sv.persist}" to fileSystems."${storageFs.mountPoint}".options, or set rasa.subvolumes.persist to the subvolume mounted there.'';
      }
      {
        assertion = !(lib.hasSuffix ".rasa-new" sv.root);
        message = ''rasa: rasa.subvolumes.root = "${sv.root}" ends in .rasa-new, which rasa reserves for the root it is preparing; rename the root subvolume.'';
      }
      {
        assertion = retentionValid cfg.retention.keep;
        message = "rasa: rasa.retention.keep = ${toString cfg.retention.keep} is not a valid count; set it to a whole number from 0 (keep none by count) to 4294967295, for example 5.";
      }
      {
        assertion = retentionValid cfg.retention.keepDays;
        message = "rasa: rasa.retention.keepDays = ${toString cfg.retention.keepDays} is not a valid number of days; set it to a whole number from 0 (keep none by age) to 4294967295, for example 7.";
      }
    ]
    ++ map
      (s: {
        assertion = plainName s.value;
        message = ''rasa: ${s.option} = "${s.value}" is not a plain subvolume name; give the name of a subvolume at the top level of the filesystem, without "/".'';
      })
      namedSubvolumes
    ++ map
      (c: {
        assertion = false;
        message = ''rasa: ${c.a.option} and ${c.b.option} are both "${c.a.value}"; the root, the blank, the old roots and the persistent subvolume must be different: give ${c.b.option} another name.'';
      })
      collisions
    ++ manifest.assertions;
in
{
  options.rasa = {
    enable = lib.mkEnableOption "a blank btrfs root on every boot, with opted-in state kept in the storage root (rasa)";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ../nix/package.nix { };
      defaultText = literalExpression "pkgs.callPackage <rasa>/nix/package.nix { }";
      example = literalExpression "inputs.rasa.packages.\${pkgs.system}.default";
      description = "The rasa package, used in the initrd, by the prune service and for the build-time manifest check.";
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
        type = types.str;
        default = "root";
        example = "@";
        description = "The subvolume `/` is mounted from, reset on every boot.";
      };
      blank = mkOption {
        type = types.nullOr types.str;
        default = "root-blank";
        example = null;
        description = ''
          The read-only subvolume every boot starts from (a snapshot of it becomes the new root).
          `null` starts every boot from a new empty subvolume instead (`rasa rollback --empty`).
        '';
      };
      oldRoots = mkOption {
        type = types.str;
        default = "old_roots";
        example = "previous-roots";
        description = "The directory at the top level where previous roots are kept for recovery, one per boot.";
      };
      persist = mkOption {
        type = types.str;
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
        type = types.int;
        default = 5;
        example = 10;
        description = "The newest old roots always kept. 0 keeps none by count.";
      };
      keepDays = mkOption {
        type = types.int;
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

    diffIgnore = mkOption {
      type = types.listOf types.str;
      default = [ "/var/cache/**" "/home/*/.cache/**" "/root/.cache/**" ];
      example = [ "/var/cache/**" "/home/*/.mozilla/firefox/*/cache2/**" ];
      description = "Glob patterns of absolute paths that `rasa diff` leaves out of its report.";
    };

    presets = presets.options;
  };

  config = lib.mkIf cfg.enable (lib.mkMerge [
    {
      inherit assertions;
      warnings =
        lib.optional (cfg.retention.keep == 0 && cfg.retention.keepDays == 0)
          "rasa: rasa.retention keeps no old roots (keep = 0, keepDays = 0), so a file lost by the wipe cannot be recovered; keep at least one, e.g. rasa.retention.keep = 1."
        ++ lib.optional (config.users.mutableUsers && !shadowPersisted)
          "rasa: users.mutableUsers is true but /etc/shadow is not persisted, so every password set with passwd is lost at the next boot; set users.mutableUsers = false with users.users.<name>.hashedPasswordFile under ${cfg.storageRoot} (docs/guide.md, \"Passwords and users\").";

      boot.initrd.systemd.services.rollback = {
        description = "Reset the btrfs root subvolume to a blank state (rasa)";
        wantedBy = [ "initrd.target" ];
        requires = [ deviceUnit ];
        # local-fs-pre.target comes after systemd-hibernate-resume: wiping before a resume would
        # change the filesystem under the hibernated kernel.
        after = [ deviceUnit ] ++ cryptsetupUnits ++ [ "local-fs-pre.target" ];
        before = [ "sysroot.mount" ];
        unitConfig = {
          DefaultDependencies = false;
          # The escape hatch: add rasa.skip-rollback to the kernel command line at the boot menu
          # to boot once on the previous root, un-wiped.
          ConditionKernelCommandLine = "!rasa.skip-rollback";
        };
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          StandardOutput = "journal+console";
          StandardError = "journal+console";
          ExecStart = execStart ([ "rollback" ] ++ layoutFlags ++ retentionFlags);
        };
      };
      boot.initrd.systemd.storePaths = [ rasaExe ];

      # Deleting old roots can take long (nested subvolumes), so it happens here, off the boot's
      # critical path, at the lowest priority.
      systemd.services.rasa-prune = {
        description = "Delete old roots past retention (rasa)";
        wantedBy = [ "multi-user.target" ];
        after = [ "local-fs.target" ];
        serviceConfig = {
          Type = "oneshot";
          Nice = 19;
          IOSchedulingClass = "idle";
          ExecStart = execStart ([ "prune" ] ++ layoutFlags ++ retentionFlags);
        };
      };

      environment.systemPackages = [ cfg.package ];

      environment.etc."rasa/manifest.json".source = manifest.checked;
      # Also linked from the system's top level, which holds when /etc is an overlay image.
      system.systemBuilderCommands = ''
        ln -s ${manifest.checked} $out/rasa-manifest.json
      '';
      system.build.rasaManifest = manifest.file;
    }
    (lib.optionalAttrs (options ? environment.persistence) {
      environment.persistence.${cfg.storageRoot} = {
        hideMounts = lib.mkDefault true;
        inherit (cfg) directories files;
        users = lib.mapAttrs (_: user: { inherit (user) directories files; }) cfg.users;
      };
    })
    (lib.optionalAttrs (options ? environment.persistence) presets.config)
  ]);
}
