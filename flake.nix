{
  description = "rasa: a blank btrfs root on every boot, with the state you opted in kept under /persist";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    impermanence = {
      url = "github:nix-community/impermanence";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs = { self, nixpkgs, impermanence }:
    let
      inherit (nixpkgs) lib;
      forAllSystems = f: lib.genAttrs [ "x86_64-linux" "aarch64-linux" ]
        (system: f nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = final: _prev: {
        rasa = final.callPackage ./nix/package.nix { };
      };

      packages = forAllSystems (pkgs: {
        default = pkgs.callPackage ./nix/package.nix { };
      });

      apps = forAllSystems (pkgs:
        let
          rasa = lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        in
        {
          default = {
            type = "app";
            program = rasa;
            meta.description = "rasa, the command line";
          };
          # `nix run .#migrate` plans; `nix run .#migrate -- --apply` copies.
          migrate = {
            type = "app";
            program = toString (pkgs.writeShellScript "rasa-migrate" ''exec ${rasa} migrate "$@"'');
            meta.description = "Copy existing state into the storage root before the first wiping boot";
          };
        });

      # Without impermanence, for configurations that import it themselves: importing it twice
      # would declare environment.persistence twice. A module value, not a path: older Nix
      # (2.8's `nix flake check`: "module must be a function or an attribute set") rejects paths
      # here; tests/nix/run.nix checks every nixosModules value.
      nixosModules.rasa = import ./modules/rasa.nix;
      nixosModules.default = {
        imports = [ impermanence.nixosModules.impermanence self.nixosModules.rasa ];
      };

      checks = forAllSystems (pkgs: import ./checks { inherit pkgs self; });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.default ];
          packages = [ pkgs.nixpkgs-fmt pkgs.deadnix pkgs.btrfs-progs pkgs.cryptsetup ];
        };
      });
    };
}
