# The build-time state check: every enabled service whose state the next boot erases, named with
# its path and the line that keeps it (issue 13, docs/nixos.md "The state check").
#
# Where state is found:
#   - StateDirectory= of every enabled systemd.services.<name> (a string of space-separated
#     names or a list; `name:link` keeps the part before the colon), under /var/lib, or under
#     /var/lib/private with DynamicUser= (where /var/lib/<name> is only a symlink);
#   - LogsDirectory= the same way, under /var/log (/var/log/private): logs are what one reads
#     after something went wrong, which is after a boot;
#   - not CacheDirectory= (rebuilt by design) nor RuntimeDirectory= (gone at every boot anyway);
#   - the presets' table (preset-table.nix): well-known services whose state lives where their
#     NixOS definition does not say (tailscaled's StateDirectory= is in the upstream unit);
#   - /var/lib/systemd/timers, for every enabled timer with Persistent=.
# A path is fine when environment.persistence keeps it or a parent (under any storage root), a
# file system of its own holds it, or rasa.ephemeral lists it or a parent.
#
# Only names, `enable` and serviceConfig fields are read, and only into warnings, assertions and
# the manifest text: nothing here defines systemd.services or environment.persistence, so reading
# them cannot loop.
{ config, lib, ... }:
let
  rlib = import ./lib.nix { inherit lib; };
  cfg = config.rasa;
  table = import ./preset-table.nix { inherit config lib; };

  truthy = v: v == true || lib.elem v [ "yes" "true" "on" "1" ];
  words = v:
    lib.concatMap (s: lib.filter (w: w != "") (lib.splitString " " (toString s)))
      (if v == null then [ ] else lib.toList v);
  # A template's directories have specifiers (%i) that only an instance resolves.
  concrete = d: !(lib.hasInfix "%" d) && d != "";

  services = lib.filterAttrs (name: s: s.enable && !(lib.hasSuffix "@" name)) config.systemd.services;
  fromUnits = lib.concatLists (lib.mapAttrsToList
    (name: s:
      let
        sc = s.serviceConfig;
        dynamic = truthy (sc.DynamicUser or false);
        under = base: field: map
          (d: {
            unit = "${name}.service";
            path = "${base}${lib.optionalString dynamic "/private"}/${d}";
            plain = "${base}/${d}";
            inherit dynamic;
            source = "${field}=${d}${lib.optionalString dynamic " with DynamicUser="}";
          })
          (lib.filter concrete (map (w: lib.head (lib.splitString ":" w)) (words (sc.${field} or null))));
      in
      under "/var/lib" "StateDirectory" ++ under "/var/log" "LogsDirectory")
    services);

  fromPresets = lib.concatLists (lib.mapAttrsToList
    (preset: p: lib.optionals p.enabled (map
      (e: {
        unit = if p.units == [ ] then "rasa.presets.${preset}" else lib.head p.units;
        units = p.units;
        path = if builtins.isString e then e else e.directory or e.file;
        plain = null;
        dynamic = false;
        source = if p.enabledText == "true" then "needed by every NixOS machine" else "on with ${lib.removePrefix "config." p.enabledText}";
        inherit preset;
      })
      (p.directories ++ p.files)))
    table);

  persistentTimers = lib.attrNames (lib.filterAttrs
    (_: t: (t.enable or true) && truthy (t.timerConfig.Persistent or false))
    config.systemd.timers);
  fromTimers = map
    (name: { unit = "${name}.timer"; path = "/var/lib/systemd/timers"; plain = null; dynamic = false; source = "Persistent=true"; })
    persistentTimers;

  found = fromUnits ++ fromPresets ++ fromTimers;

  persisted = rlib.persistedPaths (config.environment.persistence or { });
  ownFileSystems = lib.filter (m: m != "/") (map (fs: fs.mountPoint) (lib.attrValues config.fileSystems));
  keptBy = path:
    lib.any (p: rlib.covers p.path path) persisted
    || lib.any (m: rlib.covers m path) ownFileSystems
    || lib.any (e: rlib.covers e path) cfg.ephemeral;

  # The preset that keeps a path, whether it is on or not.
  presetFor = path: lib.findFirst
    (name: lib.any (e: rlib.covers (if builtins.isString e then e else e.directory or e.file) path)
      (table.${name}.directories ++ table.${name}.files))
    null
    (lib.attrNames table);

  # A path of a preset that is on but not kept: the preset left it to the configuration, which
  # keeps parts of it, and presets.nix warns about that with its own fix.
  yieldedByPreset = path: let p = presetFor path; in p != null && cfg.presets.${p};
  lost = lib.filter (f: !(keptBy f.path) && !(yieldedByPreset f.path)) found;
  # One message per path; the units that write it, together.
  byPath = lib.groupBy (f: f.path) lost;
  message = path: fs:
    let
      f = lib.head fs;
      preset = presetFor path;
      wrongPlace = f.dynamic && lib.any (p: rlib.covers p.path f.plain) persisted;
      line =
        if preset != null then "rasa.presets.${preset} = true;"
        else if f.dynamic then ''rasa.directories = [ { directory = "/var/lib/private"; mode = "0700"; } ];''
        else ''rasa.directories = [ "${path}" ];'';
      why = lib.optionalString (preset == null && f.dynamic)
        " (the whole of /var/lib/private, as systemd makes it: 0700, so that no other user reaches the dynamic users' files; impermanence would create it 0755 for /var/lib/private/<name> alone)";
    in
    "rasa: ${lib.concatMapStringsSep ", " (x: "${x.unit} (${x.source})") fs} keeps state in ${path}, which the next boot erases"
    + lib.optionalString wrongPlace " (${f.plain} is persisted, but with DynamicUser= that is only a symlink to ${path})"
    + ": add `${line}`${why}, or list \"${path}\" in rasa.ephemeral to lose it on purpose.";
  messages = lib.mapAttrsToList message byPath;
in
{
  options.rasa = {
    stateCheck = lib.mkOption {
      type = lib.types.enum [ "warn" "error" "off" ];
      default = "warn";
      example = "error";
      description = ''
        What to do when an enabled service keeps state where the next boot erases it (its
        `StateDirectory=` or `LogsDirectory=`, under `/var/lib/private` with `DynamicUser=`; the
        state of the services the presets know; the stamps of `Persistent=` timers) and that
        path is neither persisted (under any storage root), nor on a file system of its own, nor
        listed in {option}`rasa.ephemeral`: `"warn"` names the service, the path and the line
        that keeps it; `"error"` fails the build with the same message; `"off"` says nothing.
      '';
    };
    ephemeral = lib.mkOption {
      type = lib.types.listOf (lib.types.strMatching "/.*");
      default = [ ];
      example = [ "/var/lib/private/uptime-kuma" "/var/log/nginx" ];
      description = ''
        Paths whose state is lost at every boot on purpose: the state check says nothing about
        them or anything below them. The manifest still names the services that write there.
      '';
    };
    stateServices = lib.mkOption {
      type = lib.types.listOf lib.types.anything;
      internal = true;
      readOnly = true;
      description = "What the state check found: { unit; paths; } per unit, for the manifest.";
    };
  };

  config = lib.mkMerge [
    {
      # Every unit with the paths it keeps state in, kept or not: `rasa diff` names the unit of
      # a path from it. A preset's paths go to each of its units.
      rasa.stateServices = lib.mapAttrsToList
        (unit: fs: { inherit unit; paths = lib.sort (a: b: a < b) (lib.unique (map (f: f.path) fs)); })
        (lib.groupBy (f: f.unit) (lib.concatMap (f: map (unit: f // { inherit unit; }) (f.units or [ f.unit ]))
          (lib.filter (f: !(lib.hasPrefix "rasa.presets." f.unit)) found)));
    }
    (lib.mkIf (cfg.enable && cfg.stateCheck == "warn") { warnings = messages; })
    (lib.mkIf (cfg.enable && cfg.stateCheck == "error") {
      assertions = map (m: { assertion = false; message = m; }) messages;
    })
  ];
}
