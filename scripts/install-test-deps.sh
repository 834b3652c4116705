#!/usr/bin/env bash
# Installs the real OCI peers and clients that thaw's interop tests drive, and the real S3
# server its storage tests run against, and nothing else.
#
#   Debian:    skopeo, docker-registry (distribution 2.8), faketime (libfaketime: registry
#              replicas with a skewed clock, registry/tests/s3_gc_replicas.rs)
#   PyPI:      oras==0.2.43 (oras-py), into the `python3` found on PATH
#   Go:        MinIO (the S3 server the tests run against), built by `go install` into
#              ~/.cache/thaw-tools/minio-<version>/ (Garage only with THAW_S3_SERVER=garage)
#
# Idempotent: each component is checked first and only what is missing is installed, so on
# a provisioned machine it runs in well under a second, changes nothing, and needs no root.
# Installing needs root (it runs as root, without stdin, in CI) and the package registries;
# MinIO needs Go and builds from source (about 10 minutes on 2 cores) into
# ~/.cache/thaw-tools, with Go's module and build caches beside it. Nothing else is cached
# outside the repository: apt deletes the .deb files it fetched, pip runs with --no-cache-dir.
set -euo pipefail

readonly APT_PACKAGES=(skopeo docker-registry faketime)
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
command -v faketime >/dev/null || die "faketime is still not on PATH after installing it"

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

# --- MinIO (the S3 server of record) -----------------------------------------------------
# The S3 tests (registry/tests/s3_*.rs, storage_conformance.rs, the THAW_TEST_STORAGE=s3
# stage, the benchmark's S3 baseline) start their own MinIO on loopback
# (registry/tests/common/minio.rs). It is built from source with Go, once per machine, into
# ~/.cache/thaw-tools/minio-<version>/minio, which is where the tests look first ($THAW_MINIO
# overrides). The Go module and build caches live under ~/.cache/thaw-tools/go/ too, so a
# rebuild (or another tool built with Go) downloads and compiles nothing twice. The proxy
# serves no release tags for github.com/minio/minio, so the version is a pinned
# pseudo-version (the same string as MINIO_VERSION in registry/tests/common/minio.rs).
readonly MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c
minio_tools_dir=${THAW_TOOLS_DIR:-$HOME/.cache/thaw-tools}
minio_bin_dir=$minio_tools_dir/minio-$MINIO_VERSION
if [[ -x $minio_bin_dir/minio ]]; then
  log "MinIO present: $minio_bin_dir/minio"
else
  command -v go >/dev/null ||
    die "MinIO $MINIO_VERSION is missing and building it needs Go (1.24 or newer) on PATH: install Go from https://go.dev/dl/ and run this again"
  log "building MinIO $MINIO_VERSION with 'go install' into $minio_bin_dir" \
    "(about 10 minutes on 2 cores the first time; the Go caches under $minio_tools_dir/go are kept)"
  mkdir -p "$minio_bin_dir" "$minio_tools_dir/go/mod" "$minio_tools_dir/go/build" "$minio_tools_dir/go/path"
  CGO_ENABLED=0 GOBIN=$minio_bin_dir GOFLAGS=-modcacherw \
    GOMODCACHE=$minio_tools_dir/go/mod GOCACHE=$minio_tools_dir/go/build GOPATH=$minio_tools_dir/go/path \
    go install "github.com/minio/minio@$MINIO_VERSION" </dev/null
  [[ -x $minio_bin_dir/minio ]] || die "go install finished but $minio_bin_dir/minio is missing"
fi

# --- Garage (optional, THAW_S3_SERVER=garage) ----------------------------------------------
# Not installed by default: `cargo install garage` builds for ~15 minutes on 2 cores, and no
# test needs it. THAW_S3_SERVER=garage installs Garage 2.5.0 into $CARGO_HOME/bin for
# running an S3 server by hand against a registry (`garage server --single-node`).
if [[ ${THAW_S3_SERVER:-minio} == garage ]]; then
  readonly GARAGE_VERSION=2.5.0
  garage_bin=${CARGO_HOME:-$HOME/.cargo}/bin/garage
  if [[ -x $garage_bin ]] && [[ $("$garage_bin" --version 2>/dev/null </dev/null) == *":$GARAGE_VERSION "* ]]; then
    log "Garage present: $garage_bin"
  else
    command -v cargo >/dev/null || die "THAW_S3_SERVER=garage needs cargo on PATH"
    log "installing Garage $GARAGE_VERSION with 'cargo install garage --version $GARAGE_VERSION --locked' (~15 minutes)"
    cargo install garage --version "$GARAGE_VERSION" --locked </dev/null
  fi
elif [[ ${THAW_S3_SERVER:-minio} != minio ]]; then
  die "THAW_S3_SERVER=$THAW_S3_SERVER: use minio (the default) or garage"
fi

# --- Kubernetes control plane: etcd, kube-apiserver, kube-scheduler, kubectl (Go) ---------
# The cluster tests (integration/tests/cluster*.rs, extender/tests/e2e.rs) and deploy/check.sh
# start a real control plane on loopback (integration/src/control_plane.rs). Built here from
# the Go module proxy, never downloaded as binaries, through the wrapper modules committed at
# integration/k8s/ (k8s.io/kubernetes, staging modules replaced by their published v0.X.Y;
# regenerate with integration/k8s/generate.sh) and integration/etcd/ (etcdmain). Each is
# built once per machine into ~/.cache/thaw-tools/<name>-<version>/ and skipped when there;
# the Go module and build caches live in ~/.cache/thaw-tools/go/, so a rebuild is cheap.
# Cold, on 2 shared cores: etcd about 2 minutes, the three Kubernetes commands about 20.
# Needs Go (>= 1.26, for etcd 3.6.16) on PATH or in /usr/local/go/bin; no root.
readonly K8S_VERSION=v1.34.4
readonly ETCD_VERSION=v3.6.16
K8S_TOOLS_DIR=${THAW_TOOLS_DIR:-$HOME/.cache/thaw-tools}
K8S_REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

k8s_go() {
  local go
  go=$(command -v go || true)
  [[ -n $go ]] || go=/usr/local/go/bin/go
  [[ -x $go ]] || die "Go is missing: the control-plane tests build etcd and Kubernetes from the Go module proxy"
  GOMODCACHE=$K8S_TOOLS_DIR/go/mod GOCACHE=$K8S_TOOLS_DIR/go/build GOPATH=$K8S_TOOLS_DIR/go/path \
    GOFLAGS=-modcacherw GOTOOLCHAIN=local CGO_ENABLED=0 "$go" "$@"
}

# k8s_build NAME-VERSION MODULE_DIR LDFLAGS PACKAGE...: builds into a temporary directory and
# renames it into place, so an interrupted build never leaves a directory that looks done.
k8s_build() {
  local dest=$K8S_TOOLS_DIR/$1 module=$2 ldflags=$3 started=$SECONDS
  shift 3
  rm -rf "$dest.partial"
  mkdir -p "$dest.partial"
  log "building $* ($(basename "$dest")) from the Go module proxy; cold, this takes minutes"
  (cd "$module" && k8s_go build -mod=readonly -trimpath -ldflags "-s -w $ldflags" -o "$dest.partial/" "$@") </dev/null
  rm -rf "$dest"
  mv "$dest.partial" "$dest"
  log "built $(basename "$dest") in $((SECONDS - started))s"
}

if [[ -x $K8S_TOOLS_DIR/etcd-$ETCD_VERSION/etcd ]]; then
  log "etcd present: $K8S_TOOLS_DIR/etcd-$ETCD_VERSION/etcd"
else
  k8s_build "etcd-$ETCD_VERSION" "$K8S_REPO_DIR/integration/etcd" "" .
fi
k8s_bins=(kube-apiserver kube-scheduler kubectl)
k8s_complete=1
for b in "${k8s_bins[@]}"; do [[ -x $K8S_TOOLS_DIR/kubernetes-$K8S_VERSION/$b ]] || k8s_complete=0; done
if ((k8s_complete)); then
  log "Kubernetes present: ${k8s_bins[*]} in $K8S_TOOLS_DIR/kubernetes-$K8S_VERSION"
else
  grep -q "^require k8s.io/kubernetes $K8S_VERSION\$" "$K8S_REPO_DIR/integration/k8s/go.mod" ||
    die "integration/k8s/go.mod is not at $K8S_VERSION: run integration/k8s/generate.sh $K8S_VERSION"
  # The version the binaries report (kubectl version, /version), as a release build sets it.
  minor=${K8S_VERSION#v1.}
  minor=${minor%%.*}
  k8s_build "kubernetes-$K8S_VERSION" "$K8S_REPO_DIR/integration/k8s" \
    "-X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION" \
    "${k8s_bins[@]/#/k8s.io/kubernetes/cmd/}"
fi

log "all interop and S3 test dependencies present"
