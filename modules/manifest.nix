# The manifest (schema: src/manifest.rs, docs/manifest.md), rendered from the final
# environment.persistence: rasa's own options, presets, and anything configured there directly,
# system-wide and per user (and Home Manager's home.persistence, which impermanence also honours).
{ lib, config, pkgs, rasa, extraFiles }:
let
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

  # impermanence takes any mode `mkdir --mode` takes; the manifest wants octal. Absolute
  # symbolic modes ("u=rwx,g=rx,o=") convert; mkdir starts them from a=rwx.
  octalMode = mode:
    let
      octal = builtins.match "([0-7]?)([0-7]{3})" mode;
      clauses = map (builtins.match "([ugoa]+)=([rwx]*)") (lib.splitString "," mode);
      bits = perms: lib.foldl' (n: c: n + { r = 4; w = 2; x = 1; }.${c}) 0 (lib.stringToCharacters perms);
      apply = digits: clause:
        let
          who = lib.stringToCharacters (lib.head clause);
          set = class: lib.elem class who || lib.elem "a" who;
          value = bits (lib.elemAt clause 1);
        in
        {
          u = if set "u" then value else digits.u;
          g = if set "g" then value else digits.g;
          o = if set "o" then value else digits.o;
        };
      symbolic = lib.foldl' apply { u = 7; g = 7; o = 7; } clauses;
    in
    if octal != null then "${if lib.head octal == "" then "0" else lib.head octal}${lib.last octal}"
    else if lib.all (c: c != null) clauses then "0${toString symbolic.u}${toString symbolic.g}${toString symbolic.o}"
    else null;

  directoryEntry = d: {
    storageRoot = d.persistentStoragePath;
    path = d.dirPath;
    kind = "directory";
    inherit (d) user;
    group = groupOf d.user d.group;
    mode = octalMode d.mode;
  };
  fileEntry = f: {
    storageRoot = f.persistentStoragePath;
    path = f.filePath;
    kind = "file";
    inherit (f.parentDirectory) user;
    group = groupOf f.parentDirectory.user f.parentDirectory.group;
    mode = octalMode f.parentDirectory.mode;
  };
  extraEntry = path: {
    storageRoot = cfg.storageRoot;
    inherit path;
    kind = "file";
    user = "root";
    group = "root";
    mode = "0755";
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
  };

  text = builtins.toJSON value + "\n";
  file = pkgs.writeText "rasa-manifest.json" text;
in
{
  inherit file entries;

  # A wrong manifest fails nixos-rebuild here, not the next boot or a migration.
  checked = pkgs.runCommand "rasa-manifest-checked.json" { nativeBuildInputs = [ rasa ]; } ''
    rasa check manifest ${file}
    cp ${file} $out
  '';

  assertions = map
    (e: {
      assertion = e.mode != null;
      message = ''rasa: ${e.path} (in ${e.storageRoot}) has a mode that cannot be written as an octal mode for rasa's manifest; give its mode in octal, for example mode = "0700";'';
    })
    entries;
}
