"""Embedding lookup time: an x16 table (native-op import) against 8-bit rows (MatMulNBits import).

Needs the two imports bench/native_decode.py makes of the synthetic 0.5B Q4_K_M llama. Fresh random ids
each run (cold pages, as a new prompt), the two tables alternating; median and min of 21 runs.

    PYTHONPATH=. .venv/bin/python bench/embedding_lookup.py
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from llmos.engine.embedding import EmbeddingTable
from llmos.manifest import ModelManifest

STORE = Path.home() / ".cache/llmos/bench/native_decode"
MODELS = {
    "x16 (native)": "llama-0.5b-r1-s0-q4_k_m-native--int4",
    "8-bit rows": "llama-0.5b-r1-s0-q4_k_m-nbits--int4",
}


def main() -> None:
    tables = {}
    for label, name in MODELS.items():
        m = ModelManifest.read(STORE / name)
        tables[label] = EmbeddingTable(STORE / name, m.embedding, m.embedding_type)
    rng = np.random.default_rng(0)
    for n in (1, 1000):
        times: dict[str, list[float]] = {k: [] for k in tables}
        for _ in range(21):
            ids = rng.integers(0, next(iter(tables.values())).n_vocab, (n, 1))
            for k, t in tables.items():
                t0 = time.perf_counter()
                t.lookup(ids)
                times[k].append(time.perf_counter() - t0)
        for k, v in times.items():
            print(f"{k:13s} {n:5d} ids: median {np.median(v) * 1e3:7.3f} ms, min {min(v) * 1e3:7.3f} ms")


if __name__ == "__main__":
    main()
