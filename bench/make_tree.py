#!/usr/bin/env python3
"""Populate a root subvolume like Docker's btrfs driver leaves it, for the rollback benchmark.

usage: make_tree.py ROOT N_SUBVOLUMES N_FILES

Half of the subvolumes are layers under var/lib/docker/btrfs/subvolumes, each with one nested
child (so the tree is two deep below the root); the files are spread over all of them. Uses the
SUBVOL_CREATE ioctl directly: spawning `btrfs subvolume create` 2,000 times would dominate the
set-up time, not the thing measured.
"""
import fcntl
import os
import struct
import sys

BTRFS_IOC_SUBVOL_CREATE = 0x50009400 | (14 & 0xFF)  # _IOW(0x94, 14, struct btrfs_ioctl_vol_args)


def subvol_create(parent: str, name: str) -> str:
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # A mutable buffer goes to the kernel as is; bytes would be capped at 1024.
        args = bytearray(struct.pack("q4088s", 0, name.encode()))
        fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_CREATE, args, True)
    finally:
        os.close(fd)
    return os.path.join(parent, name)


def main() -> None:
    root, n_subvols, n_files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    layers = os.path.join(root, "var/lib/docker/btrfs/subvolumes")
    os.makedirs(layers, exist_ok=True)
    dirs = [root]
    for i in range(n_subvols // 2):
        layer = subvol_create(layers, f"layer{i:05}")
        os.makedirs(os.path.join(layer, "usr"), exist_ok=True)
        child = subvol_create(os.path.join(layer, "usr"), "nested")
        dirs += [layer, child]
    made = 0
    for i, d in enumerate(dirs):
        # Spread evenly; the first directories take the remainder.
        count = n_files // len(dirs) + (1 if i < n_files % len(dirs) else 0)
        for j in range(count):
            with open(os.path.join(d, f"f{j:04}"), "wb") as f:
                f.write(b"x" * 64)
            made += 1
    print(f"{len(dirs) - 1} nested subvolumes, {made} files")


if __name__ == "__main__":
    main()
