#!/usr/bin/env bash
# Installs the real OCI peers and clients that thaw's interop tests drive, and nothing else.
#
#   Debian: skopeo, docker-registry (distribution 2.8)
#   PyPI:   oras==0.2.43 (oras-py), into the `python3` found on PATH
#
# Idempotent: each component is checked first and only what is missing is installed, so on
# a provisioned machine it runs in well under a second, changes nothing, and needs no root.
# Installing needs root (it runs as root, without stdin, in CI) and the package registries.
# Nothing is cached outside the repository: apt deletes the .deb files it fetched, pip
# runs with --no-cache-dir.
set -euo pipefail

readonly APT_PACKAGES=(skopeo docker-registry)
readonly ORAS_VERSION=0.2.43
PYTHON=${PYTHON:-python3}

log() { printf 'install-test-deps: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {
  [[ $(id -u) -eq 0 ]] || die "$1 is missing and installing it needs root: run 'sudo $0'"
}

# --- Debian packages -------------------------------------------------------------------
apt_missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
    apt_missing+=("$pkg")
  fi
done
if ((${#apt_missing[@]} > 0)); then
  need_root "Debian package(s) ${apt_missing[*]}"
  log "installing Debian package(s): ${apt_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # docker-registry ships a system service (listening on :5000, all interfaces). The tests
  # start their own instances on 127.0.0.1, so keep the package from starting it: where no
  # policy-rc.d exists, one that denies every start is put in place for this install only.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  # The package lists are refreshed once, and only because something is to be installed.
  apt-get update -qq </dev/null
  apt-get install -y -qq --no-install-recommends \
    -o APT::Keep-Downloaded-Packages=false \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${apt_missing[@]}" </dev/null
else
  log "Debian packages present: ${APT_PACKAGES[*]}"
fi
command -v skopeo >/dev/null || die "skopeo is still not on PATH after installing it"
[[ -x /usr/bin/docker-registry ]] || die "/usr/bin/docker-registry is still missing after installing it"

# --- PyPI: oras-py ---------------------------------------------------------------------
command -v "$PYTHON" >/dev/null || die "$PYTHON not found: the interop tests need CPython 3 with pip"
oras_installed() {
  # Importable, and the pinned version (a different version is replaced, not trusted).
  "$PYTHON" -c 'import oras' >/dev/null 2>&1 &&
    [[ $("$PYTHON" -c 'import importlib.metadata as m; print(m.version("oras"))' 2>/dev/null) == "$ORAS_VERSION" ]]
}
if ! oras_installed; then
  need_root "PyPI package oras==$ORAS_VERSION"
  log "installing PyPI package oras==$ORAS_VERSION for $("$PYTHON" -c 'import sys; print(sys.executable)')"
  PIP_NO_INPUT=1 "$PYTHON" -m pip install --quiet --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
    "oras==$ORAS_VERSION" </dev/null
  oras_installed || die "oras==$ORAS_VERSION still not importable by $PYTHON after installing it"
else
  log "PyPI package present: oras==$ORAS_VERSION"
fi

# --- Garage (S3-compatible object store) -------------------------------------------------
# Reserved for the Garage issue: `cargo install garage --version 2.5.0 --locked` (~15 min
# here), skipped when `garage --version` already reports 2.5.0. Not installed yet.

log "all interop test dependencies present"
