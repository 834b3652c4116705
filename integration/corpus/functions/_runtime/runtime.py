"""A minimal function runtime, the stand-in for a FaaS platform's language runtime.

It loads /fn/handler.py, invokes it a number of times (the warm-up a platform does before it
snapshots a function), prints the warm marker on the console and then waits for the next
invocation, as a warm function instance does when its microVM is snapshotted: a line
`THAW-REQUEST <n>` on the console (its standard input) invokes the handler once more with
event id 1000 + n and prints `THAW-DONE id=<n> seconds=<s> result=<hash>`. make-corpus.sh
sends one to a restored copy of the snapshot to record which memory serving it touches.

Environment:
  THAW_TRACE=FILE  (host only) after the warm-up, write the files of every imported module
                   to FILE and exit; make-corpus.sh uses it to pick the stdlib subset.
"""

import importlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def module_files():
    """Files (sources and extension modules) of every module imported so far."""
    stdlib = os.path.dirname(os.__file__)
    files = set()
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None)
        spec = getattr(mod, "__spec__", None)
        if not path and spec is not None and spec.origin == "frozen":
            # Frozen stdlib modules still need their source on disk for tracebacks and for
            # Python's prefix detection (os.py is the landmark); ship the source file.
            parts = name.split(".")
            for candidate in (os.path.join(stdlib, *parts) + ".py",
                              os.path.join(stdlib, *parts, "__init__.py")):
                if os.path.exists(candidate):
                    path = candidate
                    break
        if path and os.path.exists(path):
            files.add(os.path.abspath(path))
    return sorted(files)


def main():
    with open(os.path.join(HERE, "function.json")) as f:
        meta = json.load(f)
    sys.path.insert(0, HERE)
    handler = importlib.import_module("handler")
    state = handler.setup() if hasattr(handler, "setup") else None

    started = time.monotonic()
    results = []
    for i in range(meta.get("warm_invocations", 20)):
        event = {"id": i, "function": meta["name"], "revision": meta["revision"]}
        results.append(handler.handle(event, state))
    elapsed = time.monotonic() - started
    digest = hash(json.dumps(results[-1], sort_keys=True, default=str)) & 0xFFFFFFFF

    trace = os.environ.get("THAW_TRACE")
    if trace:
        with open(trace, "w") as f:
            f.write("\n".join(module_files()) + "\n")
        return

    rss = "?"
    try:
        with open("/proc/self/status") as f:
            rss = next(line.split()[1] for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        pass
    print(f"THAW-WARM function={meta['name']} revision={meta['revision']} "
          f"invocations={len(results)} seconds={elapsed:.1f} rss_kib={rss} result={digest:08x}",
          flush=True)
    # A warm instance waits for its next request; the snapshot is taken now, with this
    # process blocked reading the console.
    serve(handler, state, meta)


def serve(handler, state, meta):
    """Answers `THAW-REQUEST <n>` lines from the console until it closes, then waits."""
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        words = line.split()
        if not words or words[0] != "THAW-REQUEST":
            continue
        n = int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
        started = time.monotonic()
        event = {"id": 1000 + n, "function": meta["name"], "revision": meta["revision"]}
        result = handler.handle(event, state)
        digest = hash(json.dumps(result, sort_keys=True, default=str)) & 0xFFFFFFFF
        print(f"THAW-DONE id={n} seconds={time.monotonic() - started:.3f} result={digest:08x}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
