# `nix flake check`: the package (with its unit tests), the module evaluated by a full NixOS, the VM
# tests, which boot the encrypted btrfs machine (they need KVM), and the linters CI runs.
{ pkgs, self }:
let
  system = pkgs.stdenv.hostPlatform.system;
in
{
  package = self.packages.${system}.default;
  module-eval = import ./module-eval.nix { inherit pkgs self; };
  encrypted-btrfs-rollback = pkgs.testers.runNixOSTest (import ./encrypted-btrfs-rollback.nix { inherit self; });
  migrate = pkgs.testers.runNixOSTest (import ./migrate.nix {
    inherit self;
    migrate = self.apps.${system}.migrate.program;
  });
}
  // import ./lint.nix { inherit pkgs self; }
