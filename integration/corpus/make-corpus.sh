#!/usr/bin/env bash
# Build thaw's snapshot corpus: real guest memory of small Linux VMs running Python functions.
#
# For each function revision: assemble a root filesystem (busybox-static, Debian's python3 and
# the stdlib modules the function imports, the function under /fn) as an ext4 image, boot it
# as the root drive of a qemu-system-x86_64 guest (TCG) whose RAM is a file (a small shared
# initramfs only loads virtio-blk and ext4 and switches to the disk, as a Firecracker guest
# boots from its root drive), wait until the function is warm, pause, and keep:
#
#   CORPUS/<function>/<revision>/memory     flat guest-physical RAM image (sparse; like a
#                                           Firecracker memory file)
#   CORPUS/<function>/<revision>/vmstate    QEMU device state (migration stream without RAM),
#                                           the stand-in for Firecracker's microVM state file
#   CORPUS/<function>/<revision>/disk.ext4  ext4 image of the function's root filesystem
#   CORPUS/<function>/<revision>/info.json  metadata (function, revision, sizes, kernel, ...)
#   CORPUS/<function>/<revision>.trace      the pages a restored guest touches serving one
#                                           request, in first-touch order (fault_trace.py)
#
# The trace is recorded right after the snapshot is saved: a second QEMU restores it onto a cold
# copy of the memory file (a loop-mounted ext4 with no readahead), the function gets one request
# on its console, and the copy's page residency is sampled until the answer.
# Boot logs go to CORPUS/.logs/. Revisions already built with the same settings (and traced)
# are skipped. Needs root for apt-get (only when something is missing), for mknod of
# /dev/console, and for the trace's loop device and mount.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

usage() {
    cat <<EOF
usage: $0 [--out DIR] [--mem MIB] [--quick] [--disk-size MIB] [--timeout SEC]
          [--kernel VMLINUZ] [--kaslr] [--only FUNCTION/REVISION]... [--force]

  --out DIR         corpus directory (default: $REPO/target/corpus, or
                    $REPO/target/corpus-quick with --quick)
  --mem MIB         guest RAM in MiB (default 256; 128 with --quick)
  --quick           small corpus: 2 functions + a second revision, 128 MiB guests
  --disk-size MIB   size of each ext4 image (default 64)
  --timeout SEC     seconds a guest may take to boot and warm up (default 900)
  --kernel PATH     guest kernel (default: newest /boot/vmlinuz-*, package linux-image-amd64);
                    its modules must be in /lib/modules/VERSION
  --kaslr           keep kernel address randomization (default: nokaslr, because Firecracker
                    boots an uncompressed vmlinux, which skips the decompressor's KASLR)
  --only F/R        build only this revision (repeatable), e.g. --only fn-json/v2
  --force           rebuild revisions that already exist
EOF
}

OUT="" MEM="" QUICK=0 DISK_MIB=64 TIMEOUT=900 KERNEL="" FORCE=0 ONLY=() APPEND=nokaslr
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --disk-size) DISK_MIB=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --kernel) KERNEL=$2; shift 2 ;;
        --only) ONLY+=("$2"); shift 2 ;;
        --force) FORCE=1; shift ;;
        --kaslr) APPEND=""; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "make-corpus: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

if [ "$QUICK" = 1 ]; then
    REVISIONS=(fn-json/v1 fn-json/v2 fn-sqlite/v1)
    MEM=${MEM:-128}
    OUT=${OUT:-$REPO/target/corpus-quick}
else
    REVISIONS=(fn-json/v1 fn-json/v2 fn-sqlite/v1 fn-http/v1 fn-text/v1)
    MEM=${MEM:-256}
    OUT=${OUT:-$REPO/target/corpus}
fi
if [ ${#ONLY[@]} -gt 0 ]; then REVISIONS=("${ONLY[@]}"); fi
case "$MEM" in ''|*[!0-9]*) echo "make-corpus: --mem must be a number of MiB" >&2; exit 2 ;; esac
if [ "$MEM" -lt 96 ]; then echo "make-corpus: --mem below 96 MiB will not fit the guest" >&2; exit 2; fi

log() { printf '%s make-corpus: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- dependencies: install only what is missing ------------------------------------------------
PYTHON=/usr/bin/python3
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v mke2fs >/dev/null || missing+=(e2fsprogs)
command -v cpio >/dev/null || missing+=(cpio)
command -v losetup >/dev/null || missing+=(mount)
command -v modprobe >/dev/null || missing+=(kmod)
[ -x "$PYTHON" ] || missing+=(python3)
BUSYBOX=$(command -v busybox || true)
if [ -z "$BUSYBOX" ] || ldd "$BUSYBOX" >/dev/null 2>&1; then missing+=(busybox-static); fi
if [ -z "$KERNEL" ] && ! ls /boot/vmlinuz-* >/dev/null 2>&1; then missing+=(linux-image-amd64); fi
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing packages ${missing[*]}; run as root or install them"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
        { apt-get update -qq && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; } ||
        die "apt-get install ${missing[*]} failed"
fi
BUSYBOX=$(command -v busybox)
[ "$(id -u)" = 0 ] || die "must run as root (the guest's /dev/console is made with mknod)"
if [ -z "$KERNEL" ]; then
    KERNEL=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
fi
[ -r "$KERNEL" ] || die "guest kernel $KERNEL not readable"
KVER=$(basename "$KERNEL"); KVER=${KVER#vmlinuz-}
KPKG=$(dpkg-query -S "$KERNEL" 2>/dev/null | cut -d: -f1 | head -n 1 || true)
KPKG_VERSION=$( [ -n "$KPKG" ] && dpkg-query -W -f='${Version}' "$KPKG" 2>/dev/null || true)
QEMU_VERSION=$(qemu-system-x86_64 --version | head -n 1)

# --- build --------------------------------------------------------------------------------------
mkdir -p "$OUT/.logs"
OUT=$(cd "$OUT" && pwd)
WORK="$OUT/.work"
GUEST_PID=""
cleanup() {
    # run_guest.py kills its QEMU on any exit (and QEMU dies with it through PDEATHSIG).
    if [ -n "$GUEST_PID" ]; then kill "$GUEST_PID" 2>/dev/null || true; wait "$GUEST_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

built=0 skipped=0
t0=$(date +%s)
# A revision built with other settings is rebuilt.
BUILD_KEY="mem=${MEM}M disk=${DISK_MIB}M/ext4-4k kernel=$KVER append=$APPEND"
# The boot stage is the same for every guest: rebuilt each run (it takes a second).
BOOT="$OUT/.boot"
"$PYTHON" "$HERE/build_bootfs.py" --kernel-version "$KVER" --busybox "$BUSYBOX" --out "$BOOT/tree" >&2
(cd "$BOOT/tree" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 --reproducible) \
    > "$BOOT/initramfs.cpio"
for fr in "${REVISIONS[@]}"; do
    fn=${fr%%/*} rev=${fr#*/}
    [ -d "$HERE/functions/$fn/$rev" ] || die "unknown function revision $fr (no $HERE/functions/$fn/$rev)"
    dest="$OUT/$fn/$rev"
    # The function's code and the runtime are part of the key: a change rebuilds the guest.
    key="$BUILD_KEY code=$(cat "$HERE/functions/_runtime/runtime.py" "$HERE/functions/$fn/$rev"/*.py | sha256sum | cut -c1-12)"
    if [ "$FORCE" = 0 ] && [ -f "$dest/info.json" ] && [ -s "$dest.trace" ] &&
        [ "$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("build_key"))' "$dest/info.json" 2>/dev/null)" = "$key" ]; then
        log "$fr: already built ($key), skipping"
        skipped=$((skipped + 1))
        continue
    fi
    log "$fr: building (guest RAM $MEM MiB, kernel $KVER)"
    t1=$(date +%s)
    rm -rf "$WORK"; mkdir -p "$WORK/snap"
    "$PYTHON" "$HERE/build_rootfs.py" --functions "$HERE/functions" --function "$fn" --revision "$rev" \
        --python "$PYTHON" --busybox "$BUSYBOX" --out "$WORK/rootfs" >&2
    # The function's root filesystem as an ext4 image: the guest's root drive and the
    # snapshot's disk file. UUID and hash seed are derived from function and revision, and
    # timestamps fixed, so that a rebuild of the same tree differs only in a few metadata blocks
    # (measured: 0.1 MiB of fn-json's 13.5 MiB). 4 KiB blocks as on any real root filesystem
    # (mke2fs would pick 1 KiB for an image this small, which no 4 KiB chunker lines up with).
    uuid=$("$PYTHON" -c 'import sys, uuid; print(uuid.uuid5(uuid.NAMESPACE_URL, "thaw-corpus/" + sys.argv[1]))' "$fr")
    truncate -s "${DISK_MIB}M" "$WORK/snap/disk.ext4"
    E2FSPROGS_FAKE_TIME=1700000000 mke2fs -q -F -t ext4 -b 4096 -I 256 -L "$fn" -U "$uuid" \
        -E "hash_seed=$uuid,root_owner=0:0" -d "$WORK/rootfs" "$WORK/snap/disk.ext4" ||
        die "$fr: mke2fs failed (is --disk-size $DISK_MIB large enough for $(du -sm "$WORK/rootfs" | cut -f1) MiB?)"

    # In the background and waited for, so that a signal to this script is handled at once.
    "$PYTHON" "$HERE/run_guest.py" --kernel "$KERNEL" --initrd "$BOOT/initramfs.cpio" \
        --disk "$WORK/snap/disk.ext4" --mem "$MEM" --timeout "$TIMEOUT" --append "$APPEND" \
        --out "$WORK/boot" --trace "$WORK/trace" >&2 &
    GUEST_PID=$!
    wait "$GUEST_PID" && GUEST_PID="" ||
        { GUEST_PID=""; cp "$WORK/boot/serial.log" "$OUT/.logs/$fn-$rev.serial.log" 2>/dev/null || true
          cp "$WORK/boot/serial-restore.log" "$OUT/.logs/$fn-$rev.serial-restore.log" 2>/dev/null || true
          die "$fr: guest boot or trace failed (serial logs: $OUT/.logs/$fn-$rev.serial*.log)"; }
    mv "$WORK/boot/memory" "$WORK/boot/vmstate" "$WORK/snap/"
    cp "$WORK/boot/serial.log" "$OUT/.logs/$fn-$rev.serial.log"
    cp "$WORK/boot/serial-restore.log" "$OUT/.logs/$fn-$rev.serial-restore.log"
    cp "$WORK/boot/boot.json" "$OUT/.logs/$fn-$rev.boot.json"

    "$PYTHON" - "$WORK/snap" "$fn" "$rev" "$MEM" "$KVER" "$KPKG" "$KPKG_VERSION" "$QEMU_VERSION" \
        "$WORK/boot/boot.json" "$WORK/rootfs/fn/modules.txt" "$(( $(date +%s) - t1 ))" "$key" <<'EOF'
import datetime, json, os, sys
snap, fn, rev, mem, kver, kpkg, kpkg_version, qemu, boot, modules, seconds, build_key = sys.argv[1:]
boot = json.load(open(boot))
files = {}
for name in ("memory", "vmstate", "disk.ext4"):
    st = os.stat(os.path.join(snap, name))
    files[name] = {"size": st.st_size, "allocated": st.st_blocks * 512}
info = {
    "function": fn,
    "revision": rev,
    "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "guest_mem_mib": int(mem),
    "kernel": kver,
    "kernel_package": f"{kpkg} {kpkg_version}".strip(),
    "hypervisor": qemu + " (TCG, pc machine, 1 vCPU, memory-backend-file share=on)",
    "kernel_cmdline": boot["qemu_command"][boot["qemu_command"].index("-append") + 1],
    "root": "disk.ext4 as virtio-blk /dev/vda, ext4 mounted read-only",
    "runtime": "Debian python3 " + sys.version.split()[0],
    "stdlib_files": sum(1 for line in open(modules) if line.strip()),
    "warm": boot["warm_line"],
    "seconds_to_warm": boot["seconds_to_warm"],
    "build_seconds": int(seconds),
    "build_key": build_key,
    "files": files,
    "vmstate_format": "QEMU migration stream with capability x-ignore-shared: device and CPU "
                      "state plus firmware ROM blocks, guest RAM excluded",
}
with open(os.path.join(snap, "info.json"), "w") as f:
    json.dump(info, f, indent=2)
    f.write("\n")
EOF
    rm -rf "$dest" "$dest.trace"; mkdir -p "$(dirname "$dest")"
    mv "$WORK/snap" "$dest"
    mv "$WORK/trace" "$dest.trace"
    rm -rf "$WORK"
    built=$((built + 1))
    log "$fr: done in $(( $(date +%s) - t1 )) s: $(du -h --apparent-size "$dest/memory" | cut -f1) memory ($(du -h "$dest/memory" | cut -f1) non-zero), $(du -h "$dest/disk.ext4" | cut -f1) disk, trace of $(grep -c '^[0-9]' "$dest.trace") pages"
done
log "corpus $OUT: $built built, $skipped skipped in $(( $(date +%s) - t0 )) s"
echo "$OUT"
