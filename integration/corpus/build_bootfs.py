#!/usr/bin/env python3
"""Assemble the boot initramfs shared by every corpus guest.

It only gets the function's disk mounted, as a Firecracker guest's root device would be:
busybox-static, the kernel modules for virtio-blk and ext4 (from the host's
/lib/modules/KVER, the same linux-image package as the guest kernel), and an /init that
loads them, mounts /dev/vda read-only and switches to it. The function's own /init runs from
the disk, so Python and its libraries reach guest memory through the page cache, page-aligned,
as they would from a Firecracker root drive.

Usage: build_bootfs.py --kernel-version KVER --out DIR [--busybox PATH]
"""

import argparse
import os
import shutil
import stat
import subprocess
import sys

MODULES = ["virtio_pci", "virtio_blk", "ext4"]

INIT = r"""#!/bin/sh
# thaw corpus boot stage: load virtio-blk and ext4, mount the function's disk, switch to it.
fail() { echo "THAW-FAILED boot: $*"; poweroff -f; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do
    insmod "/modules/$m" 2>/dev/null || echo "boot: insmod $m failed (may be optional)"
done
n=0
while [ ! -b /dev/vda ]; do
    n=$((n + 1)); [ $n -gt 100 ] && fail "no /dev/vda (virtio-blk disk) after 10 s"
    sleep 0.1
done
mount -t ext4 -o ro /dev/vda /newroot || fail "cannot mount /dev/vda"
mount --move /dev /newroot/dev || fail "cannot move /dev"
umount /proc /sys
exec switch_root /newroot /init
"""


def die(msg):
    print(f"build_bootfs: error: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel-version", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--busybox", default=shutil.which("busybox") or "/bin/busybox")
    args = ap.parse_args()

    if not os.path.isdir(f"/lib/modules/{args.kernel_version}"):
        die(f"/lib/modules/{args.kernel_version} missing: install linux-image-{args.kernel_version}")
    order = []
    for module in MODULES:  # one at a time: --show-depends only looks at its first argument
        deps = subprocess.run(["modprobe", "-S", args.kernel_version, "--show-depends", module],
                              capture_output=True, text=True)
        if deps.returncode != 0:
            die(f"modprobe --show-depends {module} failed: {deps.stderr.strip()}")
        for line in deps.stdout.splitlines():
            parts = line.split()
            if parts[:1] == ["insmod"] and parts[1] not in order:
                order.append(parts[1])
            # "builtin X" lines need nothing.
    if not order:
        die("no modules to load: is the guest kernel's virtio/ext4 support built in? Then this stage can go")

    root = args.out
    if os.path.exists(root):
        shutil.rmtree(root)
    for d in ["bin", "proc", "sys", "dev", "newroot", "modules"]:
        os.makedirs(os.path.join(root, d))
    shutil.copy2(args.busybox, os.path.join(root, "bin/busybox"))
    for applet in ["sh", "mount", "umount", "insmod", "switch_root", "sleep", "cat", "echo", "poweroff"]:
        os.symlink("busybox", os.path.join(root, "bin", applet))
    names = []
    for path in order:
        name = os.path.basename(path)
        shutil.copy2(path, os.path.join(root, "modules", name))
        names.append(name)
    with open(os.path.join(root, "modules.order"), "w") as f:
        f.write("\n".join(names) + "\n")
    with open(os.path.join(root, "init"), "w") as f:
        f.write(INIT)
    os.chmod(os.path.join(root, "init"), 0o755)
    os.mknod(os.path.join(root, "dev/console"), 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    print(f"bootfs {root}: {len(names)} modules ({', '.join(names)})")


if __name__ == "__main__":
    main()
