"""fn-json: an order-summary function that parses and serializes JSON documents.

Revision 2: also reports order-value statistics (one extra stdlib module, `statistics`).
"""

import json
import random
import statistics

CATALOG = None


def setup():
    rng = random.Random(1234)
    items = [{"sku": f"SKU-{n:05d}", "name": f"item {n}", "price": round(rng.uniform(1, 500), 2),
              "tags": rng.sample(["red", "blue", "green", "small", "large", "eco", "sale"], 3)}
             for n in range(3000)]
    global CATALOG
    CATALOG = {item["sku"]: item for item in items}
    return {"orders": []}


def make_order(rng, n):
    lines = [{"sku": f"SKU-{rng.randrange(3000):05d}", "qty": rng.randint(1, 9)}
             for _ in range(rng.randint(5, 40))]
    return json.dumps({"order_id": n, "customer": f"cust-{rng.randrange(10**6)}", "lines": lines})


def handle(event, state):
    rng = random.Random(event["id"])
    total = 0.0
    tags = {}
    values = []
    for n in range(200):
        order = json.loads(make_order(rng, event["id"] * 1000 + n))
        value = 0.0
        for line in order["lines"]:
            item = CATALOG[line["sku"]]
            value += item["price"] * line["qty"]
            for tag in item["tags"]:
                tags[tag] = tags.get(tag, 0) + line["qty"]
        total += value
        values.append(value)
        state["orders"].append(order)
    del state["orders"][:-2000]
    summary = {"event": event["id"], "total": round(total, 2), "tags": tags,
               "orders_kept": len(state["orders"]),
               "median_order": round(statistics.median(values), 2),
               "stdev_order": round(statistics.pstdev(values), 2)}
    return json.loads(json.dumps(summary, indent=2, sort_keys=True))
