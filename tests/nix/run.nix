# The module evaluation tests, here: the real nixpkgs lib and impermanence over the nixos-eval
# stubs (../shared/tools/nixos-eval). Run by `cargo xtask nix-checks`, or by hand:
#   nix-instantiate --eval --strict --json tests/nix/run.nix \
#     --arg nixpkgsLib /path/to/nixpkgs.lib/lib --arg impermanence /path/to/impermanence \
#     --arg nixosEval ../shared/tools/nixos-eval
{ nixpkgsLib, impermanence, nixosEval }:
let
  # The stub's writeTextFile drops checkPhase, and it has no pkgsBuildHost: keep both visible, with
  # the build platform's rasa told apart from the one the configuration runs.
  extraPkgs = {
    writeTextFile = args: {
      type = "derivation";
      inherit (args) name text;
      checkPhase = args.checkPhase or "";
      outPath = "/nix/store/stub-${args.name}";
    };
    pkgsBuildHost = {
      callPackage = _: _: {
        type = "derivation";
        name = "rasa-build-host";
        outPath = "/nix/store/stub-rasa-build-host";
        meta.mainProgram = "rasa";
      };
    };
  };
  tool = import nixosEval { inherit nixpkgsLib impermanence extraPkgs; };
  bare = import nixosEval { inherit nixpkgsLib extraPkgs; };
  unitPath = ../vm/rollback.service;
  cases = import ./cases.nix {
    inherit (tool) lib;
    rasa = tool.pkgs.rasa;
    checker = extraPkgs.pkgsBuildHost.callPackage null { };
    eval = modules: (tool.eval ([ ../../modules/rasa.nix ./services.nix ] ++ modules)).config;
    evalWithoutImpermanence = modules: (bare.eval ([ ../../modules/rasa.nix ] ++ modules)).config;
    unitFile = if builtins.pathExists unitPath then builtins.readFile unitPath else null;
  };
  # The flake's outputs with stub inputs: what `nix flake check` of older Nix (2.8) insists on for
  # the values it can see without building (Nix cannot fetch nixpkgs here).
  flake =
    let
      outputs = (import ../../flake.nix).outputs {
        self = outputs // { outPath = toString ../..; inputs = { inherit nixpkgs impermanenceInput; }; };
        inherit nixpkgs;
        impermanence = impermanenceInput;
      };
      nixpkgs = { inherit (tool) lib; legacyPackages = tool.lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (_: tool.pkgs); };
      impermanenceInput.nixosModules.impermanence = import (impermanence + "/nixos.nix");
    in
    outputs;
  isModule = m: builtins.isFunction m || (builtins.isAttrs m && !(m ? outPath));
  flakeCases = [
    {
      name = "flake: every nixosModules value is a module (a function or an attribute set, not a path)";
      status = if builtins.all isModule (builtins.attrValues flake.nixosModules) then "pass" else "fail";
      detail = builtins.toJSON (builtins.mapAttrs (_: m: builtins.typeOf m) flake.nixosModules);
    }
    (
      let
        config = (bare.eval [
          flake.nixosModules.default
          {
            boot.initrd.systemd.enable = true;
            fileSystems."/" = { device = "/dev/vda2"; fsType = "btrfs"; options = [ "subvol=root" ]; };
            fileSystems."/persist" = { device = "/dev/vda2"; fsType = "btrfs"; options = [ "subvol=persist" ]; neededForBoot = true; };
            rasa = { enable = true; package = tool.pkgs.rasa; };
          }
        ]).config;
        failed = bare.failedAssertions config;
      in
      {
        name = "flake: nixosModules.default (impermanence bundled) evaluates a configuration with no failed assertion";
        status = if failed == [ ] then "pass" else "fail";
        detail = builtins.toJSON failed;
      }
    )
    (
      let names = builtins.attrNames flake.checks.x86_64-linux; want = [ "clippy" "deadnix" "formatter" "rustfmt" ]; in
      {
        name = "flake: nix flake check runs what CI runs (clippy, rustfmt, deadnix, the formatter)";
        status = if builtins.all (n: builtins.elem n names) want then "pass" else "fail";
        detail = "checks: ${builtins.toJSON names}";
      }
    )
  ];
  # The VM tests' scripts, as the test driver runs them: every `mount` onto a directory the booted
  # root has. After a wiping boot the root is the empty blank, so a mount point must be made by the
  # same command (mkdir -p, mount --mkdir) or lie under /run or /tmp.
  vmScripts =
    let
      nodes.machine.system.build.toplevel = "/nix/store/stub-toplevel";
      script = test: if builtins.isFunction test.testScript then test.testScript { inherit nodes; } else test.testScript;
    in
    {
      encrypted-btrfs-rollback = script (import ../../checks/encrypted-btrfs-rollback.nix { self = flake; });
      migrate = script (import ../../checks/migrate.nix { self = flake; migrate = "/nix/store/stub-migrate"; });
    };
  mountsWithoutMountPoint = text:
    let
      inherit (tool) lib;
      commands = lib.concatMap
        (line: let m = builtins.match ''.*machine[.](succeed|execute)[(]f?"(.*)"[)].*'' line; in lib.optional (m != null) (lib.elemAt m 1))
        (lib.splitString "\n" text);
      bad = cmd:
        let
          mount = builtins.match "(.*&& )?mount (.*)" cmd;
          target = lib.last (lib.splitString " " cmd);
        in
        mount != null
        && !(lib.hasPrefix "/run/" target || lib.hasPrefix "/tmp/" target)
        && !(lib.hasInfix "--mkdir" cmd || lib.hasInfix "mkdir -p ${target} && " cmd);
    in
    lib.filter bad commands;
  vmCases = tool.lib.mapAttrsToList
    (name: text:
      let bad = mountsWithoutMountPoint text; in
      {
        name = "VM test ${name}: no mount onto a directory the blank root lacks";
        status = if bad == [ ] then "pass" else "fail";
        detail = builtins.toJSON bad;
      })
    vmScripts;
  neededForBootCase =
    let
      flat = builtins.replaceStrings [ "\n" ] [ " " ] vmScripts.encrypted-btrfs-rollback;
      ordered = builtins.match ''.*create_needed_for_boot[(]"/dev/mapper/cryptroot".*bootctl set-default nixos-generation-1-specialisation-rasa[.]conf.*'' flat;
    in
    {
      name = "VM test encrypted-btrfs-rollback: makes the needed-for-boot sources before the first wiping boot";
      status = if ordered != null then "pass" else "fail";
      detail = "expected create_needed_for_boot(...) before the wiping specialisation is chosen";
    };
  rulesCases = import ./rules-cases.nix {
    inherit (tool) lib;
    rasa = tool.pkgs.rasa;
    eval = modules: (tool.eval ([ ../../modules/rasa.nix ./services.nix ] ++ modules)).config;
  };
  # One case that cannot evaluate is reported as failed instead of hiding the others.
  run = case:
    let tried = builtins.tryEval (builtins.deepSeq case case); in
    if tried.success then tried.value
    else { name = "(a case that does not evaluate)"; status = "fail"; detail = "evaluate tests/nix/run.nix by hand to see the error"; };
in
map run (cases ++ flakeCases ++ vmCases ++ [ neededForBootCase ] ++ rulesCases)
