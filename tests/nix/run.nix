# The module evaluation tests, here: the real nixpkgs lib and impermanence over the nixos-eval
# stubs (../shared/tools/nixos-eval). Run by `cargo xtask nix-checks`, or by hand:
#   nix-instantiate --eval --strict --json tests/nix/run.nix \
#     --arg nixpkgsLib /path/to/nixpkgs.lib/lib --arg impermanence /path/to/impermanence \
#     --arg nixosEval ../shared/tools/nixos-eval
{ nixpkgsLib, impermanence, nixosEval }:
let
  tool = import nixosEval { inherit nixpkgsLib impermanence; };
  bare = import nixosEval { inherit nixpkgsLib; };
  unitPath = ../vm/rollback.service;
  cases = import ./cases.nix {
    inherit (tool) lib;
    rasa = tool.pkgs.rasa;
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
