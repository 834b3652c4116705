#!/usr/bin/env bash
# Builds and runs every cargo-fuzz target in fuzz/ for SECONDS each (default 30).
#
#   scripts/fuzz.sh [SECONDS]
#
# For each target it first replays the saved crashes in fuzz/regressions/<target>/ (if
# any), then fuzzes from the committed seeds in fuzz/corpus/<target>/ plus a working corpus
# in fuzz/target/corpus/<target>/ (kept between runs, never committed). It prints the
# executions of each target and exits non-zero, naming the targets, if any crashed; the
# crashing inputs are in fuzz/artifacts/<target>/.
#
# Everything it builds stays in fuzz/target/ (cargo-fuzz itself too, when missing). Safe to
# run as root, without a terminal or stdin.
#
# Environment:
#   FUZZ_TARGETS     space-separated subset of targets (default: all)
#   FUZZ_SANITIZER   address (default) or none
#   FUZZ_PROFILE     dev or release; default dev for runs of 60 s or less (a smoke run: the
#                    optimized, one-codegen-unit build of every dependency took most of a
#                    fresh machine's CI time), release for longer ones
#   FUZZ_LOCKED      1 (default): build with fuzz/Cargo.lock as committed; 0 lets cargo
#                    update it (after a dependency change in a thaw crate run
#                    `cargo update --manifest-path fuzz/Cargo.toml --workspace` and commit)
#   FUZZ_KEEP_CORPUS 1: merge new coverage into the committed seeds afterwards (cmin-style)
set -euo pipefail
exec </dev/null

secs="${1:-30}"
case "$secs" in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
fuzz="$root/fuzz"
target_dir="$fuzz/target"
unset CARGO_TARGET_DIR
# cargo-fuzz passes nightly-only flags (-Zsanitizer, sancov); the toolchain is stable.
export RUSTC_BOOTSTRAP=1

all_targets=(recipe_decode chunk_batch missing_query manifest_parse repo_name registry_routing extender_request
    auth_token authorization_header route_scope)
read -r -a targets <<<"${FUZZ_TARGETS:-${all_targets[*]}}"
sanitizer="${FUZZ_SANITIZER:-address}"
if [ "$secs" -le 60 ]; then default_profile=dev; else default_profile=release; fi
profile="${FUZZ_PROFILE:-$default_profile}"
case "$profile" in dev) profile_flag=--dev; profile_dir=debug ;; release) profile_flag=--release; profile_dir=release ;;
    *) echo "FUZZ_PROFILE must be dev or release, not $profile" >&2; exit 2 ;; esac

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked --target-dir "$target_dir/cargo-fuzz-install"
fi
echo "== $(cargo fuzz --version)"

if [ "${FUZZ_LOCKED:-1}" = 1 ]; then
    if ! cargo metadata --locked --format-version 1 --manifest-path "$fuzz/Cargo.toml" >/dev/null; then
        echo "fuzz/Cargo.lock is out of date; run: cargo update --manifest-path fuzz/Cargo.toml --workspace" >&2
        exit 1
    fi
fi

flags=(--sanitizer "$sanitizer" --target-dir "$target_dir" "$profile_flag")
triple="$(rustc -vV | sed -n 's/^host: //p')"
bin_dir="$target_dir/$triple/$profile_dir"

build_start=$(date +%s)
echo "== building all fuzz targets (sanitizer: $sanitizer, profile: $profile)"
cargo fuzz build "${flags[@]}"
echo "== built in $(( $(date +%s) - build_start )) s"

mkdir -p "$target_dir/logs"
failed=()
summary=()
for t in "${targets[@]}"; do
    bin="$bin_dir/$t"
    [ -x "$bin" ] || { echo "no fuzz target $t ($bin)" >&2; exit 1; }
    log="$target_dir/logs/$t.log"

    regressions=("$fuzz/regressions/$t"/*)
    if [ -e "${regressions[0]}" ]; then
        echo "== $t: replaying ${#regressions[@]} saved crash input(s) from fuzz/regressions/$t/"
        if ! "$bin" -runs=1 "${regressions[@]}" >"$log.regressions" 2>&1; then
            tail -n 30 "$log.regressions" >&2
            echo "!! $t: a saved crash input still fails (log: $log.regressions)" >&2
            failed+=("$t(regression)")
        fi
    fi

    work="$target_dir/corpus/$t"
    mkdir -p "$work" "$fuzz/artifacts/$t"
    echo "== $t: fuzzing for $secs s"
    status=0
    "$bin" -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 \
        -artifact_prefix="$fuzz/artifacts/$t/" "$work" "$fuzz/corpus/$t" >"$log" 2>&1 || status=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)"
    if [ "$status" -ne 0 ]; then
        tail -n 40 "$log" >&2
        echo "!! $t CRASHED (exit $status); input saved in fuzz/artifacts/$t/, log: $log" >&2
        failed+=("$t")
        summary+=("$(printf '%-18s CRASH  execs %s' "$t" "${execs:-?}")")
    else
        summary+=("$(printf '%-18s ok     execs %-10s (%s/s, %s, corpus %s)' "$t" "${execs:-?}" "${rate:-?}" "${cov:-cov: ?}" "$(ls "$work" | wc -l)")")
    fi
    if [ "${FUZZ_KEEP_CORPUS:-0}" = 1 ] && [ "$status" -eq 0 ]; then
        merged="$target_dir/merge/$t"
        rm -rf "$merged" && mkdir -p "$merged"
        "$bin" -merge=1 "$merged" "$fuzz/corpus/$t" "$work" >>"$log" 2>&1
        rm -rf "${fuzz:?}/corpus/$t" && mv "$merged" "$fuzz/corpus/$t"
    fi
done

echo "== summary ($secs s per target)"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "!! FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "== no crashes"
