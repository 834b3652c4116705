"""Recording which pages of a memory file a restored guest touches (run_guest.py --trace).

The guest's RAM is a shared mapping of a file (QEMU's memory-backend-file, share=on). Every
page the guest (or QEMU on its behalf) reads or writes must then be in the page cache of that
file, and nothing else is, provided that

- the file's page cache starts empty: the copy is written to a filesystem of its own (ext4 on
  a loop device over an image file) which is then unmounted and mounted again, which evicts
  every page of it;
- no readahead adds pages nobody touched: the loop device's `read_ahead_kb` is 0 before the
  file is opened, so a page fault on the mapping reads exactly its page (the kernel's mmap
  readahead takes its window from the device; fault-around only maps pages already cached);
- no huge-page readahead either: QEMU advises `MADV_HUGEPAGE` on all guest RAM, and on a
  file mapping so advised the kernel reads the whole 2 MiB around a fault, readahead
  disabled or not (measured: residency came in 512-page blocks, 78% of memory for one
  request). QEMU is therefore started under a seccomp filter that fails exactly
  `madvise(…, MADV_HUGEPAGE)` with EINVAL, which QEMU ignores (`refuse_hugepage_advice`);
- nothing else reads the file: the only other mapping is the recorder's own, which never
  touches a page and only asks `mincore(2)`.

`mincore` on the recorder's mapping then answers the set of touched pages. Sampled every
~millisecond while the guest runs, it also gives their order: a page is listed at the sample
in which it was first seen resident (pages first seen in one sample are listed by address).
Under TCG a guest runs tens of times slower than on KVM, so one sample spans little guest
work. Pages resident before the guest is resumed (QEMU's own touches while loading the
device state) are listed first, at 0 ms.

Format (text, one record per line; `#` lines are comments):

    # thaw-fault-trace v1
    page_size=4096
    memory_size=134217728
    ... more key=value lines (function, method, timings) ...
    PAGE MS
    PAGE MS

`PAGE` is a page index into the memory file (its byte offset divided by page_size; with
QEMU's `pc` machine and under 3 GiB of RAM the file offset is the guest-physical address),
`MS` the milliseconds from resume to the sample that first saw it resident. Pages are in
first-touch order and each appears once.
"""

import ctypes
import os
import re
import subprocess
import threading
import time

PAGE = 4096
PROT_READ = 1
MAP_SHARED = 1
# Extra room in the loop filesystem beyond the memory file (ext4 metadata, no journal).
FS_SLACK = 32 << 20

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_BIT0 = bytes(b & 1 for b in range(256))


class TraceError(Exception):
    pass


def refuse_hugepage_advice():
    """In a child before exec: a seccomp filter (inherited by the program it execs) that
    fails `madvise(addr, len, MADV_HUGEPAGE)` with EINVAL and allows everything else."""
    import struct
    ld_abs, jeq, ret = 0x20, 0x15, 0x06
    audit_arch_x86_64, nr_madvise, madv_hugepage = 0xC000003E, 28, 14
    ret_errno_einval, ret_allow = 0x00050000 | 22, 0x7FFF0000
    program = [
        (ld_abs, 0, 0, 4),                   # seccomp_data.arch
        (jeq, 0, 5, audit_arch_x86_64),      # another ABI: allow
        (ld_abs, 0, 0, 0),                   # seccomp_data.nr
        (jeq, 0, 3, nr_madvise),             # another call: allow
        (ld_abs, 0, 0, 32),                  # seccomp_data.args[2], low word: the advice
        (jeq, 0, 1, madv_hugepage),
        (ret, 0, 0, ret_errno_einval),
        (ret, 0, 0, ret_allow),
    ]
    filters = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *f) for f in program))
    fprog = struct.pack("=HxxxxxxQ", len(program), ctypes.addressof(filters))
    fprog_buf = ctypes.create_string_buffer(fprog)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    word = ctypes.c_ulong
    if _libc.prctl(pr_set_no_new_privs, word(1), word(0), word(0), word(0)) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if _libc.prctl(pr_set_seccomp, word(seccomp_mode_filter), word(ctypes.addressof(fprog_buf)),
                   word(0), word(0)) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def _run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise TraceError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r.stdout.strip()


class ColdCopy:
    """A copy of `memory` on a loop-mounted ext4 of its own under `work`, with no readahead
    and nothing of it in the page cache. A context manager: unmounts and detaches on exit."""

    def __init__(self, memory, work):
        self.memory = memory
        self.work = work
        self.loop = None
        self.mounted = False
        self.mnt = os.path.join(work, "mnt")
        self.path = os.path.join(self.mnt, "memory")
        self.size = os.path.getsize(memory)

    def __enter__(self):
        try:
            self._setup()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _setup(self):
        os.makedirs(self.mnt, exist_ok=True)
        image = os.path.join(self.work, "fs.img")
        with open(image, "wb") as f:
            f.truncate(self.size + FS_SLACK)
        _run("mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "^has_journal", image)
        # Direct I/O on the backing file: the image's bytes do not linger in the host's page
        # cache a second time (it does not change what is resident in the copy's).
        self.loop = _run("losetup", "--find", "--show", "--direct-io=on", image)
        with open(f"/sys/block/{os.path.basename(self.loop)}/queue/read_ahead_kb", "w") as f:
            f.write("0\n")
        self._mount()
        _run("cp", "--sparse=always", self.memory, self.path)
        os.sync()
        # Unmounting evicts every cached page of the filesystem: the copy starts cold.
        _run("umount", self.mnt)
        self.mounted = False
        self._mount()
        ra = open(f"/sys/block/{os.path.basename(self.loop)}/queue/read_ahead_kb").read().strip()
        if ra != "0":
            raise TraceError(f"{self.loop} has read_ahead_kb {ra}, not 0")

    def _mount(self):
        _run("mount", "-t", "ext4", self.loop, self.mnt)
        self.mounted = True

    def __exit__(self, *exc):
        if self.mounted:
            if subprocess.run(["umount", self.mnt], capture_output=True).returncode != 0:
                # Still busy (a process holding the copy): detach it now, gone when released.
                subprocess.run(["umount", "--lazy", self.mnt], capture_output=True)
            self.mounted = False
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            self.loop = None
        subprocess.run(["rm", "-rf", self.work], capture_output=True)
        return False


class Recorder:
    """Samples the residency of a ColdCopy's pages from a thread of its own."""

    def __init__(self, copy, interval=0.0005):
        self.copy = copy
        self.interval = interval
        self.pages = copy.size // PAGE
        self.fd = os.open(copy.path, os.O_RDONLY)
        self.addr = _libc.mmap(None, copy.size, PROT_READ, MAP_SHARED, self.fd, 0)
        if self.addr in (None, ctypes.c_void_p(-1).value):
            raise TraceError(f"mmap of {copy.path} failed: {os.strerror(ctypes.get_errno())}")
        self.vec = (ctypes.c_ubyte * self.pages)()
        self.seen = 0  # bit i (from the top) set: page i seen resident
        self.order = []  # (page, ms)
        self.samples = 0
        self.before = 0
        self.resumed = None
        self.stopped_ms = None
        self._stop = threading.Event()
        self._thread = None
        # What is resident before the guest runs: QEMU's own touches while it loaded the state.
        self._sample(0.0)
        self.before = len(self.order)

    def _residency(self):
        if _libc.mincore(ctypes.c_void_p(self.addr), self.copy.size, self.vec) != 0:
            raise TraceError(f"mincore failed: {os.strerror(ctypes.get_errno())}")
        return bytes(self.vec).translate(_BIT0)

    def _sample(self, ms):
        now = int.from_bytes(self._residency(), "big")
        new = now & ~self.seen
        self.samples += 1
        if new:
            self.seen |= new
            for m in re.finditer(b"\x01", new.to_bytes(self.pages, "big")):
                self.order.append((m.start(), ms))

    def start(self):
        """Call just before the guest is resumed."""
        self.resumed = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            self._sample((time.monotonic() - self.resumed) * 1e3)
            time.sleep(self.interval)

    def stop(self):
        """Call once the answer is in: takes a last sample and stops."""
        self._stop.set()
        self._thread.join()
        self.stopped_ms = (time.monotonic() - self.resumed) * 1e3
        self._sample(self.stopped_ms)
        self.close()

    def close(self):
        """Unmaps the copy (idempotent); stops the sampling first if it still runs."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self.fd is not None:
            _libc.munmap(ctypes.c_void_p(self.addr), self.copy.size)
            os.close(self.fd)
            self.fd = None

    def summary(self):
        return (f"{len(self.order)} pages ({len(self.order) * PAGE / (1 << 20):.1f} MiB, "
                f"{100 * len(self.order) / self.pages:.1f}% of memory) touched from resume to answer "
                f"in {self.stopped_ms:.0f} ms, {self.samples} samples")

    def write(self, f, done_line):
        f.write("# thaw-fault-trace v1\n")
        f.write("# Pages of the memory file a restored guest touched from resume until it answered\n"
                "# one request, in first-touch order (integration/corpus/fault_trace.py):\n"
                "# PAGE (index: byte offset / page_size) MS (first seen resident, ms after resume)\n")
        f.write(f"page_size={PAGE}\n")
        f.write(f"memory_size={self.copy.size}\n")
        f.write(f"pages={len(self.order)}\n")
        f.write(f"pages_before_resume={self.before}\n")
        f.write(f"resume_to_answer_ms={self.stopped_ms:.0f}\n")
        f.write(f"samples={self.samples}\n")
        f.write("method=mincore of a cold copy on a loop-mounted ext4, read_ahead_kb=0, "
                "QEMU -incoming from the saved vmstate (x-ignore-shared), TCG\n")
        f.write(f"answer={done_line.strip()}\n")
        for page, ms in self.order:
            f.write(f"{page} {ms:.1f}\n")
