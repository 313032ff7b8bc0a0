# Presets: the state that hand-written "erase your darlings" setups persist again and again, one
# boolean each. A preset for a service is on when that service is enabled, so turning a service on
# keeps its state without a second line; `essential` and `sudoLecture` are on by default.
#
# A preset adds only what the configuration does not keep already. Existing impermanence users
# import rasa next to their own environment.persistence (impermanence's README example persists
# /var/log, /var/lib/nixos, /etc/machine-id, ...), and impermanence refuses a path listed twice. So
# each preset path is left out when the configuration keeps it, a parent of it or something inside
# it: in environment.persistence under any storage root (read from every definition but this
# file's, merged by impermanence's own type), as a file system of its own, as an /etc entry, or as
# a systemd-tmpfiles link.
#
# How each program writes its state decides how it is kept (docs/nixos.md, "Presets"): a program
# that replaces a file by writing a temporary one and renaming it over the path (GLib's
# g_file_set_contents, NetworkManager, bluez, update-users-groups.pl) replaces a symlink with a
# plain file on the wiped root and fails with EBUSY on a bind-mounted file, so such state is kept
# as its whole directory.
{ config, options, lib, ... }:
let
  inherit (lib) mkOption types mkIf;
  rlib = import ./lib.nix { inherit lib; };
  cfg = config.rasa;
  on = cfg.presets;
  hasImpermanence = options ? environment.persistence;

  preset = { default, defaultText, what }: mkOption {
    type = types.bool;
    inherit default;
    defaultText = lib.literalExpression defaultText;
    example = !default;
    description = "Whether to keep ${what}.";
  };

  # What each preset keeps, in impermanence's syntax, with the switch that turns it on by default
  # and the units whose state it is (the state check and the manifest name them). `enabled` reads
  # the service's own option with `or false`, so that a configuration without that module (the
  # lanzaboote flake, say) still evaluates. How each program writes, and why the method chosen
  # survives it, is in docs/nixos.md ("Presets").
  table = import ./preset-table.nix { inherit config lib; };
  wanted = lib.mapAttrs (_: p: { inherit (p) directories files; }) table;
  pathOf = e: if builtins.isString e then e else e.directory or e.file;

  # environment.persistence as the rest of the configuration defines it.
  persistence = options.environment.persistence;
  definedIn = files: lib.filter (d: lib.elem d.file files) persistence.definitionsWithLocations;
  definedOutside = files: lib.filter (d: !(lib.elem d.file files)) persistence.definitionsWithLocations;
  pathsOf = defs:
    if defs == [ ] then [ ]
    else rlib.persistedPaths (lib.mergeDefinitions persistence.loc persistence.type defs).mergedValue;
  thisFile = toString ./presets.nix;
  wiringFile = toString ./wiring.nix;
  persisted = lib.optionals hasImpermanence (pathsOf (definedOutside [ thisFile ]));

  # Everything the configuration keeps by itself, as { path; how; }.
  kept =
    map (p: { inherit (p) path; how = ''environment.persistence."${p.storageRoot}"''; }) persisted
    ++ map (fs: { path = fs.mountPoint; how = ''fileSystems."${fs.mountPoint}"''; })
      (lib.filter (fs: fs.mountPoint != "/") (lib.attrValues config.fileSystems))
    ++ map (name: { path = "/etc/${name}"; how = ''environment.etc."${name}"''; })
      (lib.filter (name: name != "rasa/manifest.json") (lib.attrNames config.environment.etc))
    ++ lib.concatMap
      (rule:
        let fields = lib.filter (f: f != "") (lib.splitString " " (lib.replaceStrings [ "\t" ] [ " " ] rule)); in
        lib.optional (lib.length fields >= 2 && builtins.match "L[-+!=~^?]*" (lib.head fields) != null)
          { path = lib.elemAt fields 1; how = "a systemd.tmpfiles.rules link"; })
      config.systemd.tmpfiles.rules;

  # Kept already: the configuration keeps the path or a parent of it (for /etc entries only the
  # path itself or a parent: a file dropped into a kept directory keeps nothing).
  keptWhole = path: lib.any (k: rlib.covers k.path path) kept;
  # Kept in part: the configuration keeps something inside the path, which a preset keeping the
  # whole path would shadow with a second copy.
  keptInside = path: lib.filter (k: k.path != path && rlib.covers path k.path && !(lib.hasPrefix "environment.etc" k.how)) kept;

  # A preset's entries without the ones the configuration keeps, and what it left to the
  # configuration because the configuration keeps parts of it.
  added = name: lib.mapAttrs (_: lib.filter (e: !(keptWhole (pathOf e)) && keptInside (pathOf e) == [ ])) wanted.${name};
  yielded = name: lib.concatMap
    (e: let inside = keptInside (pathOf e); in lib.optional (!(keptWhole (pathOf e)) && inside != [ ]) { path = pathOf e; inherit inside; })
    (wanted.${name}.directories ++ wanted.${name}.files);
  enabledPresets = lib.filter (name: on.${name}) (lib.attrNames wanted);

  # ssh: host keys are kept by pointing services.openssh.hostKeys into the storage root (sshd-keygen
  # writes them there; nothing is mounted). Left alone when the configuration keeps them itself.
  defaultKeys = [
    { type = "ed25519"; path = "${cfg.storageRoot}/etc/ssh/ssh_host_ed25519_key"; }
    { type = "rsa"; bits = 4096; path = "${cfg.storageRoot}/etc/ssh/ssh_host_rsa_key"; }
  ];
  liveKeyPaths = lib.concatMap (name: [ "/etc/ssh/${name}" "/etc/ssh/${name}.pub" ]) [ "ssh_host_ed25519_key" "ssh_host_rsa_key" ];
  sshKeptByConfiguration = lib.any (p: keptWhole p || keptInside p != [ ]) liveKeyPaths;

  # The storage roots the configuration itself uses, outside rasa.
  ownRoots = lib.unique (map (p: p.storageRoot) (lib.optionals hasImpermanence (pathsOf (definedOutside [ thisFile wiringFile ]))));
  storeRoots = lib.filter (r: lib.any (top: r == top || lib.hasPrefix "${top}/" r) [ "/nix" "/boot" ]) ownRoots;
  # Paths persisted through rasa's own options and also directly.
  throughRasa = lib.optionals hasImpermanence (pathsOf (definedIn [ wiringFile ]));
  direct = definedOutside [ thisFile wiringFile ];
  directPaths = lib.optionals hasImpermanence (pathsOf direct);
  twice = lib.filter (p: lib.any (q: rlib.covers p.path q.path || rlib.covers q.path p.path) directPaths) throughRasa;
in
{
  options.rasa = {
    presets = lib.mapAttrs (_: p: preset { default = p.enabled; defaultText = p.enabledText; inherit (p) what; }) table // {
      ssh = preset {
        default = config.services.openssh.enable;
        defaultText = "config.services.openssh.enable";
        what = ''
          the ssh host keys: `services.openssh.hostKeys` points into the storage root, so sshd
          creates and reads them there and clients never see a new host key'';
      };
    };

    manifestExtraFiles = mkOption {
      type = types.listOf types.str;
      default = [ ];
      internal = true;
      description = ''
        Live paths kept in the storage root outside environment.persistence (the ssh host keys),
        listed in the manifest so that `rasa migrate` copies them.
      '';
    };
  };

  config = mkIf cfg.enable (lib.mkMerge [
    (lib.optionalAttrs hasImpermanence {
      environment.persistence.${cfg.storageRoot} = {
        directories = lib.concatMap (name: (added name).directories) enabledPresets;
        files = lib.concatMap (name: (added name).files) enabledPresets;
      };
    })
    {
      services.openssh.hostKeys = mkIf (on.ssh && !sshKeptByConfiguration) (lib.mkDefault defaultKeys);

      # The host keys sshd keeps in the storage root, whoever pointed it there.
      rasa.manifestExtraFiles = lib.concatMap
        (key:
          let live = lib.removePrefix cfg.storageRoot key.path; in
          lib.optionals (lib.hasPrefix "${cfg.storageRoot}/" key.path) [ live "${live}.pub" ])
        (lib.optionals (on.ssh && !sshKeptByConfiguration) config.services.openssh.hostKeys);

      warnings = lib.concatMap
        (name: map
          (y: "rasa: rasa.presets.${name} keeps ${y.path} whole, but the configuration keeps ${lib.concatMapStringsSep ", " (k: "${k.path} (${k.how})") y.inside} inside it, so the preset leaves ${y.path} to the configuration. Programs that rename new files over old ones lose state kept as single files; to keep all of ${y.path}, remove those and add \"${y.path}\" to environment.persistence.\"${cfg.storageRoot}\".directories.")
          (yielded name))
        enabledPresets;

      assertions = [
        {
          assertion = ownRoots == [ ] || lib.elem cfg.storageRoot ownRoots || storeRoots != [ ];
          message = ''rasa: the configuration keeps its state in environment.persistence.${lib.concatMapStringsSep " and " (r: ''"${r}"'') ownRoots}, but rasa.storageRoot is "${cfg.storageRoot}", where rasa's presets and options would keep theirs: set rasa.storageRoot = "${lib.head (ownRoots ++ [ "" ])}";'';
        }
        {
          assertion = storeRoots == [ ];
          message = ''rasa: the configuration keeps its state in environment.persistence.${lib.concatMapStringsSep " and " (r: ''"${r}"'') storeRoots}, inside /nix or /boot, which survive every boot by themselves and which rasa never treats as kept state (rasa check manifest refuses such a storage root): move that state to the persistent subvolume's own mount point and rename the attribute to environment.persistence."${cfg.storageRoot}".'';
        }
        {
          assertion = twice == [ ];
          message = ''rasa: ${lib.concatMapStringsSep ", " (p: p.path) twice} ${if lib.length twice == 1 then "is" else "are"} persisted both through rasa's options (rasa.directories, rasa.files or rasa.users) and directly in environment.persistence (in ${lib.concatStringsSep ", " (lib.unique (map (d: d.file) direct))}): delete ${if lib.length twice == 1 then "it" else "them"} from one of the two.'';
        }
      ];
    }
  ]);
}
