"""fn-sqlite: an inventory function backed by a local SQLite database."""

import os
import random
import sqlite3
import tempfile


def setup():
    path = os.path.join(tempfile.gettempdir(), "inventory.db")
    if os.path.exists(path):
        os.remove(path)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE stock (sku TEXT PRIMARY KEY, warehouse TEXT, qty INTEGER, price REAL)")
    db.execute("CREATE TABLE moves (id INTEGER PRIMARY KEY, sku TEXT, delta INTEGER, note TEXT)")
    rng = random.Random(99)
    db.executemany("INSERT INTO stock VALUES (?, ?, ?, ?)",
                   ((f"SKU-{n:05d}", f"wh-{rng.randrange(12)}", rng.randrange(1000),
                     round(rng.uniform(1, 300), 2)) for n in range(8000)))
    db.execute("CREATE INDEX stock_wh ON stock (warehouse)")
    db.commit()
    return db


def handle(event, db):
    rng = random.Random(event["id"])
    moves = [(f"SKU-{rng.randrange(8000):05d}", rng.randint(-20, 20), f"event {event['id']}")
             for _ in range(500)]
    with db:
        db.executemany("INSERT INTO moves (sku, delta, note) VALUES (?, ?, ?)", moves)
        db.executemany("UPDATE stock SET qty = qty + ? WHERE sku = ?", ((d, s) for s, d, _ in moves))
    rows = db.execute(
        "SELECT warehouse, COUNT(*), SUM(qty), ROUND(SUM(qty * price), 2) FROM stock "
        "GROUP BY warehouse ORDER BY warehouse").fetchall()
    low = db.execute("SELECT COUNT(*) FROM stock WHERE qty < 10").fetchone()[0]
    return {"event": event["id"], "warehouses": rows, "low_stock": low}
