#!/usr/bin/env bash
# THE test command for thaw: what CI runs (.ci/run) and what a developer runs before pushing.
#
#   1. install-test-deps  real OCI clients and peers the interop tests drive, and MinIO, etcd,
#                         kube-apiserver, kube-scheduler and kubectl built with Go (idempotent)
#   2. fmt                cargo fmt --all --check
#   3. clippy             every target, warnings are errors
#   4. schema-purity      thaw-schema's normal dependencies include no runtime/HTTP/storage/kube crate
#   5. corpus             integration/corpus/make-corpus.sh --quick: real guest snapshots (QEMU
#                         guests, made once into target/corpus-quick) and their recorded fault
#                         traces, for the cluster tests, the lazy-restore test replaying a real
#                         guest's faults (node-cache/tests/lazy.rs) and bench-smoke
#   6. test               cargo test --workspace --locked: unit, integration and interop tests, the
#                         cluster tests (integration/tests/cluster.rs, extender/tests/e2e.rs: a real
#                         etcd + kube-apiserver + kube-scheduler on loopback), and the S3 tests
#                         (storage conformance on memory/filesystem/MinIO, round trips, replicas,
#                         faults), each test binary with its own MinIO on loopback, and a
#                         distributed 4-process MinIO losing a node under two registry replicas
#   7. test-s3            the registry's black-box suites again with every registry on MinIO
#                         (THAW_TEST_STORAGE=s3): conformance, bad input, dedup
#   8. bench-smoke        the benchmark runner at --quick scale on the quick corpus: thaw, oras-py +
#                         docker-registry and whole-file S3 in one run, every restore checked
#                         byte for byte, the lazy restores' every page served by fault compared
#                         with the memory file (a wrong page fails the run), then the load test at --quick scale (16 clients, zero
#                         errors and zero corrupt pulls required); nothing timed is asserted
#   9. deploy-check       deploy/check.sh against a throwaway control plane (etcd, kube-apiserver,
#                         kube-scheduler built by install-test-deps from the Go module proxy):
#                         kubectl parses every manifest, structural checks of what thaw relies
#                         on, then `kubectl apply --dry-run=server` of every manifest
#  10. fuzz-smoke         scripts/fuzz.sh 10: every cargo-fuzz target (fuzz/) replays its saved
#                         crashes, then fuzzes 10 s from its seeds; any crash fails the run
#
# Exits non-zero at the first failing stage; prints how long each stage took either way.
set -euo pipefail

cd "$(dirname "$0")/.."
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
# Panics keep their backtraces; anyhow errors (the interop tests') print their context chain only.
export RUST_LIB_BACKTRACE=${RUST_LIB_BACKTRACE:-0}

stage_names=()
stage_secs=()
current_stage=""
stage_started=0
test_log=""

summary() {
  local status=$?
  if [[ -n $current_stage ]]; then
    stage_names+=("$current_stage (FAILED)")
    stage_secs+=($((SECONDS - stage_started)))
  fi
  printf '\n==> stage times\n'
  local i
  for i in "${!stage_names[@]}"; do
    printf '    %-30s %5ss\n' "${stage_names[$i]}" "${stage_secs[$i]}"
  done
  if ((status == 0)); then
    printf '==> all stages passed in %ss\n' "$SECONDS"
  else
    printf '==> FAILED (exit %s) after %ss\n' "$status" "$SECONDS"
  fi
  if [[ -n $test_log && -f $test_log ]]; then
    # Totals over every `test result:` line (unit, integration, interop and doc tests), as
    # the closing line, so the count is read the same whatever the stage output above.
    awk '/^test result: / {
           for (i = 1; i <= NF; i++) {
             if ($(i) ~ /^passed;?$/) p += $(i - 1)
             if ($(i) ~ /^failed;?$/) f += $(i - 1)
             if ($(i) ~ /^ignored;?$/) s += $(i - 1)
           }
         }
         END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$test_log"
    rm -f "$test_log"
  fi
}
trap summary EXIT

begin() {
  current_stage=$1
  stage_started=$SECONDS
  printf '\n==> [%s] %s\n' "$1" "$2"
}

end() {
  stage_names+=("$current_stage")
  stage_secs+=($((SECONDS - stage_started)))
  current_stage=""
}

begin install-test-deps "scripts/install-test-deps.sh"
bash scripts/install-test-deps.sh
end

begin fmt "cargo fmt --all --check"
cargo fmt --all --check
end

begin clippy "cargo clippy --workspace --all-targets --locked -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
end

begin schema-purity "cargo tree -p thaw-schema -e normal: no tokio, hyper, reqwest, object_store, kube"
forbidden=(tokio hyper reqwest object_store kube)
# One crate name per line (first field of `name vX.Y.Z (source)`), each once.
schema_deps=$(cargo tree -p thaw-schema -e normal --locked --prefix none | awk '{print $1}' | sort -u)
found=()
for crate in "${forbidden[@]}"; do
  if grep -qxF "$crate" <<<"$schema_deps"; then
    found+=("$crate")
  fi
done
if ((${#found[@]} > 0)); then
  echo "thaw-schema must stay pure, but its normal dependencies include: ${found[*]}" >&2
  for crate in "${found[@]}"; do
    echo "--- how $crate gets in:" >&2
    cargo tree -p thaw-schema -e normal --locked -i "$crate" >&2 || true
  done
  exit 1
fi
echo "thaw-schema: $(wc -l <<<"$schema_deps") crates in its normal dependency tree, none forbidden"
end

begin corpus "integration/corpus/make-corpus.sh --quick"
# Skips snapshots already built with the same settings; installs the Debian packages it needs
# (qemu-system-x86, a guest kernel, busybox) only when missing.
bash integration/corpus/make-corpus.sh --quick </dev/null
end

begin test "cargo test --workspace --locked"
test_log=$(mktemp)
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$test_log"
end

begin test-s3 "THAW_TEST_STORAGE=s3: the registry's conformance, bad input, dedup on MinIO"
# --workspace, not -p thaw-registry: the same feature unification as the test stage, so its
# build is reused (with -p, a fresh machine rebuilt the registry's dependencies: 12 minutes).
THAW_TEST_STORAGE=s3 cargo test --workspace --locked --no-fail-fast \
  --test conformance --test bad_input --test dedup_storage 2>&1 | tee -a "$test_log"
end

begin bench-smoke "bench --quick and loadtest --quick on the quick corpus"
# The test stage built the runner and the thaw and thaw-registry binaries it drives (each
# package with integration tests gets its binaries built), with the workspace's unified
# features: run them as they are rather than rebuild with `cargo run -p`'s feature set.
bin_dir=${CARGO_TARGET_DIR:-target}/debug
for b in bench loadtest thaw thaw-registry thaw-node-cache thaw-extender; do
  [[ -x $bin_dir/$b ]] || { echo "$bin_dir/$b is missing: the test stage should have built it" >&2; exit 1; }
done
"$bin_dir/bench" --quick </dev/null
# 16 clients pushing and pulling mixed snapshots for 15 s; exits non-zero on any error or
# corrupt pull. Writes its report under target/loadtest/, not over docs/benchmarks/load.md.
"$bin_dir/loadtest" --quick --registry-bin "$bin_dir/thaw-registry" </dev/null
end

begin deploy-check "deploy/check.sh against a throwaway API server: parse, structure, server-side dry run"
# The control-plane runner is built by the test stage (integration's binaries), like bench.
"${CARGO_TARGET_DIR:-target}/debug/control-plane" -- bash deploy/check.sh </dev/null
end

begin fuzz-smoke "scripts/fuzz.sh 10: every fuzz target for 10 s (cargo-fuzz installed if missing)"
bash scripts/fuzz.sh 10 </dev/null
end
