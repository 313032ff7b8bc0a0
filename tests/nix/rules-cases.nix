# The one rule set, seen from the Nix side: every case of tests/rules-cases.json (the list the
# binary's `rules` module is tested against) turned into a NixOS configuration. A configuration
# the binary would refuse must already fail to evaluate (a failed assertion, or an option type
# that rejects a value), so `nixos-rebuild` and `nix flake check` stop with a message before
# anything is built; a configuration the binary accepts must evaluate with no failed assertion.
# `eval` is as in cases.nix (rasa and impermanence imported; returns `config`).
{ lib, eval, rasa }:
let
  cases = builtins.fromJSON (builtins.readFile ../rules-cases.json);

  configurationOf = case:
    let
      r = case.rollback;
      roots = lib.unique (map (e: e.storageRoot) case.entries);
      entriesIn = root: lib.filter (e: e.storageRoot == root) case.entries;
      directory = e: { directory = e.path; inherit (e) user group mode; };
      file = e: { file = e.path; parentDirectory = { inherit (e) user group mode; }; };
    in
    {
      boot.initrd.systemd.enable = true;
      fileSystems =
        {
          "/" = { device = r.device; fsType = "btrfs"; options = [ "subvol=${r.root}" ]; };
        }
        // lib.genAttrs (lib.filter (root: root != "/") (if roots == [ ] then [ "/persist" ] else roots)) (_: {
          device = r.device;
          fsType = "btrfs";
          options = [ "subvol=${r.persist}" ];
          neededForBoot = true;
        });
      rasa = {
        enable = true;
        package = rasa;
        presets = lib.mkForce { };
        device = r.device;
        storageRoot = if roots == [ ] then "/persist" else lib.head roots;
        subvolumes = { inherit (r) root blank oldRoots persist; };
        retention = { inherit (r) keep keepDays; };
      };
      environment.persistence = lib.genAttrs roots (root: {
        directories = map directory (lib.filter (e: e.kind == "directory") (entriesIn root));
        files = map file (lib.filter (e: e.kind == "file") (entriesIn root));
      });
    };

  # Refused: evaluating the assertions (and the manifest they describe) throws, or an assertion
  # (rasa's or impermanence's) fails.
  refusedBy = config:
    let
      tried = builtins.tryEval (
        let failed = lib.filter (a: !a.assertion) config.assertions; in
        builtins.deepSeq (map (a: a.message) failed) failed
      );
    in
    if !tried.success then [ "(an option type or the module threw)" ] else map (a: a.message) tried.value;

  # What the module renders for a case's paths: impermanence normalizes some ("srv/x" and
  # "/srv/x/" both become "/srv/x"), so such a case never reaches the binary in the form it
  # refuses. That must be visible in the manifest, or the case is the module's to refuse.
  renderedPaths = config: map (e: e.path) (lib.filter (e: !(lib.hasPrefix "/var/lib/nixos" e.path)) (builtins.fromJSON config.environment.etc."rasa/manifest.json".source.text).entries);

  check = case:
    let
      config = eval [ (configurationOf case) ];
      refusals = refusedBy config;
      refused = refusals != [ ];
      normalized = !refused && !case.ok
        && lib.sort (a: b: a < b) (map (e: e.path) case.entries) != lib.sort (a: b: a < b) (renderedPaths config);
      agree = refused == !case.ok || normalized;
    in
    {
      name = "rules in step: ${case.name} (the binary ${if case.ok then "accepts" else "refuses"} it${lib.optionalString normalized "; impermanence normalizes the path, so the module never renders the refused form"})";
      status = if agree then "pass" else "fail";
      detail =
        if agree then ""
        else if refused then "the module refuses what the binary accepts: ${builtins.toJSON refusals}"
        else "the module accepts what the binary refuses (${case.phrase or ""}): add the rule to modules/rules.nix";
    };
in
map check cases
