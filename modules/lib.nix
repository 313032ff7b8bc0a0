# Helpers of rasa's module that depend on nothing but the nixpkgs lib, so tests can call them.
{ lib }:
rec {
  # A faithful copy of nixpkgs' utils.escapeSystemdExecArg (nixos/lib/utils.nix), kept here so the
  # module does not depend on the version of nixpkgs it is used with: systemd reads Exec* lines
  # with C escapes inside double quotes (a subset of which JSON produces), expands `$VAR` and
  # `${VAR}`, and expands `%` specifiers. JSON quoting plus `$`->`$$` and `%`->`%%` makes every
  # argument reach the program byte for byte.
  escapeSystemdExecArg = arg:
    let
      s =
        if builtins.isPath arg then "${arg}"
        else if builtins.isString arg then arg
        else if builtins.isInt arg || builtins.isFloat arg || lib.isDerivation arg then toString arg
        else throw "escapeSystemdExecArg only allows strings, paths, numbers and derivations";
    in
    lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON s);

  escapeSystemdExecArgs = lib.concatMapStringsSep " " escapeSystemdExecArg;

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

  # Whether `outer` is `inner` or one of its parent directories.
  covers = outer: inner: outer == inner || outer == "/" || lib.hasPrefix "${outer}/" inner;

  # The persisted paths of an evaluated environment.persistence value (system-wide and per user),
  # as { path; kind; storageRoot; } records.
  persistedPaths = persistence:
    let
      system = lib.filter (p: p.enable) (lib.attrValues persistence);
      locations = system ++ lib.concatMap (p: lib.attrValues p.users) system;
    in
    map (d: { path = d.dirPath; kind = "directory"; storageRoot = d.persistentStoragePath; }) (lib.concatMap (l: l.directories) locations)
    ++ map (f: { path = f.filePath; kind = "file"; storageRoot = f.persistentStoragePath; }) (lib.concatMap (l: l.files) locations);
}
