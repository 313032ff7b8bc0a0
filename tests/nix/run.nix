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
    eval = modules: (tool.eval ([ ../../modules/rasa.nix ] ++ modules)).config;
    evalWithoutImpermanence = modules: (bare.eval ([ ../../modules/rasa.nix ] ++ modules)).config;
    unitFile = if builtins.pathExists unitPath then builtins.readFile unitPath else null;
  };
  # One case that cannot evaluate is reported as failed instead of hiding the others.
  run = case:
    let tried = builtins.tryEval (builtins.deepSeq case case); in
    if tried.success then tried.value
    else { name = "(a case that does not evaluate)"; status = "fail"; detail = "evaluate tests/nix/run.nix by hand to see the error"; };
in
map run cases
