# What rasa's options do (declared in options.nix; the presets in presets.nix). From one set of
# options, so that they cannot disagree:
#   - boot.initrd.systemd.services.rollback: `rasa rollback` before / is mounted;
#   - specialisation.rasa-previous-root: the boot-menu entry that boots the previous root once;
#   - systemd.services.rasa-prune: deletes old roots past retention after boot;
#   - /etc/rasa/manifest.json: the settings and every persisted path, read by `rasa migrate`,
#     `rasa diff` and `rasa check`, and validated with `rasa check manifest` when it is built.
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
  rlib = import ./lib.nix { inherit lib; };
  ruleProblems = (import ./rules.nix { inherit lib; }).problems manifest.value;
  cfg = config.rasa;
  sv = cfg.subvolumes;
  manifest = import ./manifest.nix {
    inherit lib config pkgs utils;
    # The check runs where the system is built: rasa for the build platform, so that a cross
    # build (an aarch64 machine built on x86_64) can run it.
    checker = pkgs.pkgsBuildHost.callPackage ../nix/package.nix { };
    extraFiles = cfg.manifestExtraFiles;
  };

  rasaExe = lib.getExe' cfg.package "rasa";

  # The flags rollback and prune share, so the two can never act on different layouts.
  layoutFlags =
    [ "--device" cfg.device "--root" sv.root ]
    ++ (if sv.blank == null then [ "--empty" ] else [ "--blank" sv.blank ])
    ++ [ "--old-roots" sv.oldRoots "--persist" sv.persist ];
  # The watcher's record inside the root: it must move with the root to the old roots.
  watchRecordDir = "/var/lib/rasa/watch";
  watchRecordKeptBy = lib.filter (e: rlib.covers e.path watchRecordDir) manifest.entries;

  retentionFlags = [
    "--keep"
    (toString cfg.retention.keep)
    "--keep-days"
    (toString cfg.retention.keepDays)
  ];
  # systemd reads ExecStart with its own quoting, C escapes, $VAR and %-specifiers: nixpkgs'
  # escapeSystemdExecArgs semantics, so a device such as /dev/disk/by-label/My\x20Disk reaches
  # rasa unchanged.
  execStart = args: rlib.escapeSystemdExecArgs ([ rasaExe ] ++ args);

  # A rollback unit of the same name defined outside rasa (the guides' hand-written one, with a
  # `script`): rasa then defines none of the unit, so that the two do not end in a merge error,
  # and an assertion says what to delete. Read from the option's definitions, which name their
  # files; this file's own definition is told apart by its location.
  foreignRollback = lib.filter
    (d: d.file != toString ./wiring.nix && builtins.isAttrs d.value && d.value ? rollback)
    options.boot.initrd.systemd.services.definitionsWithLocations;
  ownsRollbackUnit = foreignRollback == [ ];

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
  collisions = lib.concatLists (lib.imap0
    (i: a: map (b: { inherit a b; }) (lib.filter (b: b.value == a.value) (lib.drop (i + 1) namedSubvolumes)))
    namedSubvolumes);

  shadowPersisted = lib.any (e: e.path == "/etc/shadow" || e.path == "/etc" || (e.kind == "directory" && lib.hasPrefix "${e.path}/" "/etc/shadow")) manifest.entries;

  fsExample = mountPoint: subvol: ''fileSystems."${mountPoint}" = { device = "${toString cfg.device}"; fsType = "btrfs"; options = [ "subvol=${subvol}" ]; neededForBoot = true; };'';

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
        # The manifest check refuses such a root too (src/check/manifest.rs); said here, with the fix.
        assertion = !(lib.any (top: cfg.storageRoot == top || lib.hasPrefix "${top}/" cfg.storageRoot) [ "/nix" "/boot" ]);
        message = ''rasa: rasa.storageRoot = "${cfg.storageRoot}" is inside ${if lib.hasPrefix "/boot" cfg.storageRoot then "/boot" else "/nix"}, which survives every boot by itself and which rasa never treats as kept state; give the persistent subvolume a mount point of its own and set rasa.storageRoot to it: ${fsExample "/persist" "persist"} rasa.storageRoot = "/persist";${lib.optionalString (sv.persist != "persist") " rasa.subvolumes.persist = \"persist\";"}'';
      }
      {
        assertion = ownsRollbackUnit;
        message = ''rasa: boot.initrd.systemd.services.rollback is also defined in ${lib.concatStringsSep ", " (lib.unique (map (d: d.file) foreignRollback))}: a hand-written rollback (a `script` that deletes and recreates the root) next to rasa's unit of the same name. rasa's unit replaces it: delete the whole `boot.initrd.systemd.services.rollback = { ... };` definition there.'';
      }
    ]
    ++ map
      (c: {
        assertion = false;
        message = ''rasa: ${c.a.option} and ${c.b.option} are both "${c.a.value}"; the root, the blank, the old roots and the persistent subvolume must be different: give ${c.b.option} another name.'';
      })
      collisions
    ++ manifest.assertions;
  # The rule set's problems, said only when no assertion above says more precisely what to change
  # (a storage root inside /nix, a storage root other than rasa's, ...).
  rulesPreamble = "rasa: the persisted paths or subvolume names break rules that rasa holds every manifest to";
  allAssertions = assertions
    ++ [
    {
      # Any other failed assertion (this module's, the presets', impermanence's) is said first;
      # this one is told apart by its message, so looking at the others never evaluates it.
      assertion = ruleProblems == [ ]
        || lib.any (a: !(lib.hasPrefix rulesPreamble a.message) && !a.assertion) config.assertions;
      message = "${rulesPreamble} (`rasa check manifest` would refuse this one at build time):\n"
        + lib.concatMapStrings (p: "  - ${p}\n") ruleProblems
        + "Correct environment.persistence (or rasa.directories, rasa.files, rasa.users) and the rasa.* options as each line says.";
    }
  ];
in
{
  config = lib.mkIf cfg.enable (lib.mkMerge [
    {
      assertions = allAssertions;
      warnings =
        lib.optional (cfg.retention.keep == 0 && cfg.retention.keepDays == 0)
          "rasa: rasa.retention keeps no old roots (keep = 0, keepDays = 0), so a file lost by the wipe cannot be recovered; keep at least one, e.g. rasa.retention.keep = 1."
        ++ lib.optional (cfg.watch.enable && watchRecordKeptBy != [ ])
          "rasa: rasa.watch.enable records in ${watchRecordDir}, inside the root, so that the record moves with the root it describes and `rasa diff --old-root` finds it; but ${lib.concatMapStringsSep ", " (e: "${e.path} (in ${e.storageRoot})") watchRecordKeptBy} ${if lib.length watchRecordKeptBy == 1 then "is" else "are"} persisted, so it lands in storage and stays there: persist narrower paths, so that ${watchRecordDir} is on the root."
        ++ lib.optional (config.users.mutableUsers && !shadowPersisted)
          "rasa: users.mutableUsers is true but /etc/shadow is not persisted, so every password set with passwd is lost at the next boot; set users.mutableUsers = false with users.users.<name>.hashedPasswordFile under ${cfg.storageRoot} (docs/guide.md, \"Passwords and users\").";

      boot.initrd.systemd.services.rollback = lib.mapAttrs (_: lib.mkIf ownsRollbackUnit) {
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

      # The boot-menu entry that boots the previous root once (`rasa rollback` reads the kernel
      # parameter). A specialisation rather than an extra loader entry: it works for systemd-boot
      # and GRUB alike, with the kernel, initrd and parameters of its own generation. Inside a
      # specialisation nixpkgs clears `specialisation`, so this does not nest.
      specialisation = lib.mkIf cfg.bootMenuEntry.enable {
        rasa-previous-root.configuration.boot.kernelParams = [ "rasa.boot-old-root" ];
      };

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

      # rasa watch (docs/watch.md): ready (sd_notify) once its fanotify mark is in place, and
      # ordered before sysinit.target, so it sees what services write from their start; after
      # local-fs.target, so that the persisted bind mounts are there to tell apart.
      systemd.services.rasa-watch = lib.mkIf cfg.watch.enable {
        description = "Record which unit writes state the next boot erases (rasa)";
        wantedBy = [ "sysinit.target" ];
        before = [ "sysinit.target" "systemd-tmpfiles-setup.service" "shutdown.target" ];
        after = [ "local-fs.target" ];
        conflicts = [ "shutdown.target" ];
        unitConfig.DefaultDependencies = false;
        serviceConfig = {
          Type = "notify";
          ExecStart = execStart [ "watch" ];
          Nice = 10;
          # fanotify, the private mount of the top level and open_by_handle_at need these, and
          # nothing else.
          CapabilityBoundingSet = [ "CAP_SYS_ADMIN" "CAP_DAC_READ_SEARCH" "CAP_DAC_OVERRIDE" ];
        };
      };

      # Started with the system and doing nothing until it is stopped: at shutdown, stopped in
      # the reverse of its After= order, so before the file systems are unmounted and before the
      # watcher stops (its record still in /run/rasa). The next boot's `journalctl -b -1` has it.
      systemd.services.rasa-shutdown-report = lib.mkIf cfg.shutdownReport.enable {
        description = "Log what the coming boot will erase (rasa)";
        wantedBy = [ "multi-user.target" ];
        after = [ "local-fs.target" ] ++ lib.optional cfg.watch.enable "rasa-watch.service";
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStop = execStart ([ "diff" ] ++ layoutFlags);
          # A slow diff must not hold the shutdown up.
          TimeoutStopSec = 60;
          SyslogIdentifier = "rasa-shutdown-report";
        };
      };

      # The fleet view (docs/nixos.md): `rasa diff --prometheus` on a timer, for node_exporter's
      # textfile collector. A diff walks the root, so at the lowest priority.
      systemd.services.rasa-prometheus = lib.mkIf cfg.prometheus.enable {
        description = "Write rasa's metrics for node_exporter's textfile collector (rasa)";
        after = [ "local-fs.target" "systemd-tmpfiles-setup.service" ];
        serviceConfig = {
          Type = "oneshot";
          Nice = 19;
          IOSchedulingClass = "idle";
          ExecStart = execStart ([ "diff" ] ++ layoutFlags ++ [ "--prometheus" cfg.prometheus.file ]);
        };
      };
      systemd.timers.rasa-prometheus = lib.mkIf cfg.prometheus.enable {
        description = "Write rasa's metrics periodically (rasa)";
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnCalendar = cfg.prometheus.interval;
          OnBootSec = "3min";
        };
      };
      # `rasa diff --prometheus` refuses a directory that is not there. Created 0755 root (the
      # collector reads the file as its own user); mode and owner `-`, so that a directory that
      # exists already (node_exporter's own, or /tmp) is left exactly as it is, never changed.
      systemd.tmpfiles.rules = lib.mkIf cfg.prometheus.enable [
        "d ${dirOf cfg.prometheus.file} - - - -"
      ];

      environment.systemPackages = [ cfg.package ];

      environment.etc."rasa/manifest.json".source = manifest.file;
      # Also linked from the system's top level, which holds when /etc is an overlay image.
      system.systemBuilderCommands = ''
        ln -s ${manifest.file} $out/rasa-manifest.json
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
  ]);
}
