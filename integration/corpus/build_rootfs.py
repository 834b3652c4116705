#!/usr/bin/env python3
"""Assemble the root filesystem of one corpus function.

The tree holds busybox (static), the host's Debian python3 with the shared libraries it
needs (ldd), the stdlib modules the function imports (found by running its warm-up on the
host with THAW_TRACE) and the function itself under /fn. make-corpus.sh packs the same tree
into the function's ext4 disk image, which the guest mounts as its root (see build_bootfs.py).

Usage: build_rootfs.py --functions DIR --function NAME --revision REV --out ROOTFS
                       [--python /usr/bin/python3] [--busybox PATH] [--warm N]
"""

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def die(msg):
    print(f"build_rootfs: error: {msg}", file=sys.stderr)
    sys.exit(1)


def copy_into(root, path, dest=None):
    """Copies host file `path` (dereferenced) to the same path (or `dest`) under `root`,
    keeping its mode and mtime so that .pyc files stay valid against their sources."""
    dest = dest or path
    target = os.path.join(root, dest.lstrip("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not os.path.exists(target):
        shutil.copy2(path, target, follow_symlinks=True)
    return target


def usr_path(path):
    """The path of a host file in a merged-/usr layout (/lib/x -> /usr/lib/x), keeping the
    file name (a soname symlink stays the name the loader asks for)."""
    directory = os.path.realpath(os.path.dirname(path))
    return os.path.join(directory, os.path.basename(path))


def ldd(path):
    out = subprocess.run(["ldd", path], capture_output=True, text=True)
    if out.returncode != 0:
        if "not a dynamic executable" in out.stdout + out.stderr:
            return []
        die(f"ldd {path} failed: {out.stderr.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
        elif "not found" in line:
            die(f"{path}: missing shared library: {line.strip()}")
    return libs


def stage_function(functions, name, revision, warm, dest):
    src = os.path.join(functions, name, revision)
    if not os.path.isdir(src):
        die(f"no function source at {src}")
    os.makedirs(dest, exist_ok=True)
    shutil.copy2(os.path.join(functions, "_runtime", "runtime.py"), dest)
    for entry in sorted(os.listdir(src)):
        if entry.endswith(".py"):
            shutil.copy2(os.path.join(src, entry), dest)
    with open(os.path.join(dest, "function.json"), "w") as f:
        json.dump({"name": name, "revision": revision, "warm_invocations": warm}, f, indent=2)
        f.write("\n")


def trace_modules(python, staged):
    """Runs the function's warm-up on the host and returns the stdlib files it imported."""
    with tempfile.TemporaryDirectory() as tmp:
        fn = os.path.join(tmp, "fn")
        shutil.copytree(staged, fn)
        trace = os.path.join(tmp, "trace.txt")
        env = {"PATH": "/usr/bin:/bin", "THAW_TRACE": trace, "LANG": "C.UTF-8", "TMPDIR": tmp,
               "HOME": tmp}
        try:
            run = subprocess.run([python, os.path.join(fn, "runtime.py")], env=env, cwd=fn,
                                 capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            die("the function's warm-up did not finish on the host within 300 s")
        if run.returncode != 0 or not os.path.exists(trace):
            die(f"the function's warm-up failed on the host:\n{run.stderr[-2000:]}")
        with open(trace) as f:
            files = [line.strip() for line in f if line.strip()]
    stdlib = subprocess.run([python, "-c", "import os; print(os.path.dirname(os.__file__))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    # Only the stdlib: the function ships its own files, and host site-packages hooks
    # (.pth files) are not part of the guest.
    return stdlib, [p for p in files if p.startswith(stdlib + os.sep)]


def pyc_of(path):
    base, ext = os.path.splitext(os.path.basename(path))
    tag = sys.implementation.cache_tag
    return os.path.join(os.path.dirname(path), "__pycache__", f"{base}.{tag}.pyc")


INIT = r"""#!/bin/sh
# thaw corpus guest init, run from the function's disk (mounted read-only) after the boot
# stage (build_bootfs.py) switched to it: mount the basics, run the function, never return.
export PATH=/usr/bin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q " /dev " /proc/mounts || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=64m tmpfs /tmp
ip link set lo up || ifconfig lo 127.0.0.1 up
hostname function
echo "THAW-BOOTED $(uname -r)"
cd /fn
HOME=/root PATH=/usr/bin:/bin LANG=C.UTF-8 TMPDIR=/tmp /usr/bin/python3 /fn/runtime.py
echo "THAW-FAILED function exited with status $?"
poweroff -f
"""

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--functions", required=True)
    ap.add_argument("--function", required=True)
    ap.add_argument("--revision", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--python", default="/usr/bin/python3")
    ap.add_argument("--busybox", default=shutil.which("busybox") or "/bin/busybox")
    ap.add_argument("--warm", type=int, default=20)
    args = ap.parse_args()

    python = os.path.realpath(args.python)
    if not os.access(python, os.X_OK):
        die(f"python interpreter {args.python} not found")
    if not os.access(args.busybox, os.X_OK):
        die(f"busybox not found at {args.busybox} (Debian package busybox-static)")
    if ldd(args.busybox):
        die(f"{args.busybox} is dynamically linked; install busybox-static")

    root = args.out
    if os.path.exists(root):
        shutil.rmtree(root)
    for d in ["usr/bin", "usr/lib", "usr/lib64", "proc", "sys", "dev", "tmp", "root", "etc", "fn"]:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for link, target in [("bin", "usr/bin"), ("sbin", "usr/bin"), ("lib", "usr/lib"),
                         ("lib64", "usr/lib64"), ("usr/sbin", "bin")]:
        os.symlink(target, os.path.join(root, link))
    os.chmod(os.path.join(root, "tmp"), 0o1777)

    # The function and its runtime, byte-compiled as a deployment would ship it (the disk is
    # mounted read-only in the guest, so Python could not write the .pyc files there).
    fn_dir = os.path.join(root, "fn")
    stage_function(args.functions, args.function, args.revision, args.warm, fn_dir)

    # Python: interpreter, the stdlib files the warm-up imported (+ their .pyc), libraries.
    stdlib, modules = trace_modules(python, fn_dir)
    subprocess.run([python, "-m", "compileall", "-q", fn_dir], check=True)
    copy_into(root, python, usr_path(python))
    os.symlink(os.path.basename(python), os.path.join(root, "usr/bin/python3"))
    native = [python]
    for path in modules:
        copy_into(root, path)
        if path.endswith(".so"):
            native.append(path)
        elif os.path.exists(pyc_of(path)):
            copy_into(root, pyc_of(path))
    # Landmarks Python uses to find its prefix and exec-prefix.
    copy_into(root, os.path.join(stdlib, "os.py"))
    os.makedirs(os.path.join(root, stdlib.lstrip("/"), "lib-dynload"), exist_ok=True)
    libs = set()
    for path in native:
        libs.update(ldd(path))
    for lib in sorted(libs):
        copy_into(root, lib, usr_path(lib))

    # busybox and its applets.
    copy_into(root, args.busybox, "/usr/bin/busybox")
    applets = subprocess.run([args.busybox, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        link = os.path.join(root, "usr/bin", applet)
        if applet != "busybox" and not os.path.lexists(link):
            os.symlink("busybox", link)

    with open(os.path.join(root, "init"), "w") as f:
        f.write(INIT)
    os.chmod(os.path.join(root, "init"), 0o755)
    with open(os.path.join(root, "etc/hosts"), "w") as f:
        f.write("127.0.0.1 localhost function\n")
    with open(os.path.join(root, "etc/nsswitch.conf"), "w") as f:
        f.write("hosts: files\n")
    with open(os.path.join(root, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    # For a boot straight from this tree (the kernel opens /dev/console before devtmpfs exists).
    console = os.path.join(root, "dev/console")
    os.mknod(console, 0o600 | stat.S_IFCHR, os.makedev(5, 1))

    with open(os.path.join(root, "fn", "modules.txt"), "w") as f:
        f.write("\n".join(modules) + "\n")
    print(f"rootfs {root}: {len(modules)} stdlib files, {len(libs)} shared libraries")


if __name__ == "__main__":
    main()
