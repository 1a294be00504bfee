"""This machine's memory bandwidth as plain numpy sees it: the ceiling for a memory-bound decode step.

Measures, on a buffer far larger than any cache (default 1 GiB, touched once before timing):

* read, 1 thread and N threads: `np.bitwise_or.reduce` over uint64 views, each thread on its own
  contiguous slice (numpy releases the GIL in the loop). An integer OR does almost no arithmetic per
  byte, so this is load bandwidth, not a float-summation speed.
* copy, N threads: `np.copyto` slice by slice; bytes counted = read + written (the write-allocate read
  of the destination is not counted, so the true traffic is higher).

Best of `--reps` (default 5) for each. Run as a child of bench/engine_sizes.py (config JSON on stdin, a
BENCH_RESULT line out), or alone: `python bench/membw.py [--mb 1024] [--threads 2] [--reps 5]`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import _common
import numpy as np


def _best(fn: Any, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(mb: int = 1024, threads: int = 2, reps: int = 5) -> dict[str, Any]:
    """GB/s (1e9 bytes/s) for read at 1 and `threads` threads and copy at `threads` threads."""
    n = mb * (1 << 20) // 8
    src = np.ones(n, dtype=np.uint64)  # np.ones writes every page, so none is faulted in while timed
    dst = np.zeros_like(src)
    cuts = np.linspace(0, n, threads + 1).astype(int)
    s_parts = [src[a:b] for a, b in itertools.pairwise(cuts)]
    d_parts = [dst[a:b] for a, b in itertools.pairwise(cuts)]
    with ThreadPoolExecutor(threads) as pool:
        read1 = _best(lambda: np.bitwise_or.reduce(src), reps)
        readn = _best(lambda: list(pool.map(np.bitwise_or.reduce, s_parts)), reps)
        copyn = _best(lambda: list(pool.map(np.copyto, d_parts, s_parts)), reps)
    size = src.nbytes
    return {
        "buffer_mb": mb,
        "threads": threads,
        "reps": reps,
        "read_1t_gb_s": size / read1 / 1e9,
        "read_gb_s": size / readn / 1e9,
        "copy_gb_s": 2 * size / copyn / 1e9,
        "method": "numpy bitwise_or.reduce over uint64 (read) and copyto (read+write), best of reps",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=1024, help="buffer size in MiB (default 1024)")
    ap.add_argument("--threads", type=int, default=2, help="threads for the parallel figures (default 2)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions, best kept (default 5)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        cfg = _common.read_config()
        _common.emit(
            {
                **measure(int(cfg.get("mb", 1024)), int(cfg.get("threads", 2)), int(cfg.get("reps", 5))),
                **_common.memory_mb(),
            }
        )
        return 0
    print(json.dumps(measure(args.mb, args.threads, args.reps), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
