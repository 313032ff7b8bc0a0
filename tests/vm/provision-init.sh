#!/bin/sh
# Stage 0 of the VM harness: runs as /init of a small busybox initrd and lays out the encrypted
# disk the way a rasa host has it. It runs in a VM because the host kernel has no dm-crypt.
# @LUKS_UUID@ is filled in by xtask.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r module; do insmod "$module" || echo "RASA-VM: insmod $module failed"; done < /modules.order

fail() { echo "RASA-VM-PROVISION-FAILED: $*"; poweroff -f; }

# Without udev, libdevmapper must create the device nodes itself.
export DM_DISABLE_UDEV=1
mkdir -p /run/cryptsetup /mnt
# pbkdf2 with the minimum iterations: an argon2 unlock would take minutes under TCG.
cryptsetup luksFormat --type luks2 --batch-mode --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
  --uuid @LUKS_UUID@ --key-file /vm.key /dev/vda || fail luksFormat
cryptsetup open --key-file /vm.key /dev/vda cryptroot || fail "cryptsetup open"
mkfs.btrfs -q /dev/mapper/cryptroot || fail mkfs.btrfs
mount -t btrfs /dev/mapper/cryptroot /mnt || fail mount
btrfs -q subvolume create /mnt/root || fail "create root"
btrfs -q subvolume create /mnt/persist || fail "create persist"
btrfs -q subvolume create /mnt/nix || fail "create nix"
btrfs -q subvolume snapshot -r /mnt/root /mnt/root-blank || fail "snapshot root-blank"
cp -a /payload/. /mnt/nix/ || fail "copy payload"
sync
umount /mnt || fail umount
cryptsetup close cryptroot || fail "cryptsetup close"
echo RASA-VM-PROVISIONED
poweroff -f
