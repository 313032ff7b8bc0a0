# A fresh install for rasa with disko: GPT, an EFI system partition, and LUKS2 holding one btrfs
# filesystem with the subvolumes rasa expects.
#
#   root        mounted at /, reset to the blank on every boot
#   root-blank  EMPTY and read-only: what every boot starts from (made in postCreateHook,
#               because disko has no read-only subvolume option)
#   persist     mounted at /persist: the state you opt in
#   nix         mounted at /nix: the store survives, it is what boots
#   log         mounted at /var/log: logs survive without being "state"
#
# Use: nix run github:nix-community/disko -- --mode disko ./disko-luks-btrfs.nix
# then nixos-install as usual. Change `device` to your disk first.
{
  disko.devices.disk.main = {
    type = "disk";
    device = "/dev/nvme0n1";
    content = {
      type = "gpt";
      partitions = {
        ESP = {
          size = "1G";
          type = "EF00";
          content = {
            type = "filesystem";
            format = "vfat";
            mountpoint = "/boot";
            mountOptions = [ "umask=0077" ];
          };
        };
        luks = {
          size = "100%";
          content = {
            type = "luks";
            name = "cryptroot";
            settings.allowDiscards = true;
            content = {
              type = "btrfs";
              extraArgs = [ "-f" ];
              subvolumes = {
                "/root" = {
                  mountpoint = "/";
                  mountOptions = [ "compress=zstd" "noatime" ];
                };
                "/persist" = {
                  mountpoint = "/persist";
                  mountOptions = [ "compress=zstd" "noatime" ];
                };
                "/nix" = {
                  mountpoint = "/nix";
                  mountOptions = [ "compress=zstd" "noatime" ];
                };
                "/log" = {
                  mountpoint = "/var/log";
                  mountOptions = [ "compress=zstd" "noatime" ];
                };
              };
              # An empty subvolume made read-only: not a snapshot of a root that may already
              # hold files. old_roots is a plain directory because old roots are renamed into it.
              postCreateHook = ''
                top=$(mktemp -d)
                mount -t btrfs -o subvolid=5 /dev/mapper/cryptroot "$top"
                trap 'umount "$top"; rmdir "$top"' EXIT
                btrfs subvolume create "$top/root-blank"
                btrfs property set -ts "$top/root-blank" ro true
                mkdir -m 0700 "$top/old_roots"
                # What the initrd mounts from the storage root before NixOS's activation could
                # create it (the manifest's neededForBoot entries; `rasa check system` lists them):
                # without it the first wiping boot fails to mount /var/lib/nixos.
                install -d -m 0755 "$top/persist/var/lib/nixos"
              '';
            };
          };
        };
      };
    };
  };

  # impermanence and rasa need these mounted in the initrd.
  fileSystems."/persist".neededForBoot = true;
  fileSystems."/var/log".neededForBoot = true;
}
