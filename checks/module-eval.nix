# tests/nix/cases.nix against a full NixOS evaluation of the module (here the stubs of
# ../shared/tools/nixos-eval are replaced by the real thing). Builds a report; fails on a failure.
{ pkgs, self }:
let
  inherit (pkgs) lib;
  rasa = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
  unitPath = ../tests/vm/rollback.service;
  evalWith = module: modules:
    (self.inputs.nixpkgs.lib.nixosSystem {
      modules = [
        module
        {
          nixpkgs.pkgs = pkgs;
          boot.loader.grub.enable = false;
          system.stateVersion = "26.05";
        }
      ] ++ modules;
    }).config;
  results = import ../tests/nix/cases.nix {
    inherit lib rasa;
    checker = pkgs.pkgsBuildHost.callPackage ../nix/package.nix { };
    eval = evalWith self.nixosModules.default;
    evalWithoutImpermanence = evalWith self.nixosModules.rasa;
    unitFile = if builtins.pathExists unitPath then builtins.readFile unitPath else null;
  };
  line = r: "${lib.toUpper r.status} ${r.name}${lib.optionalString (r.detail != "") "\n    ${r.detail}"}";
  failures = lib.filter (r: r.status == "fail") results;
in
pkgs.runCommand "rasa-module-eval" { report = lib.concatMapStringsSep "\n" line results; } ''
  echo "$report"
  ${if failures == [ ] then ''echo "$report" > $out'' else "exit 1"}
''
