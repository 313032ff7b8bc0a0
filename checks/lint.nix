# What CI runs besides the tests, as flake checks (lanzaboote does the same), so that
# `nix flake check` fails where CI would: clippy with warnings as errors, rustfmt, deadnix and the
# flake's formatter.
{ pkgs, self }:
let
  inherit (pkgs) lib;
  system = pkgs.stdenv.hostPlatform.system;
  rasa = self.packages.${system}.default;
  # The whole workspace (the package's source leaves out what its build does not need).
  workspace = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [ ../Cargo.toml ../Cargo.lock ../src ../tests ../docs ../xtask ../bench ];
  };
  nixFiles = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.fileFilter (file: file.hasExt "nix") ../.;
  };
  stamp = name: nativeBuildInputs: script: pkgs.runCommand "rasa-${name}" { inherit nativeBuildInputs; } ''
    ${script}
    touch $out
  '';
in
{
  # The package's vendored dependencies, with clippy run instead of the build.
  clippy = rasa.overrideAttrs (old: {
    pname = "rasa-clippy";
    src = workspace;
    nativeBuildInputs = old.nativeBuildInputs ++ [ pkgs.clippy ];
    buildPhase = ''
      runHook preBuild
      cargo clippy --offline --workspace --all-targets --features rasa/failpoints -- -D warnings
      runHook postBuild
    '';
    doCheck = false;
    installPhase = "touch $out";
    postInstall = "";
  });

  rustfmt = stamp "rustfmt" [ pkgs.rustfmt pkgs.findutils ] ''
    cd ${workspace}
    find . -name '*.rs' -exec rustfmt --check --edition 2021 {} +
  '';

  deadnix = stamp "deadnix" [ pkgs.deadnix ] ''
    deadnix --fail ${nixFiles}
  '';

  formatter = stamp "nix-format" [ self.formatter.${system} pkgs.findutils ] ''
    cd ${nixFiles}
    find . -name '*.nix' -exec nixpkgs-fmt --check {} +
  '';
}
