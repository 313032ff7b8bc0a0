# Presets: the state that hand-written "erase your darlings" setups persist again and again, one
# boolean each. A preset for a service is on when that service is enabled, so turning a service on
# keeps its state without a second line; `essential` and `sudoLecture` are on by default.
{ lib, config }:
let
  inherit (lib) mkOption types mkIf;
  cfg = config.rasa;
  on = cfg.presets;

  preset = { default, defaultText, what }: mkOption {
    type = types.bool;
    inherit default;
    defaultText = lib.literalExpression defaultText;
    example = !default;
    description = "Whether to keep ${what}.";
  };
in
{
  options = {
    essential = preset {
      default = true;
      defaultText = "true";
      what = ''
        what every NixOS machine needs across boots: `/etc/machine-id` (the journal and DHCP
        identity), `/var/lib/nixos` (stable uids and gids), `/var/lib/systemd` (coredumps, timers,
        the random seed) and `/var/log`, unless `/var/log` is a filesystem of its own'';
    };
    networkmanager = preset {
      default = config.networking.networkmanager.enable;
      defaultText = "config.networking.networkmanager.enable";
      what = ''
        NetworkManager's connections and its `secret_key`, `seen-bssids` and `timestamps`
        (linked, not bind-mounted, because NetworkManager replaces them by renaming)'';
    };
    ssh = preset {
      default = config.services.openssh.enable;
      defaultText = "config.services.openssh.enable";
      what = ''
        the ssh host keys: `services.openssh.hostKeys` points into the storage root, so sshd
        creates and reads them there and clients never see a new host key'';
    };
    sudoLecture = preset {
      default = true;
      defaultText = "true";
      what = "sudo's record of who has had the lecture (`/var/db/sudo/lectured`)";
    };
    docker = preset {
      default = config.virtualisation.docker.enable;
      defaultText = "config.virtualisation.docker.enable";
      what = "Docker's images, containers and volumes (`/var/lib/docker`)";
    };
    bluetooth = preset {
      default = config.hardware.bluetooth.enable;
      defaultText = "config.hardware.bluetooth.enable";
      what = "Bluetooth pairings (`/var/lib/bluetooth`)";
    };
  };

  config = lib.mkMerge [
    (mkIf on.essential {
      environment.persistence.${cfg.storageRoot} = {
        files = [ "/etc/machine-id" ];
        directories =
          [ "/var/lib/nixos" "/var/lib/systemd" ]
          ++ lib.optional (!(config.fileSystems ? "/var/log")) "/var/log";
      };
    })
    (mkIf on.networkmanager {
      environment.persistence.${cfg.storageRoot} = {
        directories = [{ directory = "/etc/NetworkManager/system-connections"; mode = "0700"; }];
        files = map
          (name: { file = "/var/lib/NetworkManager/${name}"; method = "symlink"; })
          [ "secret_key" "seen-bssids" "timestamps" ];
      };
    })
    (mkIf on.ssh {
      services.openssh.hostKeys = lib.mkDefault [
        { type = "ed25519"; path = "${cfg.storageRoot}/etc/ssh/ssh_host_ed25519_key"; }
        { type = "rsa"; bits = 4096; path = "${cfg.storageRoot}/etc/ssh/ssh_host_rsa_key"; }
      ];
    })
    (mkIf on.sudoLecture {
      environment.persistence.${cfg.storageRoot}.directories = [
        { directory = "/var/db/sudo/lectured"; mode = "0700"; }
      ];
    })
    (mkIf on.docker {
      environment.persistence.${cfg.storageRoot}.directories = [
        { directory = "/var/lib/docker"; mode = "0710"; }
      ];
    })
    (mkIf on.bluetooth {
      environment.persistence.${cfg.storageRoot}.directories = [
        { directory = "/var/lib/bluetooth"; mode = "0700"; }
      ];
    })
  ];

  # The ssh preset keeps host keys outside environment.persistence (sshd writes them straight
  # into the storage root); these manifest entries let `rasa migrate` copy the existing keys there.
  extraManifestPaths = lib.optionals on.ssh (lib.concatMap
    (key:
      let live = lib.removePrefix cfg.storageRoot key.path; in
      lib.optionals (lib.hasPrefix "${cfg.storageRoot}/" key.path) [ live "${live}.pub" ])
    config.services.openssh.hostKeys);
}
