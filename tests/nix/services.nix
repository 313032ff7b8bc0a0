# Test-only: the NixOS service options the presets and the state check read that the nixos-eval
# stub (../shared/tools/nixos-eval/core.nix) lacks, each with the systemd unit nixpkgs defines for
# it, as nixpkgs defines it (checked against nixos/modules/... of nixpkgs): where the unit's
# state directory comes from the upstream unit file (systemd.packages), the NixOS definition has
# no StateDirectory= either, which is why the state check has a table of well-known services.
# Only run.nix imports this; checks/module-eval.nix evaluates the real modules.
{ config, lib, ... }:
let
  inherit (lib) mkOption mkEnableOption types mkIf mkMerge;
in
{
  options = {
    services.tailscale.enable = mkEnableOption "tailscale";
    services.fprintd.enable = mkEnableOption "fprintd";
    services.fwupd.enable = mkEnableOption "fwupd";
    services.flatpak.enable = mkEnableOption "flatpak";
    services.cloud-init.enable = mkEnableOption "cloud-init";
    services.power-profiles-daemon.enable = mkEnableOption "power-profiles-daemon";
    virtualisation.containers.enable = mkEnableOption "containers";
    # nixos/modules/services/logging/logrotate.nix: on by default (it rotates the wtmp and btmp
    # logs NixOS configures).
    services.logrotate.enable = mkEnableOption "logrotate" // { default = true; };
    security.acme.certs = mkOption { type = types.attrsOf types.anything; default = { }; };
  };
  config = mkMerge [
    # nixos/modules/services/networking/tailscale.nix: the upstream unit (systemd.packages)
    # has StateDirectory=tailscale; the NixOS definition adds only wantedBy, path, Environment.
    (mkIf config.services.tailscale.enable {
      systemd.services.tailscaled = { wantedBy = [ "multi-user.target" ]; serviceConfig.Environment = [ "PORT=41641" ]; };
    })
    (mkIf config.services.logrotate.enable { systemd.services.logrotate.serviceConfig = { Type = "oneshot"; StateDirectory = "logrotate"; }; })
    (mkIf config.services.fprintd.enable { systemd.services.fprintd = { }; })
    (mkIf config.services.fwupd.enable { systemd.services.fwupd = { }; })
    (mkIf config.services.power-profiles-daemon.enable { systemd.services.power-profiles-daemon = { }; })
    (mkIf config.virtualisation.podman.enable { virtualisation.containers.enable = true; })
    # nixos/modules/security/acme: one oneshot per certificate, its state under /var/lib/acme.
    {
      systemd.services = lib.mapAttrs'
        (name: _: lib.nameValuePair "acme-${name}" {
          serviceConfig = { Type = "oneshot"; User = "acme"; Group = "acme"; StateDirectory = "acme/${name}"; };
        })
        config.security.acme.certs;
    }
  ];
}
