#!/usr/bin/env python3
"""Boot one corpus guest under QEMU (TCG) with file-backed RAM and snapshot it when warm.

Steps: start qemu-system-x86_64 with its RAM in a file (memory-backend-file, share=on), so
the file is a flat guest-physical memory image like a Firecracker memory file; wait for the
warm marker on the serial console; pause the guest (QMP `stop`); save the device state with
QEMU's migration stream minus guest RAM (`x-ignore-shared`) as the vmstate stand-in; copy the
RAM file sparsely; quit. QEMU never outlives this script (PDEATHSIG, kill on every exit path).

With --trace FILE it then records which pages of the memory file a restored guest touches
while it serves one request (fault_trace.py): a second QEMU restores the snapshot from the
saved vmstate onto a fresh copy of the memory file, held on a small loop-mounted filesystem
whose loop device does no readahead and whose page cache starts empty, so that the copy's
page residency (mincore) is exactly the pages the guest touched; the console sends the
function one request and the residency is sampled until the answer.

Usage: run_guest.py --kernel VMLINUZ --initrd CPIO --disk EXT4 --mem MIB --out DIR
                    [--timeout SEC] [--trace FILE]
Writes DIR/memory, DIR/vmstate, DIR/serial.log, DIR/boot.json (and FILE).
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

import fault_trace

MARKER = b"THAW-WARM"
FAILED = b"THAW-FAILED"
DONE = b"THAW-DONE"


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


def qemu_command(args, mem_path, qmp_path, serial):
    """The guest's QEMU command line, RAM in `mem_path`, the serial console as `serial`
    (QEMU's -serial syntax). A restore must use the same machine, so both runs take it here."""
    mem = f"{args.mem}M"
    # no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can miss its
    # ticks and panic ("IO-APIC + timer doesn't work"); seen on a 2-core CI machine.
    return [
        args.qemu, "-nodefaults", "-no-user-config", "-no-reboot",
        "-machine", "pc,accel=tcg,memory-backend=mem", "-cpu", "max", "-smp", "1", "-m", mem,
        "-object", f"memory-backend-file,id=mem,size={mem},mem-path={mem_path},share=on",
        "-kernel", args.kernel, "-initrd", args.initrd,
        "-drive", f"file={args.disk},format=raw,if=virtio,readonly=on",
        "-append", f"console=ttyS0 panic=-1 loglevel=4 no_timer_check {args.append}".strip(),
        "-display", "none", "-serial", serial, "-nic", "none",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]


def start_qemu(cmd, preexec=set_pdeathsig):
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=preexec)


def set_pdeathsig_no_hugepages():
    set_pdeathsig()
    fault_trace.refuse_hugepage_advice()


def stop_qemu(proc, qmp):
    """Asks QEMU to quit, then makes sure it is gone."""
    try:
        if qmp is not None:
            qmp.cmd("quit")
    except (GuestError, OSError):
        pass  # QEMU may close the socket before answering
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()


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
    cmd = qemu_command(args, live, qmp_path, f"file:{serial}")
    started = time.monotonic()
    deadline = started + args.timeout
    proc = start_qemu(cmd)
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
        stop_qemu(proc, qmp)
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
    if args.trace:
        trace(args, out)


def trace(args, out):
    """Restores the snapshot just saved in `out` and records the pages serving one request
    touches (fault_trace.py), written to args.trace."""
    sockdir = tempfile.mkdtemp(prefix="thaw-trace-")
    qmp_path = os.path.join(sockdir, "qmp.sock")
    console = os.path.join(sockdir, "console.sock")
    log = os.path.join(out, "serial-restore.log")
    deadline = time.monotonic() + args.timeout
    proc = qmp = recorder = None
    with fault_trace.ColdCopy(os.path.join(out, "memory"), os.path.join(out, "trace-fs")) as copy:
        # -S -incoming defer: the guest's state comes from the saved vmstate, with guest RAM
        # shared (x-ignore-shared) from the cold copy, and it stays paused until `cont`.
        serial = "chardev:console"
        cmd = qemu_command(args, copy.path, qmp_path, serial)
        cmd += ["-chardev", f"socket,id=console,path={console},server=on,wait=off,logfile={log}",
                "-S", "-incoming", "defer"]
        try:
            proc = start_qemu(cmd, set_pdeathsig_no_hugepages)
            qmp = Qmp(qmp_path, deadline)
            qmp.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": "x-ignore-shared", "state": True}])
            qmp.cmd("migrate-incoming", uri=f"exec:cat '{os.path.join(out, 'vmstate')}'")
            while True:
                status = (qmp.cmd("query-migrate") or {}).get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise GuestError(f"restoring the device state failed ({status})")
                if proc.poll() is not None:
                    raise GuestError(f"QEMU exited while restoring:\n{proc.stdout.read().decode(errors='replace')}")
                if time.monotonic() > deadline:
                    raise GuestError("restoring the device state timed out")
                time.sleep(0.05)
            con = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            con.connect(console)
            con.settimeout(1.0)
            recorder = fault_trace.Recorder(copy)
            recorder.start()
            qmp.cmd("cont")
            con.sendall(b"THAW-REQUEST 1\n")
            answer = b""
            while DONE not in answer:
                try:
                    data = con.recv(65536)
                except socket.timeout:
                    data = b""
                answer += data
                if FAILED in answer or proc.poll() is not None:
                    raise GuestError(f"the restored guest did not answer:\n{answer.decode(errors='replace')[-2000:]}")
                if time.monotonic() > deadline:
                    raise GuestError(f"no answer from the restored guest within {args.timeout} s:\n"
                                     f"{answer.decode(errors='replace')[-2000:]}")
            done_line = next(l for l in answer.splitlines() if l.startswith(DONE)).decode(errors="replace")
            recorder.stop()
            con.close()
            with open(args.trace, "w") as f:
                recorder.write(f, done_line)
            print(f"  trace: {recorder.summary()}; {done_line}")
        finally:
            if proc is not None:
                stop_qemu(proc, qmp)
            if recorder is not None:
                recorder.close()  # its mapping would keep the copy's filesystem busy
            shutil.rmtree(sockdir, ignore_errors=True)


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
    ap.add_argument("--trace", help="also record the pages one request touches after a restore, to this file")
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
