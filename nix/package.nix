# rasa, built from Cargo.lock (no vendor hash to keep in step).
{ lib
, stdenv
, rustPlatform
, installShellFiles
}:
let
  cargoToml = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = "rasa";
  inherit (cargoToml.package) version;

  # The whole workspace is needed to resolve it (xtask is a member), but only rasa is built.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../tests
      ../docs
      ../xtask
    ];
  };
  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [ "-p" "rasa" ];
  # The tests in tests/ need root and loop devices; in the build sandbox they print
  # "SKIPPED <test>: needs root ..." and pass, so the unit tests still run here.
  # --show-output puts those lines in the build log instead of swallowing them.
  cargoTestFlags = [ "-p" "rasa" ];
  checkFlags = [ "--show-output" ];

  nativeBuildInputs = [ installShellFiles ];

  postInstall = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    $out/bin/rasa man > rasa.1
    installManPage rasa.1
    installShellCompletion --cmd rasa \
      --bash <($out/bin/rasa completions bash) \
      --zsh <($out/bin/rasa completions zsh) \
      --fish <($out/bin/rasa completions fish)
  '';

  meta = {
    inherit (cargoToml.package) description;
    license = lib.licenses.mit;
    mainProgram = "rasa";
    platforms = lib.platforms.linux;
  };
}
