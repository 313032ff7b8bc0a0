# The rules rasa holds a manifest to (src/rules.rs), stated once more for evaluation time, so a
# configuration the binary would refuse stops `nixos-rebuild` and `nix flake check` with its
# message before anything is built. tests/rules-cases.json is the one list of cases both sides
# are tested against (src/rules.rs's unit test and tests/nix/rules-cases.nix), which keeps the
# two in step. The build-time `rasa check manifest` remains the final word.
#
# `problems` takes the manifest's value ({ rollback; entries; }) and returns one message per
# problem. Relations are found by looking each path's ancestors up in attribute sets, so the
# work grows with entries x depth, never with entries x entries.
{ lib }:
let
  temporarySuffix = ".rasa-new";
  pruningPrefix = ".pruning-";
  runtimeFilesystems = [ "/proc" "/sys" "/dev" "/run" ];
  surviveByThemselves = [ "/nix" "/boot" ];
  recordDir = "/.rasa";
  pathMax = 4095;

  isWithin = path: ancestor: ancestor == "/" || path == ancestor || lib.hasPrefix "${ancestor}/" path;
  withinAny = path: lib.findFirst (isWithin path) null;

  # "/a/b/c" -> [ "/a" "/a/b" ] (the proper ancestors, "/" left out).
  ancestors = path:
    let parts = lib.filter (p: p != "") (lib.splitString "/" path);
    in lib.genList (n: "/" + lib.concatStringsSep "/" (lib.take (n + 1) parts)) (lib.max 0 (lib.length parts - 1));

  pathProblem = path:
    let parts = lib.drop 1 (lib.splitString "/" path); in
    if !(lib.hasPrefix "/" path) then "is not absolute"
    else if lib.stringLength path > pathMax then "is longer than PATH_MAX (4095 bytes)"
    else if lib.stringLength path > 1 && lib.hasSuffix "/" path then "ends with '/' (write it without)"
    else if lib.hasInfix "//" path then "contains '//' (not normalized)"
    else if lib.elem ".." parts then "contains '..'"
    else if lib.elem "." parts then "contains '.' (not normalized)"
    else null;

  nameProblem = name:
    if lib.hasSuffix temporarySuffix name then "ends in ${temporarySuffix}, which rasa reserves for the temporaries it makes (and deletes) beside the root and the blank"
    else if lib.hasPrefix pruningPrefix name then "starts with ${pruningPrefix}, which rasa reserves for old roots it is deleting"
    else null;

  userProblem = name:
    if name == "" then "is empty"
    else if builtins.match "[0-9]+" name != null then "is a number; give users and groups by name"
    else null;

  problems = { rollback, entries, ... }:
    let
      named = [
        { option = "rasa.subvolumes.root"; value = rollback.root; }
        { option = "rasa.subvolumes.oldRoots"; value = rollback.oldRoots; }
        { option = "rasa.subvolumes.persist"; value = rollback.persist; }
      ] ++ lib.optional (rollback.blank != null) { option = "rasa.subvolumes.blank"; value = rollback.blank; };
      nameProblems = lib.concatMap
        (n: let why = nameProblem n.value; in lib.optional (why != null) "${n.option} = \"${n.value}\" ${why}: choose another name")
        named;
      deviceProblems = lib.optional (!(lib.hasPrefix "/" rollback.device))
        "rasa.device = \"${rollback.device}\" is not an absolute path: name the block device, for example \"/dev/mapper/cryptroot\"";

      roots = lib.unique (map (e: e.storageRoot) entries);
      rootProblems = lib.concatMap
        (root:
          let why = pathProblem root; fs = withinAny root runtimeFilesystems; in
          if why != null then [ "the storage root \"${root}\" ${why}" ]
          # A storage root of /, or inside /nix or /boot, has assertions of its own with the
          # exact fix (wiring.nix); said here too, for a configuration that skips them.
          else if root == "/" || withinAny root surviveByThemselves != null then [ "the storage root ${root} must be a dedicated mount point such as /persist, not /, /nix or /boot" ]
          else if fs != null then [ "the storage root ${root} is on ${fs}, which the kernel or systemd recreate at every boot" ]
          else [ ])
        roots;

      entryProblems = lib.concatMap
        (e:
          let
            why = pathProblem e.path;
            fs = withinAny e.path runtimeFilesystems;
            last = lib.last (lib.splitString "/" e.path);
            own =
              if why != null then [ "${e.path} (in ${e.storageRoot}) ${why}" ]
              else if e.path == "/" then [ "/ itself cannot be persisted; list what below it to keep" ]
              else if withinAny e.path surviveByThemselves != null then [ "${e.path} is under /nix or /boot, which survive every boot by themselves: remove it from ${e.storageRoot}" ]
              else if fs != null then [ "${e.path} is on ${fs}, a runtime filesystem the kernel or systemd recreate at every boot; it cannot be persisted: remove it from ${e.storageRoot}" ]
              else if isWithin e.path recordDir || lib.hasSuffix ".rasa-migrate" last || lib.hasInfix ".rasa-backup-" last then [ "${e.path} collides with a name rasa uses in the storage root (${recordDir}, *.rasa-migrate, *.rasa-backup-*)" ]
              else [ ];
            owners = lib.concatMap
              (field: let w = userProblem e.${field}; in lib.optional (w != null) "${e.path} (in ${e.storageRoot}): ${field} \"${e.${field}}\" ${w}")
              [ "user" "group" ];
          in
          own ++ owners)
        entries;

      # Relations, among paths that are well formed.
      wellFormed = lib.filter (e: pathProblem e.path == null) entries;
      goodRoots = lib.filter (r: pathProblem r == null) roots;
      rootSet = lib.genAttrs goodRoots (_: true);
      entryByPath = lib.listToAttrs (map (e: lib.nameValuePair e.path e) wellFormed);
      rootAtOrAbove = path: lib.findFirst (p: rootSet ? ${p}) null (ancestors path ++ [ path ]);
      entryAbove = path: lib.findFirst (p: entryByPath ? ${p}) null (lib.reverseList (ancestors path));
      relationProblems =
        lib.concatMap
          (root:
            let
              outer = lib.findFirst (p: rootSet ? ${p}) null (ancestors root);
              entry = lib.findFirst (p: entryByPath ? ${p}) null (ancestors root ++ [ root ]);
            in
            lib.optional (outer != null) "the storage root ${root} is inside the storage root ${outer}; storage roots must not contain each other"
            ++ lib.optional (entry != null) "the storage root ${root} is inside ${entry}, persisted in ${entryByPath.${entry}.storageRoot}, so its bind mount would cover the storage")
          goodRoots
        ++ lib.concatMap
          (e:
            let
              root = rootAtOrAbove e.path;
              outerPath = entryAbove e.path;
              outer = if outerPath == null then null else entryByPath.${outerPath};
            in
            lib.optional (root != null) "${e.path} (in ${e.storageRoot}) is inside the storage root ${root}; list the path as it appears on /"
            ++ lib.optional (outer != null && outer.kind == "file") "${e.path} is inside ${outer.path}, which is persisted as a file"
            ++ lib.optional (outer != null && outer.kind == "directory" && outer.storageRoot != e.storageRoot)
              "${e.path} is inside the directory ${outer.path} persisted in ${outer.storageRoot}, but stored in ${e.storageRoot}; keep nested paths in one storage root")
          wellFormed;
    in
    nameProblems ++ deviceProblems ++ rootProblems ++ entryProblems ++ relationProblems;
in
{
  inherit problems;
}
