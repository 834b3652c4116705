#!/usr/bin/env python3
"""Drive oras-py (PyPI `oras`, pinned by scripts/install-test-deps.sh) against a registry.

Used by integration/tests/interop_oras.rs; runnable by hand against any plain-HTTP registry:

    oras_roundtrip.py roundtrip --registry 127.0.0.1:5000 --target thaw/snap:v1 --src DIR --dst DIR
    oras_roundtrip.py push      --registry 127.0.0.1:5000 --target thaw/snap:v1 --src DIR [--chunked]
    oras_roundtrip.py pull      --registry 127.0.0.1:5000 --target thaw/snap:v1 --dst DIR
    oras_roundtrip.py tags      --registry 127.0.0.1:5000 --repo thaw/snap [--n N]
    oras_roundtrip.py delete-tag --registry 127.0.0.1:5000 --target thaw/snap:v1

`push` uploads every regular file of DIR as one layer (title annotation = file name, thaw's
layer media type for the four snapshot files) with `info.json` as the config, the way a
thaw snapshot artifact is laid out. Each command prints one JSON object on stdout (oras-py
logs to stderr) and exits non-zero on any failure.
"""

import argparse
import json
import os
import sys

import oras.client
import oras.defaults

# The thaw snapshot artifact's media types (DESIGN.md, "Names").
LAYER_MEDIA_TYPES = {
    "memory": "application/vnd.thaw.snapshot.memory.v1",
    "vmstate": "application/vnd.thaw.snapshot.vmstate.v1",
    "disk.ext4": "application/vnd.thaw.snapshot.disk.v1",
    "info.json": "application/vnd.thaw.snapshot.info.v1+json",
}
CONFIG_FILE = "info.json"
CONFIG_MEDIA_TYPE = "application/vnd.thaw.snapshot.config.v1+json"
OTHER_MEDIA_TYPE = "application/octet-stream"


def client(registry):
    return oras.client.OrasClient(hostname=registry, insecure=True)


def full_target(registry, target):
    return f"{registry}/{target}"


def push(args):
    src = os.path.abspath(args.src)
    names = sorted(n for n in os.listdir(src) if os.path.isfile(os.path.join(src, n)))
    if not names:
        raise SystemExit(f"nothing to push: {src} holds no regular file")
    files = [f"{n}:{LAYER_MEDIA_TYPES.get(n, OTHER_MEDIA_TYPE)}" for n in names]
    config = f"{CONFIG_FILE}:{CONFIG_MEDIA_TYPE}" if CONFIG_FILE in names else None
    # oras-py requires pushed paths to lie under the working directory, and names each layer
    # by its path: run from inside the snapshot directory with bare file names.
    cwd = os.getcwd()
    os.chdir(src)
    try:
        response = client(args.registry).push(
            target=full_target(args.registry, args.target),
            files=files,
            manifest_config=config,
            manifest_annotations={"dev.thaw.test.client": "oras-py"},
            do_chunked=args.chunked,
            chunk_size=args.chunk_size,
            quiet=True,
        )
    finally:
        os.chdir(cwd)
    return {
        "files": names,
        "status": response.status_code,
        "docker_content_digest": response.headers.get("Docker-Content-Digest"),
        "location": response.headers.get("Location"),
    }


def pull(args):
    dst = os.path.abspath(args.dst)
    os.makedirs(dst, exist_ok=True)
    paths = client(args.registry).pull(target=full_target(args.registry, args.target), outdir=dst)
    return {"files": sorted(os.path.relpath(p, dst) for p in paths)}


def tags(args):
    found = client(args.registry).get_tags(full_target(args.registry, args.repo), N=args.n)
    return {"tags": found}


def delete_tag(args):
    # oras-py finds the manifest digest from the Docker-Content-Digest header of a HEAD
    # request, then deletes by digest: this fails if the registry omits that header.
    repo, _, tag = args.target.rpartition(":")
    deleted = client(args.registry).delete_tag(full_target(args.registry, repo), tag)
    if not deleted:
        raise SystemExit(f"oras-py could not delete {args.target}")
    return {"deleted": args.target}


def roundtrip(args):
    return {"push": push(args), "pull": pull(args)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, func, *options):
        sub = commands.add_parser(name)
        sub.add_argument("--registry", required=True, help="HOST:PORT, plain HTTP")
        for option in options:
            option(sub)
        sub.set_defaults(func=func)

    def target(sub):
        sub.add_argument("--target", required=True, help="REPO:TAG")

    def src(sub):
        sub.add_argument("--src", required=True)
        sub.add_argument("--chunked", action="store_true", help="POST, PATCH..., PUT upload")
        sub.add_argument("--chunk-size", type=int, default=oras.defaults.default_chunksize)

    def dst(sub):
        sub.add_argument("--dst", required=True)

    def repo(sub):
        sub.add_argument("--repo", required=True)
        sub.add_argument("--n", type=int, default=None, help="ask for at most N tags")

    command("push", push, target, src)
    command("pull", pull, target, dst)
    command("roundtrip", roundtrip, target, src, dst)
    command("tags", tags, repo)
    command("delete-tag", delete_tag, target)

    args = parser.parse_args()
    print(json.dumps(args.func(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
