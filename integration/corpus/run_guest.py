#!/usr/bin/env python3
"""Boot one corpus guest under QEMU (TCG) with file-backed RAM and snapshot it when warm.

Steps: start qemu-system-x86_64 with its RAM in a file (memory-backend-file, share=on), so
the file is a flat guest-physical memory image like a Firecracker memory file; wait for the
warm marker on the serial console; pause the guest (QMP `stop`); save the device state with
QEMU's migration stream minus guest RAM (`x-ignore-shared`) as the vmstate stand-in; copy the
RAM file sparsely; quit. QEMU never outlives this script (PDEATHSIG, kill on every exit path).

Usage: run_guest.py --kernel VMLINUZ --initrd CPIO --disk EXT4 --mem MIB --out DIR [--timeout SEC]
Writes DIR/memory, DIR/vmstate, DIR/serial.log, DIR/boot.json.
"""

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

MARKER = b"THAW-WARM"
FAILED = b"THAW-FAILED"


class GuestError(Exception):
    pass


def set_pdeathsig():
    """In the child: die with the parent, and keep terminal signals for the parent."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setpgrp()


class Qmp:
    """A minimal QMP client over a unix socket."""

    def __init__(self, path, deadline):
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise GuestError("QEMU's QMP socket did not come up")
                time.sleep(0.2)
        self.sock.settimeout(60)
        self.buf = b""
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if line.strip():
                    msg = json.loads(line)
                    if "event" not in msg:
                        return msg
            data = self.sock.recv(65536)
            if not data:
                raise GuestError("QEMU closed the QMP connection")
            self.buf += data

    def cmd(self, name, **arguments):
        req = {"execute": name}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        reply = self._read()
        if "error" in reply:
            raise GuestError(f"QMP {name} failed: {reply['error'].get('desc')}")
        return reply.get("return")


def tail(path, n=30):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError:
        return "(no serial log)"


def run(args):
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    serial = os.path.join(out, "serial.log")
    live = os.path.join(out, "memory.live")
    for p in (serial, live):
        if os.path.exists(p):
            os.remove(p)
    sockdir = tempfile.mkdtemp(prefix="thaw-qmp-")  # unix socket paths must stay short
    qmp_path = os.path.join(sockdir, "qmp.sock")
    mem = f"{args.mem}M"
    # no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can miss its
    # ticks and panic ("IO-APIC + timer doesn't work"); seen on a 2-core CI machine.
    cmd = [
        args.qemu, "-nodefaults", "-no-user-config", "-no-reboot",
        "-machine", "pc,accel=tcg,memory-backend=mem", "-cpu", "max", "-smp", "1", "-m", mem,
        "-object", f"memory-backend-file,id=mem,size={mem},mem-path={live},share=on",
        "-kernel", args.kernel, "-initrd", args.initrd,
        "-drive", f"file={args.disk},format=raw,if=virtio,readonly=on",
        "-append", f"console=ttyS0 panic=-1 loglevel=4 no_timer_check {args.append}".strip(),
        "-display", "none", "-serial", f"file:{serial}", "-nic", "none",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]
    started = time.monotonic()
    deadline = started + args.timeout
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=set_pdeathsig)
    try:
        qmp = Qmp(qmp_path, deadline)
        warm_line = None
        while warm_line is None:
            if proc.poll() is not None:
                raise GuestError(f"QEMU exited ({proc.returncode}) before the guest was warm:\n"
                                 f"{proc.stdout.read().decode(errors='replace')}\n--- serial ---\n{tail(serial)}")
            try:
                with open(serial, "rb") as f:
                    log = f.read()
            except OSError:
                log = b""
            if FAILED in log:
                raise GuestError(f"the function failed in the guest:\n{tail(serial)}")
            for line in log.splitlines():
                if line.startswith(MARKER):
                    warm_line = line.decode(errors="replace").strip()
            if warm_line is None:
                if time.monotonic() > deadline:
                    raise GuestError(f"no warm marker within {args.timeout} s:\n{tail(serial)}")
                time.sleep(0.5)
        warm_at = time.monotonic() - started
        time.sleep(args.settle)  # let the guest go idle, as a platform snapshots an idle instance

        qmp.cmd("stop")
        if qmp.cmd("query-status")["status"] != "paused":
            raise GuestError("the guest did not pause")
        vmstate = os.path.join(out, "vmstate")
        qmp.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": True}])
        qmp.cmd("migrate", uri=f"exec:cat > '{vmstate}'")
        while True:
            status = qmp.cmd("query-migrate").get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise GuestError(f"saving the device state failed ({status})")
            if time.monotonic() > deadline + 120:
                raise GuestError("saving the device state timed out")
            time.sleep(0.2)
        subprocess.run(["cp", "--sparse=always", live, os.path.join(out, "memory")], check=True)
        try:
            qmp.cmd("quit")
        except GuestError:
            pass  # QEMU may close the socket before answering
        proc.wait(timeout=30)
        with open(os.path.join(out, "boot.json"), "w") as f:
            json.dump({"warm_line": warm_line, "seconds_to_warm": round(warm_at, 1),
                       "qemu_command": cmd}, f, indent=2)
            f.write("\n")
        print(f"  warm after {warm_at:.0f} s: {warm_line}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
        if os.path.exists(live):
            os.remove(live)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--disk", required=True, help="root disk image (attached read-only as /dev/vda)")
    ap.add_argument("--mem", type=int, default=256, help="guest RAM in MiB")
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=int, default=900, help="seconds until the guest must be warm")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds between warm and pause")
    ap.add_argument("--append", default="", help="extra kernel command line")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    args = ap.parse_args()
    # Turn SIGTERM/SIGINT into an exception so `finally` kills QEMU.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit("run_guest: stopped by signal"))
    try:
        run(args)
    except GuestError as e:
        sys.exit(f"run_guest: error: {e}")


if __name__ == "__main__":
    main()
