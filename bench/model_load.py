"""What verifying a model's file digests costs at load: `LLMEngine(...)` with and without the check.

The same model is loaded three ways, alternating, `--rounds` times each, in this one process:

- **full**: every file is read and hashed, as at the first load in a process (daemon start, the CLI).
  The files' times are set to now first (`os.utime`), which changes their ctime, so the check cannot
  know them as verified and reads them all.
- **reload**: nothing changed since the previous load, as at the daemon's reload after an idle unload:
  the check only stats the files.
- **none**: a twin directory whose files are symlinks to the same files and whose manifest has no
  digests (as if imported before digests existed: only presence is checked, with one warning).

Same bytes, same page cache; the only difference is the check. Each with `warmup=False` and with the
warm-up run the daemon does. `--cold` evicts the model's files from the page cache before every load
(posix_fadvise DONTNEED on those files only). Also reported: sha256 of every file on one thread with
nothing else running, i.e. what the check would cost done before the load instead of beside it.

    .venv/bin/python bench/model_load.py [--rounds 7] [--threads 2] [--store DIR] [--large] [--cold]
        [--quiet-wait 120] [--quiet-below 0.15] [--retries 5]

`--store` defaults to a temporary store into which the default model is imported; `--large` builds a
random-weight llama (24 layers, 1024 wide, ~380 MB on disk) with llmos.tiny_model instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CONTENDED: list[float] = []  # share of the machine other processes took during each load done again

import _common  # noqa: E402
import engine as engine_bench  # noqa: E402

from llmos.engine.llm_engine import LLMEngine  # noqa: E402
from llmos.manifest import MANIFEST_FILE, ModelManifest  # noqa: E402
from llmos.model_integrity import sha256_of  # noqa: E402
from llmos.model_store import ModelStore  # noqa: E402


def model_dir(args: argparse.Namespace, tmp: Path) -> Path:
    store = ModelStore(args.store or tmp / "store")
    if not args.large:
        return store.import_default()
    from llmos.tiny_model import write_random_gguf

    gguf = write_random_gguf(
        tmp / "large.gguf",
        n_layer=24,
        n_embd=1024,
        n_ff=4096,
        n_head=16,
        n_head_kv=4,
        n_vocab=32000,
        context_length=2048,
        weight_type="Q4_1",
        seed=1,
    )
    return store.import_gguf(gguf, name="large")


def unverified_twin(d: Path, tmp: Path) -> Path:
    twin = tmp / f"{d.name}-unverified"
    twin.mkdir()
    for f in d.iterdir():
        if f.name != MANIFEST_FILE:
            (twin / f.name).symlink_to(f)
    m = ModelManifest.read(d)
    assert m.files, f"{d} has no digests: import it with this llmos"
    m.model_copy(update={"files": {}}).write(twin)
    return twin


def evict(d: Path) -> None:
    for f in d.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def load_s(d: Path, real: Path, args: argparse.Namespace, warmup: bool, full: bool = False) -> float:
    """Seconds to construct the engine from `d` (whose files are `real`'s, maybe through symlinks).

    A load during which other processes used `--quiet-below` of the machine or more is done again (up
    to `--retries` times): on two shared cores one busy neighbour doubles a load."""
    hz, ncpu = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    for _ in range(args.retries + 1):
        if full:
            for f in real.iterdir():
                os.utime(f)  # a new ctime: the check reads the file again
        if args.cold:
            evict(real)
        gc.collect()
        b0, _t = engine_bench._cpu_busy_jiffies()
        c0 = _common.cpu_s()
        t0 = time.perf_counter()
        engine = LLMEngine(d, threads=args.threads, warmup=warmup)
        took = time.perf_counter() - t0
        others = max((engine_bench._cpu_busy_jiffies()[0] - b0) / hz - (_common.cpu_s() - c0), 0.0)
        del engine
        gc.collect()
        if others / (took * ncpu) < args.quiet_below:
            print(f"{d.name} warmup={warmup} full={full}: {took:.3f} s", file=sys.stderr, flush=True)
            return took
        CONTENDED.append(round(others / (took * ncpu), 2))
        engine_bench.wait_for_quiet(args.quiet_wait, args.quiet_below)
    raise SystemExit(f"the machine stayed busy (other processes took {CONTENDED[-3:]} of it); try later")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--store", type=Path)
    p.add_argument("--large", action="store_true")
    p.add_argument("--cold", action="store_true")
    p.add_argument("--quiet-wait", type=float, default=120.0)
    p.add_argument("--quiet-below", type=float, default=0.15)
    p.add_argument("--retries", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmos-bench-load-") as t:
        tmp = Path(t)
        d = model_dir(args, tmp)
        twin = unverified_twin(d, tmp)
        m = ModelManifest.read(d)
        size = sum(f.size for f in m.files.values())
        load_s(d, d, args, False)  # untimed: imports, first session in this process
        load_s(twin, d, args, False)
        out: dict[str, object] = {"model": str(d), "bytes": size, "rounds": args.rounds, "cold": args.cold}
        variants = [("full", d, True), ("reload", d, False), ("none", twin, False)]
        for warmup in (False, True):
            times: dict[str, list[float]] = {label: [] for label, _, _ in variants}
            for i in range(args.rounds):
                engine_bench.wait_for_quiet(args.quiet_wait, args.quiet_below)
                for label, where, full in variants[i % 3 :] + variants[: i % 3]:
                    times[label].append(load_s(where, d, args, warmup, full))
            med = {k: statistics.median(v) for k, v in times.items()}
            out["with_warmup" if warmup else "no_warmup"] = {
                **{f"{k}_s": round(v, 4) for k, v in med.items()},
                "full_overhead_pct": round(100 * (med["full"] / med["none"] - 1), 1),
                "reload_overhead_pct": round(100 * (med["reload"] / med["none"] - 1), 1),
                **{f"{k}_all": [round(x, 3) for x in v] for k, v in times.items()},
            }
        hashes = []
        for _ in range(3):
            if args.cold:
                evict(d)
            t0 = time.perf_counter()
            for name in m.files:
                sha256_of(d / name)
            hashes.append(time.perf_counter() - t0)
        out["sha256_alone_s"] = round(statistics.median(hashes), 4)
        out["loads_done_again"] = CONTENDED
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
