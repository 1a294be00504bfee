"""Decode speed of a GGUF model: llmos with its native ops, llmos on MatMulNBits, and llama.cpp.

The same GGUF (default: the synthetic 0.5B Q4_0 llama of ~/.cache/llmos/bench/synthetic; any file with
--gguf, e.g. its Q4_K_M sibling) is imported twice, once with the op library (every matrix of a type it
has an op for, and the tied head, on llmos.gguf's ops) and once with LLMOS_GGUF_OPS pointing at a missing
file (MatMulNBits); each import's size on disk is printed beside the GGUF's. Each timed run is a fresh
child process, one at a time, engines alternating for --rounds rounds: load, one untimed warm-up
generation, then a short prompt and 128 greedy tokens (argmax per step, EOS ignored); decode tok/s = 127
steps / their time. Medians.

    PYTHONPATH=. .venv/bin/python bench/native_decode.py [--gguf FILE] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_GGUF = Path.home() / ".cache/llmos/bench/synthetic/llama-0.5B-r1-s0-Q4_0.gguf"
STORE = Path.home() / ".cache/llmos/bench/native_decode"
PROMPT = "Once upon a time, in a small village by the sea, there lived"
NEW_TOKENS = 128
N_CTX = 1024


def child_llmos(cfg: dict) -> dict:
    from llmos.engine.llm_engine import LLMEngine

    engine = LLMEngine(cfg["model"], threads=cfg["threads"])
    runner, ids = engine.runner, cfg["prompt_ids"]

    def run() -> tuple[list[int], float]:
        cache = engine.pool.allocate()
        try:
            tok = int(runner.prefill(cache, ids).argmax())
            out = [tok]
            t0 = time.perf_counter()
            for _ in range(NEW_TOKENS - 1):
                tok = int(runner.decode([cache], [tok])[0].argmax())
                out.append(tok)
            return out, time.perf_counter() - t0
        finally:
            cache.free()

    run()  # warm-up
    tokens, dt = run()
    return {"decode_tok_s": (NEW_TOKENS - 1) / dt, "tokens": tokens}


def child_llama_cpp(cfg: dict) -> dict:
    import llama_cpp
    import numpy as np

    t = cfg["threads"]
    llm = llama_cpp.Llama(cfg["gguf"], n_threads=t, n_threads_batch=t, n_ctx=N_CTX, verbose=False)
    ids = cfg["prompt_ids"]

    def run() -> tuple[list[int], float]:
        llm.reset()
        llm.eval(ids)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out = [tok]
        t0 = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(tok)
        return out, time.perf_counter() - t0

    run()  # warm-up
    tokens, dt = run()
    return {"decode_tok_s": (NEW_TOKENS - 1) / dt, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--no-llama-cpp",
        action="store_true",
        help="llmos's two imports only (llama.cpp's spinning OpenMP threads suffer most on a busy machine)",
    )
    ap.add_argument("--child", choices=["llmos", "llama.cpp"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        cfg = json.loads(sys.stdin.read())
        print(json.dumps(child_llmos(cfg) if args.child == "llmos" else child_llama_cpp(cfg)))
        return

    from llmos.engine import native_ops
    from llmos.manifest import ModelManifest
    from llmos.model_store import ModelStore
    from llmos.tokenizer import Tokenizer

    if not native_ops.available():
        sys.exit(
            f"the native op library is not available ({native_ops.unavailable_reason()}): scripts/setup.sh"
        )
    store = ModelStore(STORE)
    missing = str(STORE / "no-such-library.so")
    stem = args.gguf.stem.lower()
    models = {"llmos + native op": store.import_gguf(args.gguf, name=f"{stem}-native")}
    os.environ[native_ops.ENV] = missing
    models["llmos, MatMulNBits"] = store.import_gguf(args.gguf, name=f"{stem}-nbits")
    del os.environ[native_ops.ENV]
    gguf_size = args.gguf.stat().st_size
    for e, d in models.items():
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        ops = ", ".join(ModelManifest.read(d).native_ops) or "-"
        print(f"{e:20s} on disk {size / 1e6:7.1f} MB = {size / gguf_size:.3f}x the GGUF; native ops: {ops}")
    assert ModelManifest.read(models["llmos + native op"]).custom_op_domains == [native_ops.DOMAIN]
    assert ModelManifest.read(models["llmos, MatMulNBits"]).custom_op_domains == []
    gguf_size = args.gguf.stat().st_size
    for e, d in models.items():
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        print(f"{e:20s} on disk {size / 2**20:7.1f} MiB = {size / gguf_size:.3f}x the GGUF", flush=True)
    prompt_ids = Tokenizer.load(models["llmos, MatMulNBits"]).encode(PROMPT)
    print(
        f"{args.gguf.name}: prompt {len(prompt_ids)} tokens, {NEW_TOKENS} greedy tokens, "
        f"{args.threads} threads, {args.rounds} rounds",
        flush=True,
    )

    engines = [*models] + ([] if args.no_llama_cpp else ["llama.cpp"])
    results: dict[str, list[float]] = {e: [] for e in engines}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds):
        for e in engines:
            cfg = {"threads": args.threads, "prompt_ids": prompt_ids, "gguf": str(args.gguf)}
            env = dict(os.environ)
            if e == "llama.cpp":
                child = "llama.cpp"
            else:
                child, cfg["model"] = "llmos", str(models[e])
                if e == "llmos, MatMulNBits":
                    env[native_ops.ENV] = missing
            out = subprocess.run(
                [sys.executable, __file__, "--child", child],
                input=json.dumps(cfg),
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[e].append(res["decode_tok_s"])
            tokens[e] = res["tokens"]
            print(f"round {r + 1}: {e:20s} {res['decode_tok_s']:6.1f} tok/s", flush=True)
    peer, base = engines[-1], "llmos, MatMulNBits"
    for e in engines:
        med = statistics.median(results[e])
        print(
            f"{e:20s} decode median {med:6.1f} tok/s  ({med / statistics.median(results[peer]):.2f}x {peer}; "
            f"runs {', '.join(f'{v:.1f}' for v in results[e])})"
        )
    # the robust figure on a shared machine: native over MatMulNBits within each round (adjacent runs)
    ratios = [a / b for a, b in zip(results["llmos + native op"], results[base], strict=True)]
    print(f"native op / MatMulNBits per round: {', '.join(f'{v:.2f}' for v in ratios)}")
    same = tokens["llmos + native op"] == tokens[base]
    peer_same = tokens["llmos + native op"] == tokens["llama.cpp"] if "llama.cpp" in tokens else "not run"
    print(f"greedy tokens: native op vs MatMulNBits identical: {same}; vs llama.cpp identical: {peer_same}")


if __name__ == "__main__":
    main()
