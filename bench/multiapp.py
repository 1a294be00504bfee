"""Many apps, one model: what llmos's arbiter buys, measured in one run against its peers.

    .venv/bin/python bench/multiapp.py [--json out.json] [--rounds 3]

(a) aggregate decode tokens/s with 1, 2, 4, 8 apps generating at once, vs 1 app (targets >= 2.5x at
    4, >= 3.2x at 8). Each app is its own process on a private bus; all start on one signal.
(b) an interactive app's time to first token while 3 background apps generate, vs idle (<= 1.5x).
(c) context switch: resuming a 1,024-token context swapped out to disk (int8, checksummed) vs
    re-prefilling it (>= 50x faster), and vs llama.cpp loading its saved state of the same context
    (<= 0.5x its time). Both are timed to the first new token's logits, inside one process each.
(d) memory: llmosd serving 4 apps that each hold a 1,024-token conversation vs 4 separate llama.cpp
    processes holding the same contexts (<= 0.3x). RSS and PSS (the GGUF is mmapped by llama.cpp, so
    its pages are shared between the 4 processes: PSS splits them, RSS counts them 4 times).
(e) time to first token of a new session whose system prompt is cached vs one whose is not.

Everything runs on this machine's 2 shared cores; ratios come from the same run, medians of --rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import _peer_multiapp  # noqa: E402
from dbus_harness import Daemon, PrivateBus, app_python, client, read_json, start_client  # noqa: E402

from llmos.arbiter.arbiter import Arbiter  # noqa: E402
from llmos.arbiter.policy import ArbiterConfig  # noqa: E402
from llmos.arbiter.request import Request  # noqa: E402
from llmos.arbiter.swap_store import SwapStore  # noqa: E402
from llmos.default_model import default_gguf_path  # noqa: E402
from llmos.engine.llm_engine import LLMEngine  # noqa: E402
from llmos.engine.sampling import SamplingParams  # noqa: E402
from llmos.model_store import ModelStore  # noqa: E402

THREADS = 2
GEN = json.dumps({"max_tokens": 128, "ignore_eos": True, "temperature": 0})
FG, BG = "org.bench.Foreground", "org.bench.Background"


def context_ids(engine: LLMEngine, n: int) -> list[int]:
    """`n` token ids of real English (this repository's docs), for contexts of a known length."""
    text = "\n".join(p.read_text() for p in sorted((HERE.parent / "docs").glob("*.md")))
    ids = engine.tokenizer.encode(text, parse_special=False)
    if len(ids) < n:
        raise RuntimeError(f"docs/ gives only {len(ids)} tokens, {n} needed")
    return ids[:n]


def smaps(pid: int) -> dict[str, float]:
    return _peer_multiapp.smaps_rollup_mb(pid)


class Service:
    """llmosd on a private bus with a given configuration."""

    def __init__(self, tmp: Path, store: Path, config: str = "") -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        cfg = tmp / "llmosd.toml"
        cfg.write_text(f'state_dir = "{tmp / "state"}"\n{config}')
        self.bus = PrivateBus(tmp)
        self.daemon = Daemon(self.bus.address, store, "--config", str(cfg), "--threads", str(THREADS))

    def close(self) -> None:
        self.daemon.stop()
        self.bus.stop()


# -- (a) scaling ------------------------------------------------------------------------------------------
def scaling(tmp: Path, store: Path, rounds: int) -> dict[str, Any]:
    svc = Service(tmp / "a", store, "[engine]\nmax_batch = 8\n")
    try:
        out: dict[str, Any] = {}
        for n in (1, 2, 4, 8):
            rates = []
            for r in range(rounds):
                apps = [
                    start_client(
                        svc.bus.address,
                        "on-go",
                        f"Write a story, part {i}.",
                        GEN,
                        app=app_python(tmp, f"org.bench.App{i}"),
                    )
                    for i in range(n)
                ]
                for p in apps:
                    assert read_json(p)["ready"]
                for p in apps:
                    assert p.stdin is not None
                    p.stdin.write("go\n")
                    p.stdin.flush()
                res = [read_json(p, timeout=600) for p in apps]
                window = max(x["end"] for x in res) - min(x["start"] for x in res)
                rates.append(sum(x["stats"]["tokens_out"] for x in res) / window)
                print(f"  (a) {n} app(s), round {r + 1}: {rates[-1]:.1f} tok/s aggregate", flush=True)
            out[str(n)] = statistics.median(rates)
        base = out["1"]
        return {"tok_s": out, "ratio": {k: v / base for k, v in out.items()}}
    finally:
        svc.close()


# -- (b) interactive TTFT under background load ------------------------------------------------------------
def ttft_under_load(tmp: Path, store: Path, rounds: int) -> dict[str, Any]:
    policy = f'[apps."{FG}"]\nmax_priority = "interactive"\n[apps."{BG}"]\nmax_priority = "background"\n'
    svc = Service(tmp / "b", store, policy)
    fg = app_python(tmp, FG)
    one = json.dumps({"max_tokens": 1, "priority": "interactive"})
    prompt = "What is the capital of France?"
    try:
        idle = client(svc.bus.address, "latencies", str(3 * rounds), prompt, one, app=fg)["runs"]
        load = json.dumps({"max_tokens": 400, "ignore_eos": True})
        bgs = [
            start_client(svc.bus.address, "flood", "60", "1", load, app=app_python(tmp, BG)) for _ in range(3)
        ]
        time.sleep(8)  # the three are decoding
        busy = client(svc.bus.address, "latencies", str(3 * rounds), prompt, one, app=fg)["runs"]
        for p in bgs:
            p.kill()
        med_idle = statistics.median(r["seconds"] for r in idle) * 1e3
        med_busy = statistics.median(r["seconds"] for r in busy) * 1e3
        return {
            "idle_ms": med_idle,
            "busy_ms": med_busy,
            "ratio": med_busy / med_idle,
            "idle_daemon_ttft_ms": statistics.median(r["stats"]["ttft_ms"] for r in idle),
            "busy_daemon_ttft_ms": statistics.median(r["stats"]["ttft_ms"] for r in busy),
        }
    finally:
        svc.close()


# -- (c) context switch ----------------------------------------------------------------------------------
def context_switch(tmp: Path, model_dir: Path, gguf: Path, rounds: int) -> dict[str, Any]:
    engine = LLMEngine(model_dir, threads=THREADS)
    ids = context_ids(engine, 1024)
    # 64 MiB: a parked 1,023-token context (47 MB) and a warm free slot (47 MB) do not both fit, so the
    # parked session, the coldest thing, goes to disk; the free slot keeps its pages (see kv_cache.py)
    cfg = ArbiterConfig(kv_budget_mib=64, prefix_cache_entries=0)
    arb = Arbiter(lambda: engine, cfg, SwapStore(tmp / "c-swap", "bench"))
    one = SamplingParams(max_tokens=1)

    def ttft(req: Request) -> tuple[float, int]:
        arb.submit(req)
        while arb.step():
            pass
        assert req.seq is not None and req.error is None
        return req.seq.usage.ttft_s * 1e3, req.seq.output_ids[0]

    resumed, resumed_cold, resumed_trimmed, prefilled, tokens = [], [], [], [], set()
    for r in range(rounds):
        key = f"bench-{r}"
        ttft(Request(ids[:-1], one, session_key=key))  # leaves 1,023 positions parked, then on disk
        assert arb.snapshot()["kv_swapped_bytes"] > 0
        ms, tok = ttft(Request(ids, one, session_key=key))  # restore 1,023 from disk + feed 1 token
        resumed.append(ms)
        tokens.add(tok)
        ttft(Request(ids[:-1], one, session_key=key + "c"))
        for f in (tmp / "c-swap").glob("*.kv"):  # the file as if it had left the page cache
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        ms, tok = ttft(Request(ids, one, session_key=key + "c"))
        resumed_cold.append(ms)
        tokens.add(tok)
        ttft(Request(ids[:-1], one, session_key=key + "t"))
        engine.pool.trim_free()  # and the slot's pages too were given back (memory pressure, budget)
        ms, tok = ttft(Request(ids, one, session_key=key + "t"))
        resumed_trimmed.append(ms)
        tokens.add(tok)
        ms, tok = ttft(Request(ids, one))  # no session, no prefix cache: all 1,024 tokens prefilled
        prefilled.append(ms)
        tokens.add(tok)
        print(
            f"  (c) round {r + 1}: resume {resumed[-1]:.1f} ms (cold {resumed_cold[-1]:.1f}), "
            f"re-prefill {prefilled[-1]:.0f} ms",
            flush=True,
        )
    peer = _peer_multiapp.measure_llamacpp_state(str(gguf), ids, 2048, THREADS, rounds)
    res = {
        "resume_ms": statistics.median(resumed),
        "resume_cold_ms": statistics.median(resumed_cold),
        "resume_cold_slot_ms": statistics.median(resumed_trimmed),
        "reprefill_ms": statistics.median(prefilled),
        "same_next_token": len(tokens) == 1,
        "llamacpp": {k: v for k, v in peer.items() if not isinstance(v, list | dict)},
    }
    res["speedup_vs_reprefill"] = res["reprefill_ms"] / res["resume_ms"]
    res["vs_llamacpp_state"] = res["resume_ms"] / peer["state_load_ms"]
    res["vs_llamacpp_state_cold"] = res["resume_cold_ms"] / peer["state_load_cold_ms"]
    return res


# -- (d) memory ------------------------------------------------------------------------------------------
def memory(tmp: Path, store: Path, model_dir: Path, gguf: Path, budget_mib: int | None) -> dict[str, Any]:
    config = f"[arbiter]\nkv_budget_mib = {budget_mib}\n" if budget_mib is not None else ""
    svc = Service(tmp / f"d{budget_mib}", store, config)
    tok = LLMEngine(model_dir, threads=1, warmup=False).tokenizer
    text = "\n".join(p.read_text() for p in sorted((HERE.parent / "docs").glob("*.md")))
    system = tok.decode(tok.encode(text, parse_special=False)[:1000])
    holders = []
    try:
        for i in range(4):
            p = start_client(
                svc.bus.address,
                "converse",
                system,
                json.dumps({"max_tokens": 8}),
                f"Question {i}: what is this about?",
                "-",
                app=app_python(tmp, f"org.bench.Mem{i}"),
            )
            assert read_json(p, timeout=300)["paused"]
            holders.append(p)
        st = client(svc.bus.address, "status")
        mem = smaps(svc.daemon.proc.pid)
        return {
            "llmosd": mem,
            "kv_resident_mb": st["kv_bytes"] / 2**20,
            "kv_swapped_mb": st["kv_swapped_bytes"] / 2**20,
            "budget_mib": budget_mib,
        }
    finally:
        for p in holders:
            p.kill()
        svc.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write all figures here")
    ap.add_argument("--only", default="abcde", help="which parts to run, e.g. 'cd'")
    args = ap.parse_args(argv)
    gguf = default_gguf_path()
    tmp = Path(tempfile.mkdtemp(prefix="llmos-multiapp-"))
    store = tmp / "store"
    model_dir = ModelStore(store).import_gguf(gguf, precision="int4", make_default=True)
    res: dict[str, Any] = {"machine": os.uname().nodename, "cores": len(os.sched_getaffinity(0))}
    if "a" in args.only:
        res["a_scaling"] = scaling(tmp, store, args.rounds)
    if "b" in args.only:
        res["b_ttft_under_load"] = ttft_under_load(tmp, store, args.rounds)
    if "c" in args.only:
        res["c_context_switch"] = context_switch(tmp, model_dir, gguf, args.rounds)
    if "d" in args.only:
        ids = context_ids(LLMEngine(model_dir, threads=1, warmup=False), 1024)
        peer = _peer_multiapp.measure_llamacpp_processes(str(gguf), ids, 4, 2048, 1)
        res["d_memory"] = {
            "llamacpp_4": {k: v for k, v in peer.items() if k != "per_process"},
            "default_budget": memory(tmp, store, model_dir, gguf, None),
            "budget_0": memory(tmp, store, model_dir, gguf, 0),
        }
        for case in ("default_budget", "budget_0"):
            m = res["d_memory"][case]["llmosd"]
            m["rss_ratio"] = m["rss_mb"] / peer["rss_mb_sum"]
            m["pss_ratio"] = m["pss_mb"] / peer["pss_mb_sum"]
    if "e" in args.only:
        res["e_prefix_cache"] = prefix_ttft(tmp, store, args.rounds)
    print(json.dumps(res, indent=2))
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


# -- (e) cached system prompt ----------------------------------------------------------------------------
def prefix_ttft(tmp: Path, store: Path, rounds: int) -> dict[str, Any]:
    svc = Service(tmp / "e", store)
    opts = json.dumps({"max_tokens": 1})
    try:
        hit, miss = [], []
        for r in range(rounds):
            system = f"Rules for assistant number {r}. " + "Be kind, be brief, cite sources. " * 50
            first = client(svc.bus.address, "converse", system, opts, "Hello?")  # cold: fills the cache
            again = client(svc.bus.address, "converse", system, opts, "Another question?")
            miss.append(first["turns"][0]["stats"]["ttft_ms"])
            hit.append(again["turns"][0]["stats"]["ttft_ms"])
            assert again["turns"][0]["stats"]["kv_source"] == "prefix", again
            print(f"  (e) round {r + 1}: cached {hit[-1]:.1f} ms, uncached {miss[-1]:.1f} ms", flush=True)
        return {
            "cached_ms": statistics.median(hit),
            "uncached_ms": statistics.median(miss),
            "tokens": first["turns"][0]["stats"]["tokens_in"],
            "ratio": statistics.median(hit) / statistics.median(miss),
        }
    finally:
        svc.close()


def report(res: dict[str, Any]) -> None:
    print("\nllmos multi-app figures (same run, this machine)")
    if a := res.get("a_scaling"):
        r = a["ratio"]
        print(
            f"(a) aggregate decode vs 1 app: 2 apps {r['2']:.2f}x, 4 apps {r['4']:.2f}x (>= 2.5x), "
            f"8 apps {r['8']:.2f}x (>= 3.2x); 1 app {a['tok_s']['1']:.1f} tok/s"
        )
    if b := res.get("b_ttft_under_load"):
        print(
            f"(b) interactive TTFT, 3 background apps vs idle: {b['busy_ms']:.0f} vs {b['idle_ms']:.0f} ms "
            f"= {b['ratio']:.2f}x (<= 1.5x)"
        )
    if c := res.get("c_context_switch"):
        vs = c["vs_llamacpp_state"]
        print(
            f"(c) resume 1,024 tokens from disk: {c['resume_ms']:.1f} ms (file not cached "
            f"{c['resume_cold_ms']:.1f}, slot pages given back {c['resume_cold_slot_ms']:.1f}); "
            f"re-prefill {c['reprefill_ms']:.0f} ms = {c['speedup_vs_reprefill']:.0f}x faster (>= 50x); "
            f"vs llama.cpp state load {vs:.2f}x (<= 0.5x)"
            if vs
            else ""
        )
    if d := res.get("d_memory"):
        p = d["llamacpp_4"]
        for case in ("default_budget", "budget_0"):
            m = d[case]["llmosd"]
            print(
                f"(d) llmosd ({case}) {m['rss_mb']:.0f} MB RSS / {m['pss_mb']:.0f} MB PSS vs 4 llama.cpp "
                f"{p['rss_mb_sum']:.0f} / {p['pss_mb_sum']:.0f} MB = {m['rss_ratio']:.2f}x RSS, "
                f"{m['pss_ratio']:.2f}x PSS (<= 0.3x)"
            )
    if e := res.get("e_prefix_cache"):
        print(
            f"(e) new session TTFT, cached {e['tokens']}-token system prompt vs not: {e['cached_ms']:.0f} vs "
            f"{e['uncached_ms']:.0f} ms = {e['ratio']:.2f}x"
        )


if __name__ == "__main__":
    sys.exit(main())
