# The manifest (schema: src/manifest.rs, docs/manifest.md), rendered from the final
# environment.persistence: rasa's own options, presets, and anything configured there directly,
# system-wide and per user (and Home Manager's home.persistence, which impermanence also honours).
{ lib, config, pkgs, utils, checker, extraFiles }:
let
  rlib = import ./lib.nix { inherit lib; };
  cfg = config.rasa;
  sv = cfg.subvolumes;

  locations =
    let
      system = lib.filter (p: p.enable) (lib.attrValues (config.environment.persistence or { }));
      users = lib.concatMap (p: lib.attrValues p.users) system;
      homeManager = lib.filter (p: p.enable) (lib.concatMap
        (user: lib.attrValues (user.home.persistence or { }))
        (lib.attrValues (config.home-manager.users or { })));
    in
    system ++ users ++ homeManager;

  groupOf = user: group: if group != null then group else config.users.users.${user}.group;
  inherit (rlib) octalMode;

  directoryEntry = d: {
    storageRoot = d.persistentStoragePath;
    path = d.dirPath;
    kind = "directory";
    inherit (d) user;
    group = groupOf d.user d.group;
    mode = octalMode d.mode;
    # impermanence mounts these directories in the initrd (nixos.nix: the dirPaths in
    # utils.pathsNeededForBoot), before the activation script that would create their copy.
    neededForBoot = lib.elem d.dirPath utils.pathsNeededForBoot;
  };
  fileEntry = f: {
    storageRoot = f.persistentStoragePath;
    path = f.filePath;
    kind = "file";
    inherit (f.parentDirectory) user;
    group = groupOf f.parentDirectory.user f.parentDirectory.group;
    mode = octalMode f.parentDirectory.mode;
    neededForBoot = false;
  };
  extraEntry = path: {
    storageRoot = cfg.storageRoot;
    inherit path;
    kind = "file";
    user = "root";
    group = "root";
    mode = "0755";
    neededForBoot = false;
  };

  entries = lib.sort (a: b: if a.storageRoot == b.storageRoot then a.path < b.path else a.storageRoot < b.storageRoot) (
    map directoryEntry (lib.concatMap (l: l.directories) locations)
    ++ map fileEntry (lib.concatMap (l: l.files) locations)
    ++ map extraEntry extraFiles
  );

  value = {
    version = 1;
    rollback = {
      inherit (cfg) device;
      inherit (sv) root blank oldRoots persist;
      inherit (cfg.retention) keep keepDays;
    };
    inherit entries;
    inherit (cfg) diffIgnore;
    # The units that keep state, and where (state-check.nix): `rasa diff` names a path's unit.
    services = cfg.stateServices;
  };

  # One derivation, the checked one: a wrong manifest fails nixos-rebuild here, not the next boot
  # or a migration.
  file = pkgs.writeTextFile {
    name = "rasa-manifest.json";
    text = builtins.toJSON value + "\n";
    checkPhase = ''
      ${lib.getExe' checker "rasa"} check manifest "$target"
    '';
  };
in
{
  inherit file entries value;

  assertions = map
    (e: {
      assertion = e.mode != null;
      message = ''rasa: ${e.path} (in ${e.storageRoot}) has a mode that cannot be written as an octal mode for rasa's manifest; give its mode in octal, for example mode = "0700";'';
    })
    entries;
}
