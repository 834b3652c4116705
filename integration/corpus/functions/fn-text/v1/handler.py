"""fn-text: a text-analytics function: tokenizing, counting, hashing and gzip."""

import collections
import gzip
import hashlib
import random
import re
import textwrap

WORDS = ("serverless snapshot memory restore chunk registry node cache scheduler kernel "
         "python runtime function cold warm latency bytes page zero dedup compress").split()
TOKEN = re.compile(r"[a-z]+")


def setup():
    return {"index": collections.Counter()}


def handle(event, state):
    rng = random.Random(event["id"])
    text = " ".join(rng.choice(WORDS) for _ in range(20000))
    paragraph = textwrap.fill(text, width=72)
    counts = collections.Counter(TOKEN.findall(paragraph))
    state["index"].update(counts)
    packed = gzip.compress(paragraph.encode(), compresslevel=6)
    return {"event": event["id"], "top": counts.most_common(5),
            "sha256": hashlib.sha256(packed).hexdigest(), "gzip_ratio": len(packed) / len(paragraph)}
