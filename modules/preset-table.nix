# The presets' table: for each, the switch that turns it on by default, what it keeps (in
# impermanence's syntax: each a directory bind-mounted from the storage root unless it says
# `file`), the units whose state that is, and the option description. Read by presets.nix (the
# options and environment.persistence), state-check.nix (which enabled service loses what, and
# which preset covers it) and the manifest (`services`).
#
# Everything is kept as its directory unless a program is known to write its file in place:
# a program that renames a new file over the old one (GLib's g_file_set_contents, systemd's
# atomic writes, Go's tailscale state, lego, update-users-groups.pl) replaces a symlink on the
# wiped root and fails with EBUSY on a bind-mounted file, but stays inside a bind-mounted
# directory. docs/nixos.md ("Presets") gives the reason for each.
{ config, lib }:
let
  # An option of another module, false when that module is not part of the configuration.
  optionOn = path: lib.attrByPath (lib.splitString "." path) false config;
  service = path: units: what: {
    enabled = optionOn path;
    enabledText = "config.${path}";
    inherit units what;
  };
  dir = directory: user: group: mode: { inherit directory user group mode; };
  acmeCerts = lib.attrNames (config.security.acme.certs or { });
  # lanzaboote's option may be null (older releases had no default); sbctl's own place then.
  pkiBundle = let v = config.boot.lanzaboote.pkiBundle or null; in if v == null then "/var/lib/sbctl" else toString v;
in
{
  essential = {
    enabled = true;
    enabledText = "true";
    units = [ ];
    what = ''
      what every NixOS machine needs across boots: `/etc/machine-id` (the journal and DHCP
      identity), `/var/lib/nixos` (stable uids and gids; needed for boot), `/var/lib/systemd`
      (the stamps of `Persistent=` timers, `random-seed`, `credential.secret`, coredumps, rfkill
      and backlight state) and `/var/log`, each unless the configuration keeps it already (for
      example as a file system of its own)'';
    directories = [ "/var/lib/nixos" "/var/lib/systemd" "/var/log" ];
    files = [ "/etc/machine-id" ];
  };
  sudoLecture = {
    enabled = true;
    enabledText = "true";
    units = [ ];
    what = "sudo's record of who has had the lecture (`/var/db/sudo/lectured`)";
    directories = [ (dir "/var/db/sudo/lectured" "root" "root" "0700") ];
    files = [ ];
  };
  networkmanager = service "networking.networkmanager.enable" [ "NetworkManager.service" ] ''
    NetworkManager's saved connections (`/etc/NetworkManager/system-connections`) and its
    state directory `/var/lib/NetworkManager` (`secret_key`, `seen-bssids`, `timestamps`),
    as directories: NetworkManager replaces these files by renaming a new file over them'' // {
    directories = [
      (dir "/etc/NetworkManager/system-connections" "root" "root" "0700")
      "/var/lib/NetworkManager"
    ];
    files = [ ];
  };
  docker = service "virtualisation.docker.enable" [ "docker.service" ]
    "Docker's images, containers and volumes (`/var/lib/docker`)" // {
    directories = [ (dir "/var/lib/docker" "root" "root" "0710") ];
    files = [ ];
  };
  bluetooth = service "hardware.bluetooth.enable" [ "bluetooth.service" ]
    "Bluetooth pairings (`/var/lib/bluetooth`, 0700; bluez saves them by rename)" // {
    directories = [ (dir "/var/lib/bluetooth" "root" "root" "0700") ];
    files = [ ];
  };
  tailscale = service "services.tailscale.enable" [ "tailscaled.service" ]
    "Tailscale's node key and state (`/var/lib/tailscale`, 0700): without it the machine joins the tailnet as a new node at every boot" // {
    directories = [ (dir "/var/lib/tailscale" "root" "root" "0700") ];
    files = [ ];
  };
  acme = {
    enabled = acmeCerts != [ ];
    enabledText = "config.security.acme.certs != { }";
    units = map (name: "acme-${name}.service") acmeCerts;
    what = "the ACME account keys and certificates (`/var/lib/acme`, owned by acme): without them every boot requests new certificates, into the CA's rate limits";
    directories = [ (dir "/var/lib/acme" "acme" "acme" "0755") ];
    files = [ ];
  };
  secureboot = {
    enabled = optionOn "boot.lanzaboote.enable";
    enabledText = "config.boot.lanzaboote.enable";
    units = [ ];
    what = "the Secure Boot keys lanzaboote signs with (`boot.lanzaboote.pkiBundle`, `/var/lib/sbctl` by default, 0700): without them the next generation cannot be signed with the enrolled keys";
    directories = [ (dir pkiBundle "root" "root" "0700") ];
    files = [ ];
  };
  fprint = service "services.fprintd.enable" [ "fprintd.service" ]
    "enrolled fingerprints (`/var/lib/fprint`, 0700)" // {
    directories = [ (dir "/var/lib/fprint" "root" "root" "0700") ];
    files = [ ];
  };
  fwupd = service "services.fwupd.enable" [ "fwupd.service" "fwupd-refresh.service" ]
    "fwupd's history, metadata and pending updates (`/var/lib/fwupd`): an update staged for the next boot is otherwise lost with it" // {
    directories = [ (dir "/var/lib/fwupd" "root" "root" "0755") ];
    files = [ ];
  };
  libvirt = service "virtualisation.libvirtd.enable" [ "libvirtd.service" ]
    "libvirt's domains, networks, storage pools, disk images and secrets (`/var/lib/libvirt`); its secrets are encrypted with systemd's `credential.secret`, kept by `essential`" // {
    directories = [ (dir "/var/lib/libvirt" "root" "root" "0755") ];
    files = [ ];
  };
  containers = {
    enabled = optionOn "virtualisation.podman.enable" || optionOn "virtualisation.containers.enable";
    enabledText = "config.virtualisation.podman.enable || config.virtualisation.containers.enable";
    units = [ "podman.service" ];
    what = "podman's (and the containers stack's) system images, containers and volumes (`/var/lib/containers`)";
    directories = [ (dir "/var/lib/containers" "root" "root" "0700") ];
    files = [ ];
  };
  flatpak = service "services.flatpak.enable" [ "flatpak-system-helper.service" ]
    "system-wide flatpak installations and remotes (`/var/lib/flatpak`)" // {
    directories = [ (dir "/var/lib/flatpak" "root" "root" "0755") ];
    files = [ ];
  };
  cloudInit = service "services.cloud-init.enable" [ "cloud-init.service" "cloud-init-local.service" "cloud-config.service" "cloud-final.service" ]
    "cloud-init's instance records (`/var/lib/cloud`): without them every boot is a first boot, which regenerates host keys and reruns user data" // {
    directories = [ (dir "/var/lib/cloud" "root" "root" "0755") ];
    files = [ ];
  };
  powerProfiles = service "services.power-profiles-daemon.enable" [ "power-profiles-daemon.service" ]
    "the chosen power profile (`/var/lib/power-profiles-daemon`, saved by rename)" // {
    directories = [ (dir "/var/lib/power-profiles-daemon" "root" "root" "0755") ];
    files = [ ];
  };
  logrotate = service "services.logrotate.enable" [ "logrotate.service" ]
    "logrotate's record of when each log was last rotated (`/var/lib/logrotate`, its `StateDirectory=`; written to `status.tmp` and renamed): without it a log on a machine that reboots more often than its rotation period is never rotated" // {
    directories = [ (dir "/var/lib/logrotate" "root" "root" "0755") ];
    files = [ ];
  };
  root = {
    enabled = false;
    enabledText = "false";
    units = [ ];
    what = "root's home directory (`/root`, 0700): shell history, ssh keys and known hosts, tool configuration; off by default, as it also keeps whatever root leaves lying there";
    directories = [ (dir "/root" "root" "root" "0700") ];
    files = [ ];
  };
}
