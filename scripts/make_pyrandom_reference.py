"""Records CPython's random module output for the Rust port in src/util/pyrandom.rs.

Run from the repository root: python3 scripts/make_pyrandom_reference.py
Writes tests/data/pyrandom_reference.json.
"""
import json
import random
import sys

cases = []
for seed in [42, 0, 1, 12345, 2**32 + 7, 2**40 + 3]:
    r = random.Random(seed)
    bits = [r.getrandbits(32) for _ in range(5)]
    r = random.Random(seed)
    v = list(range(10))
    r.shuffle(v)
    r = random.Random(seed)
    w = list(range(1000))
    r.shuffle(w)
    cases.append({"seed": seed, "getrandbits32": bits, "shuffle10": v, "shuffle1000_head": w[:30]})
with open("tests/data/pyrandom_reference.json", "w") as f:
    json.dump({"python": sys.version.split()[0], "cases": cases}, f, indent=1)
