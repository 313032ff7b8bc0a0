# Configurations modelled on public "erase your darlings" NixOS setups: their facts (layout,
# devices, paths, options), not their text. Each one is what such a user has before importing rasa,
# plus the rasa lines its owner would add (`rasa.enable`, and the settings their layout needs).
#   name, source: what it is modelled on;
#   modules: the configuration;
#   unlocks: the cryptsetup units the rollback must be ordered after;
#   device: the device the rollback resets;
#   persisted: the live paths the configuration keeps in its storage root (by impermanence or by
#     pointing a program there), which the manifest must cover;
#   stateCheck (optional): of `paths`, the ones rasa's state check must name as lost (`lost`),
#     and the ones it must name with every service preset turned off (`lostWithoutPresets`).
{ lib, rasa }:
let
  rasaOn = extra: { rasa = { enable = true; package = rasa; } // extra; };
  btrfs = device: subvol: extra: { inherit device; fsType = "btrfs"; options = [ "subvol=${subvol}" "compress=zstd" "noatime" ]; } // extra;
  systemd.boot.initrd.systemd.enable = true;
in
[
  {
    name = "impermanence's README example";
    source = "github.com/nix-community/impermanence README.org, \"NixOS\" usage example";
    device = "/dev/disk/by-label/nixos";
    unlocks = [ ];
    modules = [
      systemd
      {
        fileSystems."/" = btrfs "/dev/disk/by-label/nixos" "root" { };
        fileSystems."/nix" = btrfs "/dev/disk/by-label/nixos" "nix" { };
        fileSystems."/persistent" = btrfs "/dev/disk/by-label/nixos" "persistent" { neededForBoot = true; };
        hardware.bluetooth.enable = true;
        networking.networkmanager.enable = true;
        users.users.bird = { isNormalUser = true; group = "users"; };
        users.users.colord = { isSystemUser = true; group = "colord"; };
        users.groups.colord = { };
        environment.persistence."/persistent" = {
          enable = true;
          hideMounts = true;
          directories = [
            "/var/log"
            "/var/lib/bluetooth"
            "/var/lib/nixos"
            "/var/lib/systemd/coredump"
            "/etc/NetworkManager/system-connections"
            { directory = "/var/lib/colord"; user = "colord"; group = "colord"; mode = "u=rwx,g=rx,o="; }
          ];
          files = [
            "/etc/machine-id"
            { file = "/var/keys/secret_file"; parentDirectory = { mode = "u=rwx,g=,o="; }; }
          ];
          users.bird = {
            directories = [
              "Downloads"
              "Music"
              "Pictures"
              "Documents"
              "Videos"
              "VirtualBox VMs"
              { directory = ".gnupg"; mode = "0700"; }
              { directory = ".ssh"; mode = "0700"; }
              { directory = ".nixops"; mode = "0700"; }
              { directory = ".local/share/keyrings"; mode = "0700"; }
              ".local/share/direnv"
            ];
            files = [ ".screenrc" ];
          };
        };
      }
      (rasaOn { storageRoot = "/persistent"; subvolumes.persist = "persistent"; })
    ];
    persisted = [
      "/var/log"
      "/var/lib/bluetooth"
      "/var/lib/nixos"
      "/var/lib/systemd/coredump"
      "/etc/NetworkManager/system-connections"
      "/var/lib/colord"
      "/etc/machine-id"
      "/var/keys/secret_file"
      "/home/bird/Documents"
      "/home/bird/VirtualBox VMs"
      "/home/bird/.gnupg"
      "/home/bird/.local/share/direnv"
      "/home/bird/.screenrc"
    ];
  }

  {
    name = "seed: systemd-initrd guide with /persist/system and password files";
    source = "../shared/seeds/000: LUKS cryptfs, subvolumes root/nix/persist/log, environment.persistence.\"/persist/system\", NetworkManager files linked by tmpfiles, ssh host keys in storage, hashedPasswordFile";
    device = "/dev/mapper/cryptfs";
    unlocks = [ "systemd-cryptsetup@cryptfs.service" ];
    modules = [
      systemd
      {
        boot.initrd.luks.devices.cryptfs.device = "/dev/disk/by-uuid/6a1c1a5e-3f0b-4c1e-9d55-0f7f2c1e9a10";
        fileSystems."/" = btrfs "/dev/mapper/cryptfs" "root" { };
        fileSystems."/nix" = btrfs "/dev/mapper/cryptfs" "nix" { };
        fileSystems."/persist" = btrfs "/dev/mapper/cryptfs" "persist" { neededForBoot = true; };
        fileSystems."/var/log" = btrfs "/dev/mapper/cryptfs" "log" { neededForBoot = true; };
        networking.networkmanager.enable = true;
        services.openssh.enable = true;
        environment.persistence."/persist/system" = {
          hideMounts = true;
          directories = [
            "/etc/nixos"
            "/etc/NetworkManager/system-connections"
            "/var/db/sudo"
            "/var/lib/systemd/coredump"
          ];
          files = [ "/etc/machine-id" ];
        };
        systemd.tmpfiles.rules = map
          (name: "L /var/lib/NetworkManager/${name} - - - - /persist/system/var/lib/NetworkManager/${name}")
          [ "secret_key" "seen-bssids" "timestamps" ];
        services.openssh.hostKeys = lib.mkForce [
          { bits = 4096; path = "/persist/system/etc/ssh/ssh_host_rsa_key"; type = "rsa"; }
          { bits = 4096; path = "/persist/system/etc/ssh/ssh_host_ed25519_key"; type = "ed25519"; }
        ];
        users.mutableUsers = false;
        users.users.root.hashedPasswordFile = "/persist/passwords/root";
        users.users.itsdrike = { isNormalUser = true; group = "users"; hashedPasswordFile = "/persist/passwords/itsdrike"; };
      }
      # Their rollback deletes and recreates root, empty.
      (rasaOn { storageRoot = "/persist/system"; subvolumes.blank = null; })
    ];
    persisted = [
      "/etc/nixos"
      "/etc/NetworkManager/system-connections"
      "/var/db/sudo"
      "/var/lib/systemd/coredump"
      "/etc/machine-id"
      "/etc/ssh/ssh_host_rsa_key"
      "/etc/ssh/ssh_host_ed25519_key"
    ];
  }

  {
    name = "seed: encrypted btrfs root with opt-in state (by-uuid, /etc links, a /var/log subvolume)";
    source = "../shared/seeds/004: LUKS enc by-uuid, btrfs by-uuid, subvolumes root/home/nix/persist/log, root-blank, environment.etc sources and tmpfiles links into /persist, no impermanence";
    device = "/dev/disk/by-uuid/f73c53b7-ae6c-4240-89c3-511ad918edcc";
    unlocks = [ "systemd-cryptsetup@enc.service" ];
    modules = [
      systemd
      (
        let uuid = "/dev/disk/by-uuid/f73c53b7-ae6c-4240-89c3-511ad918edcc"; in
        {
          boot.initrd.luks.devices.enc.device = "/dev/disk/by-uuid/050db9bf-0741-4150-8cf8-d6ec12735d4c";
          fileSystems."/" = btrfs uuid "root" { };
          fileSystems."/home" = btrfs uuid "home" { };
          fileSystems."/nix" = btrfs uuid "nix" { };
          fileSystems."/persist" = btrfs uuid "persist" { neededForBoot = true; };
          fileSystems."/var/log" = btrfs uuid "log" { neededForBoot = true; };
          swapDevices = [{ device = "/dev/disk/by-uuid/5b1b6659-14ab-497f-a788-5518c25e7ec8"; }];
          networking.networkmanager.enable = true;
          environment.etc = {
            nixos.source = "/persist/etc/nixos";
            "NetworkManager/system-connections".source = "/persist/etc/NetworkManager/system-connections";
            adjtime.source = "/persist/etc/adjtime";
            NIXOS.source = "/persist/etc/NIXOS";
            machine-id.source = "/persist/etc/machine-id";
          };
          systemd.tmpfiles.rules = map
            (name: "L /var/lib/NetworkManager/${name} - - - - /persist/var/lib/NetworkManager/${name}")
            [ "secret_key" "seen-bssids" "timestamps" ];
          security.sudo.extraConfig = ''
            Defaults lecture = never
          '';
          users.users.delta = { isNormalUser = true; group = "users"; };
        }
      )
      (rasaOn { })
    ];
    # Their /etc links are no impermanence entries; what rasa's presets add for them is.
    persisted = [ "/var/lib/nixos" "/var/lib/systemd" ];
  }

  {
    name = "Misterio77-style ephemeral btrfs (by-label, encrypted, ssh keys in /persist)";
    source = "github.com/Misterio77/nix-config: hosts/common/optional/ephemeral-btrfs.nix, encrypted-root.nix, global/optin-persistence.nix, global/openssh.nix";
    device = "/dev/disk/by-label/atlas";
    unlocks = [ "systemd-cryptsetup@atlas.service" ];
    modules = [
      systemd
      {
        networking.hostName = "atlas";
        boot.initrd.luks.devices.atlas.device = "/dev/disk/by-label/atlas_crypt";
        fileSystems."/" = btrfs "/dev/disk/by-label/atlas" "root" { };
        fileSystems."/nix" = btrfs "/dev/disk/by-label/atlas" "nix" { };
        fileSystems."/persist" = btrfs "/dev/disk/by-label/atlas" "persist" { neededForBoot = true; };
        fileSystems."/swap" = btrfs "/dev/disk/by-label/atlas" "swap" { };
        environment.persistence."/persist".directories = [ "/var/lib/systemd" "/var/lib/nixos" "/var/log" "/srv" "/var/lib/tailscale" ];
        services.openssh.enable = true;
        services.openssh.hostKeys = [{ path = "/persist/etc/ssh/ssh_host_ed25519_key"; type = "ed25519"; }];
        users.mutableUsers = false;
        users.users.gabriel = { isNormalUser = true; group = "users"; extraGroups = [ "wheel" ]; hashedPasswordFile = "/run/secrets-for-users/gabriel-password"; };
        virtualisation.podman.enable = true;
        # hosts/common/global/tailscale.nix
        services.tailscale.enable = true;
      }
      (rasaOn { })
    ];
    persisted = [ "/var/lib/systemd" "/var/lib/nixos" "/var/log" "/srv" "/var/lib/tailscale" "/etc/ssh/ssh_host_ed25519_key" ];
    # tailscale's state is kept by the configuration itself; podman's only by rasa's preset.
    stateCheck = { paths = [ "/var/lib/tailscale" "/var/lib/containers" ]; lost = [ ]; lostWithoutPresets = [ "/var/lib/containers" ]; };
  }

  {
    name = "workstation: three LUKS devices, by-uuid partitions, docker, bluetooth, a /var/log subvolume";
    source = "common public desktop layouts: cryptroot + cryptswap + cryptdata unlocked in the initrd, docker and bluetooth state kept by hand";
    device = "/dev/mapper/cryptroot";
    unlocks = [ "systemd-cryptsetup@cryptroot.service" ];
    modules = [
      systemd
      {
        boot.initrd.luks.devices = {
          cryptroot.device = "/dev/disk/by-uuid/2f9d7b0e-6a44-4f1c-8a2e-7c1d5e3b9f01";
          cryptswap.device = "/dev/disk/by-uuid/9c3e1a7d-0b2f-4d8e-a5c6-1e2f3a4b5c6d";
          cryptdata.device = "/dev/disk/by-uuid/4b5c6d7e-8f90-4a1b-9c2d-3e4f5a6b7c8d";
        };
        fileSystems."/" = btrfs "/dev/mapper/cryptroot" "root" { };
        fileSystems."/nix" = btrfs "/dev/mapper/cryptroot" "nix" { };
        fileSystems."/persist" = btrfs "/dev/mapper/cryptroot" "persist" { neededForBoot = true; };
        fileSystems."/var/log" = btrfs "/dev/mapper/cryptroot" "log" { neededForBoot = true; };
        fileSystems."/data" = { device = "/dev/mapper/cryptdata"; fsType = "ext4"; };
        swapDevices = [{ device = "/dev/mapper/cryptswap"; }];
        virtualisation.docker.enable = true;
        hardware.bluetooth.enable = true;
        environment.persistence."/persist" = {
          directories = [ "/var/lib/docker" "/var/lib/bluetooth" "/var/lib/nixos" "/etc/nixos" ];
          files = [ "/etc/machine-id" "/etc/ssh/ssh_host_ed25519_key" "/etc/ssh/ssh_host_ed25519_key.pub" ];
          users.alice.directories = [ "Documents" { directory = ".ssh"; mode = "0700"; } ];
        };
        services.openssh.enable = true;
        users.mutableUsers = false;
        users.users.alice = { isNormalUser = true; group = "users"; extraGroups = [ "wheel" ]; hashedPasswordFile = "/persist/passwords/alice"; };
      }
      (rasaOn { })
    ];
    persisted = [
      "/var/lib/docker"
      "/var/lib/bluetooth"
      "/var/lib/nixos"
      "/etc/nixos"
      "/etc/machine-id"
      "/etc/ssh/ssh_host_ed25519_key"
      "/etc/ssh/ssh_host_ed25519_key.pub"
      "/home/alice/Documents"
      "/home/alice/.ssh"
    ];
    # docker's and bluez's state kept by hand: quiet with or without the presets.
    stateCheck = { paths = [ "/var/lib/docker" "/var/lib/bluetooth" ]; lost = [ ]; lostWithoutPresets = [ ]; };
  }

  {
    name = "disko-style laptop: NetworkManager files linked by impermanence, subvol=/name options";
    source = "disko's luks-btrfs-subvolumes example layout (crypted, /rootfs /persist /nix) with the NetworkManager recipe of the NixOS wiki's impermanence page";
    device = "/dev/mapper/crypted";
    unlocks = [ "systemd-cryptsetup@crypted.service" ];
    modules = [
      systemd
      {
        boot.initrd.luks.devices.crypted.device = "/dev/disk/by-partlabel/disk-main-luks";
        fileSystems."/" = { device = "/dev/mapper/crypted"; fsType = "btrfs"; options = [ "subvol=/rootfs" ]; };
        fileSystems."/nix" = { device = "/dev/mapper/crypted"; fsType = "btrfs"; options = [ "subvol=/nix" "noatime" ]; };
        fileSystems."/persist" = { device = "/dev/mapper/crypted"; fsType = "btrfs"; options = [ "subvol=/persist" ]; neededForBoot = true; };
        networking.networkmanager.enable = true;
        environment.persistence."/persist" = {
          directories = [ "/etc/NetworkManager/system-connections" "/var/lib/nixos" "/var/log" ];
          files = [
            "/etc/machine-id"
            { file = "/var/lib/NetworkManager/secret_key"; method = "symlink"; }
            { file = "/var/lib/NetworkManager/seen-bssids"; method = "symlink"; }
            { file = "/var/lib/NetworkManager/timestamps"; method = "symlink"; }
          ];
        };
        users.users.me = { isNormalUser = true; group = "users"; };
      }
      (rasaOn { subvolumes = { root = "rootfs"; blank = "rootfs-blank"; }; })
    ];
    persisted = [
      "/etc/NetworkManager/system-connections"
      "/var/lib/nixos"
      "/var/log"
      "/etc/machine-id"
      "/var/lib/NetworkManager/secret_key"
      "/var/lib/NetworkManager/seen-bssids"
      "/var/lib/NetworkManager/timestamps"
    ];
  }
]
