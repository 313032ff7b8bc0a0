# rasa module evaluation tests, shared by two harnesses:
#   - tests/nix/run.nix: here, with the real nixpkgs lib and impermanence over the nixos-eval stubs;
#   - checks/module-eval.nix: in `nix flake check`, with a full NixOS evaluation.
# `eval` takes a list of modules (rasa and impermanence already imported) and returns `config`;
# `evalWithoutImpermanence` the same with rasa alone (nixosModules.rasa);
# `rasa` is the package the configurations use; `checker` the rasa that checks the manifest at
# build time (built for the build platform); `unitFile` is the VM harness's committed
# tests/vm/rollback.service, or null when it does not exist.
# Returns a list of { name; status = "pass" | "fail" | "skip"; detail; } (and `manifest`, the
# rendered manifest text, for the harness to run `rasa check manifest` on).
{ lib, eval, evalWithoutImpermanence, rasa, checker, unitFile }:
let
  exe = "${rasa}/bin/rasa";
  # The argv systemd gives the program for an ExecStart= line.
  systemdArgv = import ./systemd-exec.nix { inherit lib; };

  # An encrypted machine laid out as the guide does it.
  encrypted = {
    boot.initrd.systemd.enable = true;
    boot.initrd.luks.devices.cryptroot.device = "/dev/vda2";
    fileSystems = {
      "/" = { device = "/dev/mapper/cryptroot"; fsType = "btrfs"; options = [ "subvol=root" "compress=zstd" ]; };
      "/nix" = { device = "/dev/mapper/cryptroot"; fsType = "btrfs"; options = [ "subvol=nix" ]; };
      "/persist" = { device = "/dev/mapper/cryptroot"; fsType = "btrfs"; options = [ "subvol=persist" ]; neededForBoot = true; };
      "/var/log" = { device = "/dev/mapper/cryptroot"; fsType = "btrfs"; options = [ "subvol=log" ]; neededForBoot = true; };
    };
    rasa = { enable = true; package = rasa; };
  };
  unencrypted = {
    boot.initrd.systemd.enable = true;
    fileSystems = {
      "/" = { device = "/dev/vda2"; fsType = "btrfs"; options = [ "subvol=root" ]; };
      "/persist" = { device = "/dev/vda2"; fsType = "btrfs"; options = [ "subvol=persist" ]; neededForBoot = true; };
    };
    rasa = { enable = true; package = rasa; };
  };

  failed = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  ours = config: lib.filter (lib.hasPrefix "rasa:") (failed config);
  show = v: builtins.toJSON v;

  # A case passes when `got` equals `want`; the detail shows both.
  expect = name: got: want: {
    inherit name;
    status = if got == want then "pass" else "fail";
    detail = if got == want then "" else "expected ${show want}\n got      ${show got}";
  };
  # A configuration that must fail with exactly these messages of rasa's.
  mustFail = name: modules: messages: expect "assertion: ${name}" (ours (eval modules)) messages;

  unitOf = config: {
    inherit (config.boot.initrd.systemd.services.rollback) after before requires wantedBy;
    inherit (config.boot.initrd.systemd.services.rollback.unitConfig) DefaultDependencies ConditionKernelCommandLine;
    inherit (config.boot.initrd.systemd.services.rollback.serviceConfig)
      Type RemainAfterExit StandardOutput StandardError;
    argv = systemdArgv config.boot.initrd.systemd.services.rollback.serviceConfig.ExecStart;
  };
  layoutArgs = device: [ "--device" device "--root" "root" "--blank" "root-blank" "--old-roots" "old_roots" "--persist" "persist" "--keep" "5" "--keep-days" "7" ];
  # The agreed rollback unit (docs/nixos.md) with default settings. `after` is spelled out in full;
  # its first unit is the device unit, which the rollback also requires.
  expectedUnit = { device, after }: {
    inherit after;
    before = [ "sysroot.mount" ];
    requires = [ (lib.head after) ];
    wantedBy = [ "initrd.target" ];
    DefaultDependencies = false;
    ConditionKernelCommandLine = "!rasa.skip-rollback";
    Type = "oneshot";
    RemainAfterExit = true;
    StandardOutput = "journal+console";
    StandardError = "journal+console";
    argv = [ exe "rollback" ] ++ layoutArgs device;
  };

  # [Unit]/[Install] dependency keys and the ExecStart arguments of a unit file.
  parseUnitFile = text:
    let
      step = acc: line:
        let
          l = lib.trim line;
          section = builtins.match "\\[(.*)]" l;
          kv = builtins.match "([A-Za-z]+)=(.*)" l;
        in
        if section != null then acc // { section = lib.head section; }
        else if kv != null && lib.head kv == "ExecStart" then acc // { execStart = lib.elemAt kv 1; }
        else if kv != null then
          let key = "${acc.section}.${lib.head kv}"; in
          acc // { values = acc.values // { ${key} = (acc.values.${key} or [ ]) ++ words (lib.elemAt kv 1); }; }
        else acc;
      words = s: lib.filter (w: w != "") (lib.splitString " " s);
      parsed = lib.foldl' step { section = ""; values = { }; execStart = ""; } (lib.splitString "\n" text);
      inherit (parsed) values;
      get = key: values.${key} or [ ];
    in
    {
      requires = get "Unit.Requires";
      after = get "Unit.After";
      before = get "Unit.Before";
      wantedBy = get "Install.WantedBy";
      defaultDependencies = map (v: if lib.elem v [ "no" "false" "0" ] then false else true) (get "Unit.DefaultDependencies");
      conditionKernelCommandLine = get "Unit.ConditionKernelCommandLine";
      execArgs = lib.drop 1 (systemdArgv parsed.execStart);
    };

  manifestOf = config: builtins.fromJSON config.system.build.rasaManifest.text;

  # Pairs of persisted paths where one is the other or inside it: each path must be kept once.
  persistedTwice = config:
    let
      paths = rlib.persistedPaths config.environment.persistence;
      indexed = lib.imap0 (i: p: p // { inherit i; }) paths;
    in
    lib.concatMap
      (a: map (b: "${a.path} (${a.storageRoot}) and ${b.path} (${b.storageRoot})")
        (lib.filter (b: b.i > a.i && (rlib.covers a.path b.path || rlib.covers b.path a.path)) indexed))
      indexed;

  # The checks every configuration of the corpus (corpus.nix) must pass with rasa on top.
  corpusCases = c:
    let
      config = eval c.modules;
      unit = config.boot.initrd.systemd.services.rollback;
      deviceUnit = "${lib.replaceStrings [ "/" ] [ "-" ] (lib.removePrefix "/" (lib.replaceStrings [ "-" ] [ "\\x2d" ] c.device))}.device";
      manifestPaths = map (e: e.path) (manifestOf config).entries;
    in
    [
      (expect "corpus: ${c.name}: no failed assertion, rasa's or impermanence's" (failed config) [ ])
      (expect "corpus: ${c.name}: every path persisted once" (persistedTwice config) [ ])
      (expect "corpus: ${c.name}: the rollback is ordered after the unlock and before /sysroot"
        {
          requires = unit.requires;
          unlocksMissing = lib.filter (u: !(lib.elem u unit.after)) c.unlocks;
          before = unit.before;
          device = lib.elemAt (systemdArgv unit.serviceConfig.ExecStart) 3;
        }
        { requires = [ deviceUnit ]; unlocksMissing = [ ]; before = [ "sysroot.mount" ]; inherit (c) device; })
      ((expect "corpus: ${c.name}: the manifest covers what it persisted"
        (lib.filter (p: !(lib.elem p manifestPaths)) c.persisted) [ ])
      // { manifest = config.system.build.rasaManifest.text; })
    ]
    ++ lib.optional (c ? stateCheck) (
      let
        named = config: lib.filter (p: lib.any (m: lib.hasInfix " keeps state in ${p}, which" m) config.warnings) c.stateCheck.paths;
        servicePresets = lib.filter (n: !(lib.elem n [ "essential" "sudoLecture" ])) (lib.attrNames config.rasa.presets);
        withoutPresets = eval (c.modules ++ [{ rasa.presets = lib.genAttrs servicePresets (_: lib.mkForce false); }]);
      in
      expect "corpus: ${c.name}: the state check names what only rasa's presets keep, and nothing the configuration keeps"
        { lost = named config; lostWithoutPresets = named withoutPresets; }
        { inherit (c.stateCheck) lost lostWithoutPresets; }
    );
  rlib = import ../../modules/lib.nix { inherit lib; };
  entry = storageRoot: path: kind: user: group: mode: { inherit storageRoot path kind user group mode; neededForBoot = false; };
  bootEntry = storageRoot: path: kind: user: group: mode: entry storageRoot path kind user group mode // { neededForBoot = true; };
in
[
  (expect "rollback unit: encrypted" (unitOf (eval [ encrypted ])) (expectedUnit {
    device = "/dev/mapper/cryptroot";
    after = [ "dev-mapper-cryptroot.device" "systemd-cryptsetup@cryptroot.service" "local-fs-pre.target" ];
  }))

  (expect "rollback unit: unencrypted" (unitOf (eval [ unencrypted ])) (expectedUnit {
    device = "/dev/vda2";
    after = [ "dev-vda2.device" "local-fs-pre.target" ];
  }))

  (
    let
      byUuid = "/dev/disk/by-uuid/0b4e6f2a-7d3c-4a53-9d0c-1f2e3d4c5b6a";
      config = eval [
        encrypted
        {
          boot.initrd.luks.devices.cryptswap.device = "/dev/vda3";
          fileSystems."/".device = lib.mkForce byUuid;
          fileSystems."/persist".device = lib.mkForce byUuid;
        }
      ];
    in
    expect "rollback unit: a by-uuid device on LUKS waits for every unlock"
      { inherit (config.boot.initrd.systemd.services.rollback) after requires; }
      {
        after = [
          "dev-disk-by\\x2duuid-0b4e6f2a\\x2d7d3c\\x2d4a53\\x2d9d0c\\x2d1f2e3d4c5b6a.device"
          "systemd-cryptsetup@cryptroot.service"
          "systemd-cryptsetup@cryptswap.service"
          "local-fs-pre.target"
        ];
        requires = [ "dev-disk-by\\x2duuid-0b4e6f2a\\x2d7d3c\\x2d4a53\\x2d9d0c\\x2d1f2e3d4c5b6a.device" ];
      }
  )

  (
    let
      config = eval [ encrypted { rasa.subvolumes.blank = null; rasa.retention = { keep = 2; keepDays = 30; }; } ];
    in
    expect "empty mode and retention reach rollback and prune"
      {
        rollback = systemdArgv config.boot.initrd.systemd.services.rollback.serviceConfig.ExecStart;
        prune = systemdArgv config.systemd.services.rasa-prune.serviceConfig.ExecStart;
        blank = (manifestOf config).rollback.blank;
      }
      {
        rollback = [ exe "rollback" "--device" "/dev/mapper/cryptroot" "--root" "root" "--empty" "--old-roots" "old_roots" "--persist" "persist" "--keep" "2" "--keep-days" "30" ];
        prune = [ exe "prune" "--device" "/dev/mapper/cryptroot" "--root" "root" "--empty" "--old-roots" "old_roots" "--persist" "persist" "--keep" "2" "--keep-days" "30" ];
        blank = null;
      }
  )

  (
    let service = (eval [ encrypted ]).systemd.services.rasa-prune; in
    expect "prune service: stage 2, idle, same layout as the rollback"
      { inherit (service) wantedBy after; inherit (service.serviceConfig) Type Nice IOSchedulingClass; argv = systemdArgv service.serviceConfig.ExecStart; }
      {
        wantedBy = [ "multi-user.target" ];
        after = [ "local-fs.target" ];
        Type = "oneshot";
        Nice = 19;
        IOSchedulingClass = "idle";
        argv = [ exe "prune" ] ++ layoutArgs "/dev/mapper/cryptroot";
      }
  )

  (
    let
      # A device and subvolume names systemd would change if they were not escaped for ExecStart:
      # a C escape, environment variables, %-specifiers, quotes and a lone semicolon.
      device = "/dev/disk/by-label/My\\x20Disk";
      names = { root = "root$HOME"; blank = "blank%h"; oldRoots = "old'roots\"\\n"; persist = ";"; };
      config = eval [
        encrypted
        {
          fileSystems."/".device = lib.mkForce device;
          fileSystems."/".options = lib.mkForce [ "subvol=${names.root}" ];
          fileSystems."/persist".device = lib.mkForce device;
          fileSystems."/persist".options = lib.mkForce [ "subvol=${names.persist}" ];
          rasa.subvolumes = names;
          rasa.retention.keepDays = 3;
        }
      ];
      args = [ "--device" device "--root" names.root "--blank" names.blank "--old-roots" names.oldRoots "--persist" names.persist "--keep" "5" "--keep-days" "3" ];
    in
    expect "ExecStart: systemd passes device and subvolume names to rasa unchanged (C escapes, $, %, quotes, ;)"
      {
        rollback = systemdArgv config.boot.initrd.systemd.services.rollback.serviceConfig.ExecStart;
        prune = systemdArgv config.systemd.services.rasa-prune.serviceConfig.ExecStart;
      }
      { rollback = [ exe "rollback" ] ++ args; prune = [ exe "prune" ] ++ args; }
  )

  (
    let
      # The guides' hand-written unit (../shared/seeds/000), in the user's own file.
      handWritten = {
        _file = "/etc/nixos/impermanence.nix";
        boot.initrd.systemd.services.rollback = {
          description = "Rollback BTRFS root subvolume to a pristine state";
          wantedBy = [ "initrd.target" ];
          after = [ "systemd-cryptsetup@cryptroot.service" ];
          before = [ "sysroot.mount" ];
          unitConfig.DefaultDependencies = "no";
          serviceConfig.Type = "oneshot";
          script = ''
            mount --mkdir /dev/mapper/cryptroot /mnt
            btrfs subvolume delete /mnt/root
            btrfs subvolume create /mnt/root
            umount /mnt
          '';
        };
      };
      config = eval [ encrypted handWritten ];
      unit = config.boot.initrd.systemd.services.rollback;
      # The unit as a whole, as the initrd's unit file would be written from it.
      evaluates = (builtins.tryEval (builtins.deepSeq { inherit (unit) description after unitConfig serviceConfig script; } true)).success;
    in
    expect "a hand-written rollback unit next to rasa: one rasa assertion that says what to delete, not a merge error"
      { messages = ours config; inherit evaluates; }
      {
        messages = [
          "rasa: boot.initrd.systemd.services.rollback is also defined in /etc/nixos/impermanence.nix: a hand-written rollback (a `script` that deletes and recreates the root) next to rasa's unit of the same name. rasa's unit replaces it: delete the whole `boot.initrd.systemd.services.rollback = { ... };` definition there."
        ];
        evaluates = true;
      }
  )

  (mustFail "a path persisted both through rasa's options and directly" [
    encrypted
    { rasa.directories = [ "/var/lib/libvirt" ]; }
    { _file = "/etc/nixos/persist.nix"; environment.persistence."/persist".directories = [ "/var/lib/libvirt" ]; }
  ] [
    "rasa: /var/lib/libvirt is persisted both through rasa's options (rasa.directories, rasa.files or rasa.users) and directly in environment.persistence (in /etc/nixos/persist.nix): delete it from one of the two."
  ])

  (mustFail "a storage root inside /nix (\"/nix/persist\")" [
    encrypted
    {
      rasa.storageRoot = "/nix/persist";
      rasa.subvolumes.persist = "nix";
      fileSystems."/nix".neededForBoot = true;
    }
  ] [
    ''rasa: rasa.storageRoot = "/nix/persist" is inside /nix, which survives every boot by itself and which rasa never treats as kept state; give the persistent subvolume a mount point of its own and set rasa.storageRoot to it: fileSystems."/persist" = { device = "/dev/mapper/cryptroot"; fsType = "btrfs"; options = [ "subvol=persist" ]; neededForBoot = true; }; rasa.storageRoot = "/persist"; rasa.subvolumes.persist = "persist";''
  ])

  (mustFail "the configuration keeps its state in /nix/persist" [
    encrypted
    { environment.persistence."/nix/persist".directories = [ "/etc/nixos" ]; }
  ] [
    ''rasa: the configuration keeps its state in environment.persistence."/nix/persist", inside /nix or /boot, which survive every boot by themselves and which rasa never treats as kept state (rasa check manifest refuses such a storage root): move that state to the persistent subvolume's own mount point and rename the attribute to environment.persistence."/persist".''
  ])

  (mustFail "the configuration's storage root is not rasa.storageRoot" [
    encrypted
    { environment.persistence."/persist/system".directories = [ "/etc/nixos" ]; }
  ] [
    ''rasa: the configuration keeps its state in environment.persistence."/persist/system", but rasa.storageRoot is "/persist", where rasa's presets and options would keep theirs: set rasa.storageRoot = "/persist/system";''
  ])

  (
    let
      # Each preset path kept by the configuration in another way: persisted under another
      # storage root, a parent persisted, its own file system, an /etc link, a tmpfiles link.
      config = eval [
        encrypted
        {
          rasa.storageRoot = "/persist/system";
          networking.networkmanager.enable = true;
          virtualisation.docker.enable = true;
          hardware.bluetooth.enable = true;
          services.openssh.enable = true;
          environment.persistence."/persist/system" = {
            directories = [ "/var/lib" "/var/db/sudo" ];
            files = [ "/etc/ssh/ssh_host_ed25519_key" ];
          };
          environment.etc."NetworkManager/system-connections".source = "/persist/system/etc/NetworkManager/system-connections";
          environment.etc."machine-id".source = "/persist/system/etc/machine-id";
        }
      ];
      paths = map (p: p.path) (rlib.persistedPaths config.environment.persistence);
    in
    expect "presets add nothing the configuration keeps (a parent, a file system, /etc, another root), and leave ssh host keys it keeps alone"
      { inherit paths; twice = persistedTwice config; failed = failed config; hostKeys = config.services.openssh.hostKeys; }
      { paths = [ "/var/lib" "/var/db/sudo" "/etc/ssh/ssh_host_ed25519_key" ]; twice = [ ]; failed = [ ]; hostKeys = [ ]; }
  )

  (
    let
      # Whether the entry is there, and whether its configuration carries the kernel parameter
      # (under a full NixOS evaluation the parent's parameters are there too; the stubs hold the
      # definition as written).
      entryOf = config:
        let s = config.specialisation; in
        if s ? rasa-previous-root
        then lib.elem "rasa.boot-old-root" (s.rasa-previous-root.configuration.boot.kernelParams or [ ])
        else null;
      withRasa = extra: encrypted // { rasa = encrypted.rasa // extra; };
    in
    expect "boot-menu entry: a specialisation adding rasa.boot-old-root, on by default, none when disabled or without rasa"
      {
        default = entryOf (eval [ encrypted ]);
        disabled = entryOf (eval [ (withRasa { bootMenuEntry.enable = false; }) ]);
        withoutRasa = entryOf (eval [ (withRasa { enable = false; }) ]);
      }
      { default = true; disabled = null; withoutRasa = null; }
  )

  (expect "a good configuration fails no assertion (rasa's or impermanence's)"
    (lib.filter (m: lib.hasPrefix "rasa:" m || lib.hasInfix "environment.persistence" m) (failed (eval [ encrypted ])))
    [ ])

  (expect "assertion: nixosModules.rasa without impermanence" (ours (evalWithoutImpermanence [ encrypted ])) [
    "rasa: impermanence's module is not imported, and rasa keeps state through environment.persistence; import rasa's nixosModules.default (which bundles it), or add inputs.impermanence.nixosModules.impermanence to your imports."
  ])
  (mustFail "scripted initrd" [ encrypted { boot.initrd.systemd.enable = lib.mkForce false; } ] [
    "rasa: the rollback runs as a unit in a systemd initrd; set boot.initrd.systemd.enable = true;"
  ])
  (mustFail "/ is not btrfs" [ encrypted { fileSystems."/".fsType = lib.mkForce "ext4"; } ] [
    ''rasa: / must be a btrfs subvolume that rasa resets, but fileSystems."/" has fsType = "ext4"; set fileSystems."/" = { device = "/dev/mapper/cryptroot"; fsType = "btrfs"; options = [ "subvol=root" ]; neededForBoot = true; };''
  ])
  (mustFail "/ is not the root subvolume" [ encrypted { fileSystems."/".options = lib.mkForce [ "subvol=@" ]; } ] [
    ''rasa: / must be mounted from the subvolume rasa resets, "root": add "subvol=root" to fileSystems."/".options, or set rasa.subvolumes.root to the subvolume / is mounted from.''
  ])
  (mustFail "/ is on another device" [ encrypted { rasa.device = "/dev/mapper/other"; } ] [
    ''rasa: rasa.device is "/dev/mapper/other" but / is mounted from fileSystems."/".device = "/dev/mapper/cryptroot"; they must name the same device: set rasa.device = "/dev/mapper/cryptroot"; (or leave rasa.device at its default).''
  ])
  (mustFail "storage root mounted from another subvolume" [ encrypted { fileSystems."/persist".options = lib.mkForce [ "subvol=state" ]; } ] [
    ''rasa: /persist is mounted from rasa's device but not from the subvolume rasa.subvolumes.persist = "persist", so rasa cannot tell the persistent subvolume from the ones it may reset: add "subvol=persist" to fileSystems."/persist".options, or set rasa.subvolumes.persist to the subvolume mounted there.''
  ])
  (mustFail "storage root not neededForBoot" [ encrypted { fileSystems."/persist".neededForBoot = lib.mkForce false; } ] [
    ''rasa: the filesystem of the storage root /persist must be mounted in the initrd, before the persisted paths are bind-mounted: set fileSystems."/persist".neededForBoot = true;''
  ])
  (mustFail "storage root on the wiped root" [ encrypted { rasa.storageRoot = "/state"; } ] [
    ''rasa: the storage root /state is on the root filesystem, which rasa wipes on every boot; mount the persistent subvolume there: fileSystems."/state" = { device = "/dev/mapper/cryptroot"; fsType = "btrfs"; options = [ "subvol=persist" ]; neededForBoot = true; };''
  ])
  (mustFail "root and persist are the same" [ encrypted { rasa.subvolumes.persist = "root"; fileSystems."/persist".options = lib.mkForce [ "subvol=root" ]; } ] [
    ''rasa: rasa.subvolumes.root and rasa.subvolumes.persist are both "root"; the root, the blank, the old roots and the persistent subvolume must be different: give rasa.subvolumes.persist another name.''
  ])
  (mustFail "blank and old roots are the same" [ encrypted { rasa.subvolumes.oldRoots = "root-blank"; } ] [
    ''rasa: rasa.subvolumes.oldRoots and rasa.subvolumes.blank are both "root-blank"; the root, the blank, the old roots and the persistent subvolume must be different: give rasa.subvolumes.blank another name.''
  ])
  (expect "subvolume names are plain names at the top level (an option type)"
    (map
      (subvolumes: (builtins.tryEval (builtins.deepSeq (eval [ encrypted { rasa = { inherit subvolumes; }; } ]).rasa.subvolumes null)).success)
      [{ oldRoots = "snapshots/old"; } { blank = ".."; } { root = ""; } { blank = null; } { oldRoots = "old roots$%"; }])
    [ false false false true true ])
  (expect "retention is an unsigned 32-bit number (types.ints.u32): what rasa reads, no more, no less"
    (map
      (retention: (builtins.tryEval (builtins.deepSeq (eval [ encrypted { rasa = { inherit retention; }; } ]).rasa.retention null)).success)
      [{ keep = -1; } { keepDays = 4294967296; } { keep = 0; keepDays = 4294967295; }])
    [ false false true ])
  (mustFail "a mode the manifest cannot hold" [ encrypted { rasa.directories = [{ directory = "/var/lib/odd"; mode = "u+rwx"; }]; } ] [
    ''rasa: /var/lib/odd (in /persist) has a mode that cannot be written as an octal mode for rasa's manifest; give its mode in octal, for example mode = "0700";''
  ])

  (
    let
      config = eval [
        encrypted
        {
          users.users.alice = { isNormalUser = true; home = "/home/alice"; group = "users"; };
          rasa.directories = [ "/var/lib/libvirt" { directory = "/var/lib/private/secret"; mode = "u=rwx,g=,o="; } ];
          rasa.files = [ "/etc/nix/id_rsa" ];
          rasa.users.alice.directories = [{ directory = ".ssh"; mode = "0700"; }];
          rasa.diffIgnore = [ "/var/cache/**" ];
          # Straight into impermanence, as an existing configuration would.
          environment.persistence."/persist".directories = [ "/var/lib/tailscale" ];
          environment.persistence."/persist".users.alice.files = [ ".bash_history" ];
        }
      ];
    in
    # `services` (what the state check found) differs between the stub and a full NixOS, whose
      # own units have state directories: tested by the state-check cases.
    expect "manifest: rasa's options, presets, direct environment.persistence and a user" (removeAttrs (manifestOf config) [ "services" ]) {
      version = 1;
      rollback = {
        device = "/dev/mapper/cryptroot";
        root = "root";
        blank = "root-blank";
        oldRoots = "old_roots";
        persist = "persist";
        keep = 5;
        keepDays = 7;
      };
      entries = [
        (entry "/persist" "/etc/machine-id" "file" "root" "root" "0755")
        (entry "/persist" "/etc/nix/id_rsa" "file" "root" "root" "0755")
        (entry "/persist" "/home/alice/.bash_history" "file" "alice" "users" "0755")
        (entry "/persist" "/home/alice/.ssh" "directory" "alice" "users" "0700")
        (entry "/persist" "/var/db/sudo/lectured" "directory" "root" "root" "0700")
        (entry "/persist" "/var/lib/libvirt" "directory" "root" "root" "0755")
        # rasa.presets.logrotate: services.logrotate.enable is on by default in NixOS.
        (entry "/persist" "/var/lib/logrotate" "directory" "root" "root" "0755")
        (bootEntry "/persist" "/var/lib/nixos" "directory" "root" "root" "0755")
        (entry "/persist" "/var/lib/private/secret" "directory" "root" "root" "0700")
        (entry "/persist" "/var/lib/systemd" "directory" "root" "root" "0755")
        (entry "/persist" "/var/lib/tailscale" "directory" "root" "root" "0755")
      ];
      diffIgnore = [ "/var/cache/**" ];
    }
  )

  (
    let
      config = eval [ unencrypted ];
      file = config.system.build.rasaManifest;
    in
    expect "manifest: /var/log kept (needed for boot) when it is no filesystem of its own, written once and checked by the build platform's rasa"
      {
        varLog = lib.filter (e: e.path == "/var/log") (manifestOf config).entries;
        checked = lib.hasInfix ''${checker}/bin/rasa check manifest "$target"'' (file.checkPhase or "");
        etc = config.environment.etc."rasa/manifest.json".source == file;
        topLevel = lib.hasInfix "ln -s ${file} $out/rasa-manifest.json" config.system.systemBuilderCommands;
      }
      { varLog = [ (bootEntry "/persist" "/var/log" "directory" "root" "root" "0755") ]; checked = true; etc = true; topLevel = true; }
  )

  (
    let
      config = eval [
        encrypted
        {
          networking.networkmanager.enable = true;
          services.openssh.enable = true;
          virtualisation.docker.enable = true;
          hardware.bluetooth.enable = true;
        }
      ];
      persistence = config.environment.persistence."/persist";
      paths = map (e: e.path) (manifestOf config).entries;
    in
    expect "presets follow the services they keep"
      {
        hostKeys = map (k: k.path) config.services.openssh.hostKeys;
        # NetworkManager renames new files over secret_key, seen-bssids and timestamps: a symlink
        # would be replaced on the wiped root, a bind-mounted file fails with EBUSY.
        nmFiles = lib.filter (f: lib.hasInfix "NetworkManager" f.filePath) persistence.files;
        nmDirectories = map (d: d.dirPath) (lib.filter (d: lib.hasInfix "NetworkManager" d.dirPath) persistence.directories);
        manifestHas = map (p: lib.elem p paths) [
          "/etc/NetworkManager/system-connections"
          "/etc/ssh/ssh_host_ed25519_key"
          "/etc/ssh/ssh_host_ed25519_key.pub"
          "/var/lib/docker"
          "/var/lib/bluetooth"
        ];
      }
      {
        hostKeys = [ "/persist/etc/ssh/ssh_host_ed25519_key" "/persist/etc/ssh/ssh_host_rsa_key" ];
        nmFiles = [ ];
        nmDirectories = [ "/etc/NetworkManager/system-connections" "/var/lib/NetworkManager" ];
        manifestHas = [ true true true true true ];
      }
  )

  (
    let
      # lanzaboote is a flake of its own: its two options, declared as it declares them.
      lanzaboote = {
        options.boot.lanzaboote = {
          enable = lib.mkEnableOption "lanzaboote";
          pkiBundle = lib.mkOption { type = lib.types.str; default = "/var/lib/sbctl"; };
        };
      };
      every = {
        services.tailscale.enable = true;
        security.acme.certs."example.org" = { };
        boot.lanzaboote.enable = true;
        services.fprintd.enable = true;
        services.fwupd.enable = true;
        virtualisation.libvirtd.enable = true;
        virtualisation.podman.enable = true;
        services.flatpak.enable = true;
        services.cloud-init.enable = true;
        services.power-profiles-daemon.enable = true;
        hardware.bluetooth.enable = true;
        rasa.presets.root = true;
      };
      # Each preset path as impermanence will bind-mount it: directory, owner, mode.
      kept = config: map (d: { inherit (d) dirPath user group mode; })
        (lib.filter (d: lib.elem d.dirPath presetPaths) config.environment.persistence."/persist".directories);
      presetPaths = [
        "/var/lib/tailscale"
        "/var/lib/acme"
        "/var/lib/sbctl"
        "/var/lib/fprint"
        "/var/lib/fwupd"
        "/var/lib/libvirt"
        "/var/lib/containers"
        "/var/lib/flatpak"
        "/var/lib/cloud"
        "/var/lib/power-profiles-daemon"
        "/var/lib/bluetooth"
        "/root"
        "/etc/secureboot"
      ];
      d = dirPath: user: group: mode: { inherit dirPath user group mode; };
      on = eval [ encrypted lanzaboote every ];
      off = eval [ encrypted lanzaboote ];
      movedBundle = eval [ encrypted lanzaboote every { boot.lanzaboote.pkiBundle = "/etc/secureboot"; } ];
      manifestDirs = config: map (e: { inherit (e) path user group mode neededForBoot; })
        (lib.filter (e: lib.elem e.path (presetPaths ++ [ "/var/lib/nixos" "/var/lib/systemd" ])) (manifestOf config).entries);
    in
    expect "presets: each follows the option that turns its service on, and keeps its directory with owner and mode (a bind mount); /var/lib/nixos needed for boot"
      {
        on = kept on;
        off = kept off;
        secureBootMoved = map (x: x.dirPath) (lib.filter (x: lib.hasInfix "secureboot" x.dirPath || x.dirPath == "/var/lib/sbctl") (kept movedBundle));
        manifest = manifestDirs on;
        failed = lib.filter (lib.hasPrefix "rasa:") (failed on);
      }
      {
        on = [
          (d "/var/lib/acme" "acme" "acme" "0755")
          (d "/var/lib/bluetooth" "root" "root" "0700")
          (d "/var/lib/cloud" "root" "root" "0755")
          (d "/var/lib/containers" "root" "root" "0700")
          (d "/var/lib/flatpak" "root" "root" "0755")
          (d "/var/lib/fprint" "root" "root" "0700")
          (d "/var/lib/fwupd" "root" "root" "0755")
          (d "/var/lib/libvirt" "root" "root" "0755")
          (d "/var/lib/power-profiles-daemon" "root" "root" "0755")
          (d "/root" "root" "root" "0700")
          (d "/var/lib/sbctl" "root" "root" "0700")
          (d "/var/lib/tailscale" "root" "root" "0700")
        ];
        off = [ ];
        secureBootMoved = [ "/etc/secureboot" ];
        manifest = [
          { path = "/root"; user = "root"; group = "root"; mode = "0700"; neededForBoot = false; }
          { path = "/var/lib/acme"; user = "acme"; group = "acme"; mode = "0755"; neededForBoot = false; }
          { path = "/var/lib/bluetooth"; user = "root"; group = "root"; mode = "0700"; neededForBoot = false; }
          { path = "/var/lib/cloud"; user = "root"; group = "root"; mode = "0755"; neededForBoot = false; }
          { path = "/var/lib/containers"; user = "root"; group = "root"; mode = "0700"; neededForBoot = false; }
          { path = "/var/lib/flatpak"; user = "root"; group = "root"; mode = "0755"; neededForBoot = false; }
          { path = "/var/lib/fprint"; user = "root"; group = "root"; mode = "0700"; neededForBoot = false; }
          { path = "/var/lib/fwupd"; user = "root"; group = "root"; mode = "0755"; neededForBoot = false; }
          { path = "/var/lib/libvirt"; user = "root"; group = "root"; mode = "0755"; neededForBoot = false; }
          { path = "/var/lib/nixos"; user = "root"; group = "root"; mode = "0755"; neededForBoot = true; }
          { path = "/var/lib/power-profiles-daemon"; user = "root"; group = "root"; mode = "0755"; neededForBoot = false; }
          { path = "/var/lib/sbctl"; user = "root"; group = "root"; mode = "0700"; neededForBoot = false; }
          { path = "/var/lib/systemd"; user = "root"; group = "root"; mode = "0755"; neededForBoot = false; }
          { path = "/var/lib/tailscale"; user = "root"; group = "root"; mode = "0700"; neededForBoot = false; }
        ];
        failed = [ ];
      }
  )

  (
    let
      # Services of the kinds the state check reads, and the units it must name.
      units = {
        systemd.services.foo.serviceConfig = { StateDirectory = "foo bar:bar-link"; LogsDirectory = [ "foo" ]; CacheDirectory = "foo"; };
        systemd.services.kuma.serviceConfig = { DynamicUser = true; StateDirectory = "uptime-kuma"; };
        systemd.services.off = { enable = false; serviceConfig.StateDirectory = "off"; };
        systemd.services."tmpl@".serviceConfig.StateDirectory = "tmpl-%i";
        systemd.services.kept.serviceConfig.StateDirectory = "kept";
        systemd.services.ownfs.serviceConfig.StateDirectory = "ownfs";
        systemd.services.gone.serviceConfig.StateDirectory = "gone";
        systemd.timers.backup.timerConfig.Persistent = true;
        services.tailscale.enable = true;
        fileSystems."/var/lib/ownfs" = { device = "/dev/mapper/cryptroot"; fsType = "btrfs"; options = [ "subvol=ownfs" ]; };
        rasa.directories = [ "/var/lib/kept" ];
        rasa.ephemeral = [ "/var/lib/gone" ];
        # Turned off by hand: the check names the preset that would keep it.
        rasa.presets.tailscale = false;
        # /var/log not kept: LogsDirectory= matters.
        fileSystems."/var/log" = { device = "/dev/mapper/cryptroot"; fsType = "btrfs"; options = [ "subvol=log" ]; neededForBoot = true; };
      };
      ours = [ "foo.service" "kuma.service" "off.service" "tmpl@.service" "kept.service" "ownfs.service" "gone.service" "backup.timer" "tailscaled.service" ];
      about = m: lib.any (u: lib.hasInfix "${u} (" m) ours;
      stateWarnings = config: lib.filter (m: lib.hasInfix "which the next boot erases" m && about m) config.warnings;
      stateFailures = config: lib.filter (m: lib.hasInfix "which the next boot erases" m && about m) (failed config);
      warn = eval [ encrypted units ];
      asError = eval [ encrypted units { rasa.stateCheck = "error"; } ];
      quiet = eval [ encrypted units { rasa.stateCheck = "off"; } ];
      timersLost = eval [ encrypted units { rasa.presets.essential = false; } ];
      misplaced = eval [ encrypted { systemd.services.kuma.serviceConfig = { DynamicUser = "yes"; StateDirectory = [ "uptime-kuma" ]; }; rasa.directories = [ "/var/lib/uptime-kuma" ]; } ];
      expected = [
        ''rasa: foo.service (StateDirectory=bar) keeps state in /var/lib/bar, which the next boot erases: add `rasa.directories = [ "/var/lib/bar" ];`, or list "/var/lib/bar" in rasa.ephemeral to lose it on purpose.''
        ''rasa: foo.service (StateDirectory=foo) keeps state in /var/lib/foo, which the next boot erases: add `rasa.directories = [ "/var/lib/foo" ];`, or list "/var/lib/foo" in rasa.ephemeral to lose it on purpose.''
        ''rasa: kuma.service (StateDirectory=uptime-kuma with DynamicUser=) keeps state in /var/lib/private/uptime-kuma, which the next boot erases: add `rasa.directories = [ { directory = "/var/lib/private"; mode = "0700"; } ];` (the whole of /var/lib/private, as systemd makes it: 0700, so that no other user reaches the dynamic users' files; impermanence would create it 0755 for /var/lib/private/<name> alone), or list "/var/lib/private/uptime-kuma" in rasa.ephemeral to lose it on purpose.''
        ''rasa: tailscaled.service (on with services.tailscale.enable) keeps state in /var/lib/tailscale, which the next boot erases: add `rasa.presets.tailscale = true;`, or list "/var/lib/tailscale" in rasa.ephemeral to lose it on purpose.''
      ];
    in
    expect "state check: names each enabled service's unkept state with the line that keeps it; persisted, own file system, ephemeral, disabled and template units are quiet"
      {
        warn = stateWarnings warn;
        error = { warnings = stateWarnings asError; failures = stateFailures asError; };
        off = stateWarnings quiet;
        timers = lib.filter (m: lib.hasInfix "/var/lib/systemd/timers" m) (stateWarnings timersLost);
        misplaced = stateWarnings misplaced;
        manifest = lib.filter (s: lib.elem s.unit ours) (manifestOf warn).services;
      }
      {
        warn = expected;
        error = { warnings = [ ]; failures = expected; };
        off = [ ];
        timers = [
          "rasa: backup.timer (Persistent=true) keeps state in /var/lib/systemd/timers, which the next boot erases: add `rasa.presets.essential = true;`, or list \"/var/lib/systemd/timers\" in rasa.ephemeral to lose it on purpose."
        ];
        misplaced = [
          ''rasa: kuma.service (StateDirectory=uptime-kuma with DynamicUser=) keeps state in /var/lib/private/uptime-kuma, which the next boot erases (/var/lib/uptime-kuma is persisted, but with DynamicUser= that is only a symlink to /var/lib/private/uptime-kuma): add `rasa.directories = [ { directory = "/var/lib/private"; mode = "0700"; } ];` (the whole of /var/lib/private, as systemd makes it: 0700, so that no other user reaches the dynamic users' files; impermanence would create it 0755 for /var/lib/private/<name> alone), or list "/var/lib/private/uptime-kuma" in rasa.ephemeral to lose it on purpose.''
        ];
        manifest = [
          { unit = "backup.timer"; paths = [ "/var/lib/systemd/timers" ]; }
          { unit = "foo.service"; paths = [ "/var/lib/bar" "/var/lib/foo" "/var/log/foo" ]; }
          { unit = "gone.service"; paths = [ "/var/lib/gone" ]; }
          { unit = "kept.service"; paths = [ "/var/lib/kept" ]; }
          { unit = "kuma.service"; paths = [ "/var/lib/private/uptime-kuma" ]; }
          { unit = "ownfs.service"; paths = [ "/var/lib/ownfs" ]; }
          { unit = "tailscaled.service"; paths = [ "/var/lib/tailscale" ]; }
        ];
      }
  )

  (
    let
      config = eval [ encrypted { rasa.watch.enable = true; rasa.shutdownReport.enable = true; } ];
      plain = eval [ encrypted ];
      watch = config.systemd.services.rasa-watch;
      report = config.systemd.services.rasa-shutdown-report;
      layout = [ "--device" "/dev/mapper/cryptroot" "--root" "root" "--blank" "root-blank" "--old-roots" "old_roots" "--persist" "persist" ];
      keptWatchRecord = eval [ encrypted { rasa.watch.enable = true; rasa.directories = [ "/var/lib/rasa" ]; } ];
    in
    expect "rasa.watch.enable: the unit of docs/watch.md, early in stage 2; rasa.shutdownReport.enable: rasa diff when stopped, before the file systems and the watcher go; neither by default"
      {
        watch = {
          inherit (watch) wantedBy before after conflicts;
          inherit (watch.unitConfig) DefaultDependencies;
          inherit (watch.serviceConfig) Type Nice CapabilityBoundingSet;
          argv = systemdArgv watch.serviceConfig.ExecStart;
        };
        report = {
          inherit (report) wantedBy after;
          inherit (report.serviceConfig) Type RemainAfterExit TimeoutStopSec;
          hasStart = report.serviceConfig ? ExecStart || report.script != "";
          argv = systemdArgv report.serviceConfig.ExecStop;
        };
        byDefault = map (n: plain.systemd.services ? ${n}) [ "rasa-watch" "rasa-shutdown-report" ];
        keptRecord = lib.filter (lib.hasInfix "rasa.watch.enable records") keptWatchRecord.warnings;
      }
      {
        watch = {
          wantedBy = [ "sysinit.target" ];
          before = [ "sysinit.target" "systemd-tmpfiles-setup.service" "shutdown.target" ];
          after = [ "local-fs.target" ];
          conflicts = [ "shutdown.target" ];
          DefaultDependencies = false;
          Type = "notify";
          Nice = 10;
          CapabilityBoundingSet = [ "CAP_SYS_ADMIN" "CAP_DAC_READ_SEARCH" "CAP_DAC_OVERRIDE" ];
          argv = [ exe "watch" ];
        };
        report = {
          wantedBy = [ "multi-user.target" ];
          after = [ "local-fs.target" "rasa-watch.service" ];
          Type = "oneshot";
          RemainAfterExit = true;
          TimeoutStopSec = 60;
          hasStart = false;
          argv = [ exe "diff" ] ++ layout;
        };
        byDefault = [ false false ];
        keptRecord = [
          "rasa: rasa.watch.enable records in /var/lib/rasa/watch, inside the root, so that the record moves with the root it describes and `rasa diff --old-root` finds it; but /var/lib/rasa (in /persist) is persisted, so it lands in storage and stays there: persist narrower paths, so that /var/lib/rasa/watch is on the root."
        ];
      }
  )

  (
    let
      config = eval [ encrypted { rasa.prometheus.enable = true; } ];
      custom = eval [ encrypted { rasa.prometheus = { enable = true; file = "/var/lib/node-exporter/text/rasa.prom"; interval = "hourly"; }; } ];
      plain = eval [ encrypted ];
      service = config.systemd.services.rasa-prometheus;
      timer = config.systemd.timers.rasa-prometheus;
      layout = [ "--device" "/dev/mapper/cryptroot" "--root" "root" "--blank" "root-blank" "--old-roots" "old_roots" "--persist" "persist" ];
    in
    expect "rasa.prometheus.enable: rasa diff --prometheus on a timer, the layout flags of the other units, the directory made; not by default"
      {
        service = {
          inherit (service.serviceConfig) Type;
          argv = systemdArgv service.serviceConfig.ExecStart;
        };
        timer = {
          inherit (timer) wantedBy;
          inherit (timer.timerConfig) OnCalendar OnBootSec;
        };
        tmpfiles = config.systemd.tmpfiles.rules;
        custom = {
          argv = lib.drop 10 (systemdArgv custom.systemd.services.rasa-prometheus.serviceConfig.ExecStart);
          inherit (custom.systemd.timers.rasa-prometheus.timerConfig) OnCalendar;
          tmpfiles = custom.systemd.tmpfiles.rules;
        };
        # The rollback unit is the same with and without it (tests/vm/rollback.service).
        rollbackUnchanged = (unitOf config).argv == (unitOf plain).argv;
        byDefault = [ (plain.systemd.services ? rasa-prometheus) (plain.systemd.timers ? rasa-prometheus) ];
      }
      {
        service = {
          Type = "oneshot";
          argv = [ exe "diff" ] ++ layout ++ [ "--prometheus" "/run/rasa-metrics/rasa.prom" ];
        };
        timer = {
          wantedBy = [ "timers.target" ];
          OnCalendar = "*:0/15";
          OnBootSec = "3min";
        };
        tmpfiles = [ "d /run/rasa-metrics - - - -" ];
        custom = {
          argv = [ "--persist" "persist" "--prometheus" "/var/lib/node-exporter/text/rasa.prom" ];
          OnCalendar = "hourly";
          tmpfiles = [ "d /var/lib/node-exporter/text - - - -" ];
        };
        rollbackUnchanged = true;
        byDefault = [ false false ];
      }
  )

  (
    let
      shadowWarnings = config: lib.filter (lib.hasInfix "/etc/shadow") config.warnings;
    in
    expect "warning: mutable users on a wiped root, and not with declarative users"
      (map (modules: lib.length (shadowWarnings (eval modules))) [
        [ encrypted ]
        [ encrypted { users.mutableUsers = false; } ]
        [ encrypted { rasa.files = [ "/etc/shadow" ]; } ]
      ])
      [ 1 0 0 ]
  )

  (
    if unitFile == null then {
      name = "rollback unit matches tests/vm/rollback.service";
      status = "skip";
      detail = "tests/vm/rollback.service does not exist (yet): the VM harness commits it";
    } else
      let
        module = unitOf (eval [ encrypted ]);
      in
      expect "rollback unit matches tests/vm/rollback.service" (parseUnitFile unitFile) {
        inherit (module) requires after before wantedBy;
        defaultDependencies = [ module.DefaultDependencies ];
        conditionKernelCommandLine = [ module.ConditionKernelCommandLine ];
        execArgs = lib.drop 1 module.argv;
      }
  )
]
++ lib.concatMap corpusCases (import ./corpus.nix { inherit lib rasa; })
