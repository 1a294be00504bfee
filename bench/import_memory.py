"""Peak memory of importing a GGUF, per import stage: what a phone-sized device must have free.

    .venv/bin/python bench/import_memory.py MODEL.gguf [--precision int4]

Imports into a temporary store in this process and samples its RSS (and anonymous RSS) every few
milliseconds, per stage (hash, tokenizer, graph, check, digest); prints each stage's peak and the
overall peak against the imported model's size on disk.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path


def rss_mb() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        fields = {k: v for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "RssAnon")}
    return int(fields["VmRSS"].split()[0]) >> 10, int(fields["RssAnon"].split()[0]) >> 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--precision", default="int4", choices=("int4", "int8", "fp32"))
    args = ap.parse_args()
    from llmos.model_store import ModelStore

    base = rss_mb()
    peaks: dict[str, list[int]] = {}
    stage = ["start"]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, anon = rss_mb()
            p = peaks.setdefault(stage[0], [0, 0])
            p[0], p[1] = max(p[0], rss), max(p[1], anon)
            time.sleep(0.003)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        out = ModelStore(Path(tmp)).import_gguf(
            args.gguf, precision=args.precision, name="m", progress=lambda s, _i, _n: stage.__setitem__(0, s)
        )
        seconds = time.monotonic() - t0
        size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    done.set()
    gguf_mib = args.gguf.stat().st_size / 2**20
    print(
        f"{args.gguf.name}: {args.precision}, {seconds:.1f} s, model {size:.0f} MiB (GGUF {gguf_mib:.0f} MiB)"
    )
    print(f"  before import: RSS {base[0]} MB (anonymous {base[1]} MB)")
    for name, (rss, anon) in peaks.items():
        print(f"  {name:10} peak RSS {rss:5} MB (anonymous {anon} MB)")
    top = max(r for r, _ in peaks.values())
    print(f"  peak {top} MB = {top / size:.2f}x the model's size")


if __name__ == "__main__":
    main()
