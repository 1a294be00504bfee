"""Service overhead: an app streaming from llmosd over D-Bus against the in-process engine, same prompt.

One invocation alternates two kinds of round, each in fresh processes, one at a time (the machine has
few cores and nothing else we start may run beside a timed child), for `--rounds` rounds, and reports
the medians:

* D-Bus: a private dbus-daemon, llmosd (`python -m system_services.daemon --threads N`, default
  configuration) in its own process, and an app in a third process (dbus-fast, asyncio) that does what
  tests/bus_client.py does: CreateSession (system_prompt), subscribe to the request path it will get,
  PromptStream with handle_token, count the unicast Chunk signals, wait for Response(u, a{sv}). One
  untimed stream first (warm-up), then one timed stream on a fresh session. Then, with the daemon idle,
  1,000 `CountTokens("hi")` calls and 1,000 `org.freedesktop.DBus.Peer.Ping` calls to llmosd, each
  awaited before the next (Ping is answered by dbus-fast in llmosd before any llmos code: the floor of a
  round trip through the bus and both processes' D-Bus libraries).
* In-process: `LLMEngine` built with llmosd's default engine settings (DaemonConfig, --threads N, its
  load-time warm-up), one untimed `engine.stream(...)` and one timed one, on the same chat messages.

Both get the same messages: bench/engine.py's system message and "summarise this passage" user message
with its lighthouse passage, cut at a word so the rendered prompt is at most 256 tokens (the D-Bus API
takes text, not ids, so the passage is cut in words rather than tokens); 128 new tokens, `ignore_eos`,
greedy (temperature 0). Figures:

* decode tok/s: (new tokens - 1) / (time from the first chunk to the Response) for the app; to the last
  chunk for the in-process stream. Both are end to end: sampler, detokenizer and (D-Bus) the worker
  thread, the event loop, two socket hops and the app's message parsing.
* TTFT: from just before the PromptStream call (app) or the `stream()` call (in-process) to the first
  chunk arriving in the app / being yielded.

The machine is shared: before each child the script waits for other processes to go quiet and repeats a
child that was contended, exactly like bench/engine.py (--quiet-wait, --quiet-below, --retries). Results
and method: docs/performance.md.

    .venv/bin/python bench/service.py --rounds 3 [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
import engine as engine_bench  # bench/engine.py: the prompt text, quiet-machine control, helpers

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SCRIPT = str(BENCH_DIR / "service.py")
PROMPT_TOKENS = engine_bench.PROMPT_TOKENS  # 256: the most the rendered prompt may take
NEW_TOKENS = engine_bench.NEW_TOKENS  # 128
CALLS = 1000
OVERHEAD_MAX = 0.05  # D-Bus may cost at most 5 %: decode rate >= 0.95x, TTFT <= 1.05x in-process

NAME, PATH = "org.llmos.LLM1", "/org/llmos/LLM1"
LLM_IFACE, SESSION_IFACE = "org.llmos.LLM1", "org.llmos.Session1"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def proc_cpu_s(stat_path: str) -> float:
    """utime + stime of a process or thread, from /proc/.../stat."""
    with open(stat_path, encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def source_state() -> str:
    """Which code is measured: the git commit, and local changes under llmos/ and system_services/."""
    git = ["git", "-C", str(REPO)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "llmos", "system_services"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return f"{REPO} (not a git checkout)"
    return f"{REPO} at {head}" + (
        f" + {len(dirty)} uncommitted change(s) under llmos/, system_services/" if dirty else ""
    )


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# -- the preparation child ---------------------------------------------------------------------------------
def prep_child() -> None:
    """Resolve the default model; cut the passage so the rendered chat prompt fits; report versions."""
    cfg = _common.read_config()
    from llmos.engine.llm_engine import LLMEngine
    from llmos.model_store import ModelStore

    store = ModelStore(cfg["store"])
    model_dir = store.resolve()
    eng = LLMEngine(model_dir, warmup=False)

    def messages(n_words: int) -> list[dict[str, str]]:
        passage = " ".join(engine_bench.PASSAGE.split(" ")[:n_words])
        return [
            {"role": "system", "content": engine_bench.SYSTEM},
            {"role": "user", "content": engine_bench.INSTRUCTION + "\n\n" + passage},
        ]

    words = len(engine_bench.PASSAGE.split(" "))
    lo, hi = 1, words  # the longest word prefix whose rendered prompt is <= PROMPT_TOKENS
    if eng.count_tokens(messages(lo)) > PROMPT_TOKENS:
        raise SystemExit("the bench prompt without its passage is already too long")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if eng.count_tokens(messages(mid)) <= PROMPT_TOKENS:
            lo = mid
        else:
            hi = mid - 1
    msgs = messages(lo)
    dbus_version = subprocess.run(
        ["dbus-daemon", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    _common.emit(
        {
            "model_dir": str(model_dir),
            "store": str(store.root),
            "model_name": eng.manifest.name,
            "precision": eng.manifest.precision,
            "system": msgs[0]["content"],
            "user": msgs[1]["content"],
            "prompt_tokens": eng.count_tokens(msgs),
            "passage_words": lo,
            "llmos_source": source_state(),
            "onnxruntime": version_of("onnxruntime"),
            "dbus_fast": version_of("dbus-fast"),
            "numpy": version_of("numpy"),
            "dbus_daemon": dbus_version[0] if dbus_version else "?",
        }
    )


# -- the in-process child ----------------------------------------------------------------------------------
def inproc_child() -> None:
    cfg = _common.read_config()
    from llmos.engine.llm_engine import LLMEngine
    from llmos.engine.sampling import SamplingParams
    from system_services.config import DaemonConfig

    ec = DaemonConfig().engine  # what llmosd builds with no configuration file
    t0 = time.perf_counter()
    engine = LLMEngine(
        cfg["model_dir"],
        threads=int(cfg["threads"]),
        max_batch=ec.max_batch,
        max_context=ec.context_length,
        prefill_chunk=ec.prefill_chunk,
    )
    load_s = time.perf_counter() - t0
    messages = [{"role": "system", "content": cfg["system"]}, {"role": "user", "content": cfg["user"]}]
    params = SamplingParams.of(max_tokens=int(cfg["new_tokens"]), ignore_eos=True)

    def timed_stream() -> dict[str, Any]:
        stamps: list[float] = []
        n_tokens = n_text_chunks = 0
        text: list[str] = []
        usage = None
        c0 = _common.cpu_s()
        t0 = time.perf_counter()
        for ch in engine.stream(messages, params):
            stamps.append(time.perf_counter())
            n_tokens += len(ch.token_ids)
            n_text_chunks += bool(ch.text)
            text.append(ch.text)
            usage = ch.usage or usage
        assert usage is not None
        return {
            "ttft_s": stamps[0] - t0,
            "decode_s": stamps[-1] - stamps[0],
            "decode_tok_s": (n_tokens - 1) / (stamps[-1] - stamps[0]),
            "total_s": stamps[-1] - t0,
            "cpu_s": _common.cpu_s() - c0,
            "tokens_in": usage.prompt_tokens,
            "tokens_out": n_tokens,
            "chunks": n_text_chunks,
            "text": "".join(text),
            "engine_ttft_ms": usage.ttft_s * 1000,
            "engine_decode_tok_s": usage.decode_tok_s,  # graph runs only
        }

    warm = timed_stream()
    run = timed_stream()
    enc = []  # what CountTokens("hi") does inside llmosd, without D-Bus
    for _ in range(CALLS):
        t = time.perf_counter()
        engine.tokenizer.encode("hi", parse_special=False)
        enc.append(time.perf_counter() - t)
    _common.emit(
        {
            "kind": "inproc",
            "load_s": load_s,
            "warmup": {k: v for k, v in warm.items() if k != "text"},
            "run": run,
            "encode_hi_us": {"median": statistics.median(enc) * 1e6, "p99": percentile(enc, 99) * 1e6},
            **_common.memory_mb(),
        }
    )


# -- the D-Bus children: coordinator (bus + llmosd + app) and the app ---------------------------------------
def dbus_child() -> None:
    """Start a private dbus-daemon and llmosd, run the app as its own process, stop both, report."""
    cfg = _common.read_config()
    sys.path.insert(0, str(REPO / "tests"))
    from dbus_harness import Daemon, PrivateBus

    with tempfile.TemporaryDirectory(prefix="llmos-bench-svc-") as tmp:
        conf = Path(tmp) / "llmosd.toml"
        conf.write_text("# empty: llmosd's defaults\n", encoding="utf-8")
        bus = PrivateBus(Path(tmp))
        daemon = None
        try:
            t0 = time.perf_counter()
            daemon = Daemon(
                bus.address,
                Path(cfg["store"]),
                "--config",
                str(conf),
                "--model",
                cfg["model_dir"],
                "--threads",
                str(cfg["threads"]),
            )
            start_s = time.perf_counter() - t0
            app = subprocess.run(
                [sys.executable, SCRIPT, "--child-app"],
                input=json.dumps(
                    {**cfg, "address": bus.address, "daemon_pid": daemon.proc.pid, "bus_pid": bus.proc.pid}
                ),
                capture_output=True,
                text=True,
                timeout=600,
                cwd=str(REPO),
                check=False,
            )
            res = _common.parse_result(app.stdout)
            if app.returncode != 0 or res is None:
                sys.stderr.write(app.stdout[-2000:] + app.stderr[-4000:])
                sys.stderr.write("\nllmosd log:\n" + "\n".join(daemon.log[-40:]) + "\n")
                raise SystemExit(f"the app failed (exit {app.returncode})")
            with open(f"/proc/{daemon.proc.pid}/status", encoding="ascii") as f:
                status = {ln.split(":")[0]: int(ln.split()[1]) / 1024 for ln in f if ln.startswith("Vm")}
            res.update(
                kind="dbus",
                daemon_start_s=start_s,
                daemon_vmhwm_mb=status.get("VmHWM", float("nan")),
                daemon_vmrss_mb=status.get("VmRSS", float("nan")),
            )
            rc = daemon.stop()
            daemon = None
            res["daemon_exit"] = rc
        finally:
            if daemon is not None:
                daemon.proc.kill()
                daemon.proc.wait(timeout=30)
            bus.stop()
    _common.emit(res)


def app_child() -> None:
    cfg = _common.read_config()
    _common.emit(asyncio.run(_app(cfg)))


async def _app(cfg: dict[str, Any]) -> dict[str, Any]:
    from dbus_fast import Message, MessageType, Variant
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=cfg["address"]).connect()
    loop = asyncio.get_running_loop()

    async def call(path: str, iface: str, member: str, sig: str = "", body: list[Any] | None = None) -> Any:
        reply = await bus.call(
            Message(
                destination=NAME, path=path, interface=iface, member=member, signature=sig, body=body or []
            )
        )
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"{member}: {reply.error_name}: {reply.body}")
        return reply.body

    watch: dict[str, Any] = {"path": None}
    dpid, bpid = int(cfg["daemon_pid"]), int(cfg["bus_pid"])

    def others_cpu() -> dict[str, float]:
        """CPU seconds so far of llmosd, of its main thread (the event loop), and of dbus-daemon."""
        return {
            "llmosd_cpu_s": proc_cpu_s(f"/proc/{dpid}/stat"),
            "llmosd_loop_cpu_s": proc_cpu_s(f"/proc/{dpid}/task/{dpid}/stat"),
            "dbus_daemon_cpu_s": proc_cpu_s(f"/proc/{bpid}/stat"),
        }

    def on_signal(msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL or msg.path != watch["path"]:
            return
        now = time.perf_counter()
        if msg.member == "Chunk":
            watch["stamps"].append(now)
            watch["text"].append(msg.body[0])
        elif msg.member == "Response" and not watch["done"].done():
            watch["done"].set_result((now, msg.body))

    bus.add_message_handler(on_signal)
    request_dir = f"{PATH}/request/{bus.unique_name.lstrip(':').replace('.', '_')}"

    async def timed_stream(token: str) -> dict[str, Any]:
        (session,) = await call(
            PATH, LLM_IFACE, "CreateSession", "a{sv}", [{"system_prompt": Variant("s", cfg["system"])}]
        )
        opts = {
            "max_tokens": Variant("u", int(cfg["new_tokens"])),
            "ignore_eos": Variant("b", True),
            "handle_token": Variant("s", token),
        }
        # subscribed (by path) before the call, so not even the first chunk can be missed
        watch.update(path=f"{request_dir}/{token}", stamps=[], text=[], done=loop.create_future())
        others0 = others_cpu()
        c0 = _common.cpu_s()
        t0 = time.perf_counter()
        (req,) = await call(session, SESSION_IFACE, "PromptStream", "sa{sv}", [cfg["user"], opts])
        t_reply = time.perf_counter()
        t_resp, (code, results) = await asyncio.wait_for(watch["done"], 600)
        cpu = _common.cpu_s() - c0
        others = {k: v - others0[k] for k, v in others_cpu().items()}
        await call(session, SESSION_IFACE, "Close")
        if code != 0 or req != watch["path"]:
            raise RuntimeError(f"stream failed: code {code}, request {req}, {results}")
        stamps = watch["stamps"]
        stats = {k: v.value for k, v in results.items()}
        n_tokens = int(stats["tokens_out"])
        return {
            "ttft_s": stamps[0] - t0,
            "call_reply_s": t_reply - t0,
            "decode_s": t_resp - stamps[0],
            "decode_tok_s": (n_tokens - 1) / (t_resp - stamps[0]),
            "decode_chunk_s": (len(stamps) - 1) / (t_resp - stamps[0]),  # Chunk signals counted
            "last_chunk_to_response_ms": (t_resp - stamps[-1]) * 1000,
            "total_s": t_resp - t0,
            "app_cpu_s": cpu,
            **others,
            "tokens_in": int(stats["tokens_in"]),
            "tokens_out": n_tokens,
            "chunks": len(stamps),
            "chunks_reported": int(stats["chunks"]),
            "text": "".join(watch["text"]),
            "text_matches_response": "".join(watch["text"]) == stats["text"],
            "engine_ttft_ms": float(stats["ttft_ms"]),  # the daemon's engine: accepted -> first token
            "engine_decode_tok_s": float(stats["tokens_per_s"]),  # graph runs only
        }

    async def latency(make: Any, n: int) -> dict[str, float]:
        for _ in range(50):  # untimed
            await bus.call(make())
        lat = []
        for _ in range(n):
            msg = make()
            t = time.perf_counter()
            reply = await bus.call(msg)
            lat.append(time.perf_counter() - t)
            if reply.message_type == MessageType.ERROR:
                raise RuntimeError(f"{msg.member}: {reply.error_name}")
        return {
            "median_us": statistics.median(lat) * 1e6,
            "p99_us": percentile(lat, 99) * 1e6,
            "mean_us": statistics.fmean(lat) * 1e6,
            "max_us": max(lat) * 1e6,
        }

    warm = await timed_stream("bench_warmup")
    run = await timed_stream("bench_timed")
    count_res = await latency(
        lambda: Message(
            destination=NAME, path=PATH, interface=LLM_IFACE, member="CountTokens", signature="s", body=["hi"]
        ),
        CALLS,
    )
    ping_res = await latency(
        lambda: Message(destination=NAME, path=PATH, interface="org.freedesktop.DBus.Peer", member="Ping"),
        CALLS,
    )
    bus.disconnect()
    return {
        "warmup": {k: v for k, v in warm.items() if k != "text"},
        "run": run,
        "count_tokens": count_res,
        "ping": ping_res,
        "app_vmhwm_mb": _common.memory_mb().get("vmhwm_mb", float("nan")),
    }


# -- the parent ---------------------------------------------------------------------------------------------
def med(results: list[dict[str, Any]], *keys: str) -> tuple[float, float, float]:
    """(median, min, max) over rounds of results[i][keys[0]][keys[1]]..."""
    vals = []
    for r in results:
        v: Any = r
        for k in keys:
            v = v[k]
        vals.append(float(v))
    return statistics.median(vals), min(vals), max(vals)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating D-Bus / in-process rounds (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="engine threads, both sides (default 2)")
    ap.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="model store root (default: the user model store, see llmos.paths); its default model is used",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="as bench/engine.py (default 120 s)")
    ap.add_argument("--quiet-below", type=float, default=0.15, help="as bench/engine.py (default 0.15)")
    ap.add_argument("--retries", type=int, default=2, help="as bench/engine.py (default 2)")
    for child in ("prep", "inproc", "dbus", "app"):
        ap.add_argument(f"--child-{child}", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for child, fn in (
        ("prep", prep_child),
        ("inproc", inproc_child),
        ("dbus", dbus_child),
        ("app", app_child),
    ):
        if getattr(args, f"child_{child}"):
            fn()
            return 0
    if args.rounds < 1 or args.threads < 1:
        ap.error("--rounds and --threads must be at least 1")
    if shutil.which("dbus-daemon") is None:
        print("dbus-daemon is not installed (package dbus-daemon / dbus)", file=sys.stderr)
        return 2

    py = sys.executable
    store = str(args.model_dir) if args.model_dir else None
    prep = subprocess.run(
        [py, SCRIPT, "--child-prep"],
        cwd=str(REPO),
        input=json.dumps({"store": store}),
        capture_output=True,
        text=True,
        check=False,
    )
    info = _common.parse_result(prep.stdout)
    if info is None:
        sys.stderr.write(prep.stdout[-2000:] + prep.stderr[-4000:])
        print(
            f"preparing failed (exit {prep.returncode}); is a model imported? (llmos import)", file=sys.stderr
        )
        return 1
    base = {
        "model_dir": info["model_dir"],
        "store": info["store"],
        "system": info["system"],
        "user": info["user"],
        "new_tokens": NEW_TOKENS,
        "threads": args.threads,
    }
    kinds: list[tuple[str, list[str]]] = [
        ("D-Bus", [py, SCRIPT, "--child-dbus"]),
        ("in-process", [py, SCRIPT, "--child-inproc"]),
    ]

    started = dt.datetime.now().astimezone()
    busy_before = engine_bench.busy_processes()
    print(f"{started:%Y-%m-%d %H:%M %Z} | {engine_bench.machine()} | load avg {os.getloadavg()[0]:.2f}")
    print(
        f"python {platform.python_version()}, onnxruntime {info['onnxruntime']}, "
        f"dbus-fast {info['dbus_fast']}, numpy {info['numpy']}, {info['dbus_daemon']}"
    )
    print(f"llmos code: {info['llmos_source']}")
    print(f"model: {info['model_dir']} ({info['model_name']}, {info['precision']})")
    print(
        f"prompt {info['prompt_tokens']} tokens (system + user, passage cut after "
        f"{info['passage_words']} words), "
        f"{NEW_TOKENS} tokens (ignore_eos, greedy), {args.threads} threads, {args.rounds} rounds, "
        "children one at a time"
    )
    for b in busy_before:
        print(f"  busy before: {b}")

    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in kinds}
    discarded: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        order = kinds if rnd % 2 == 0 else kinds[::-1]
        for name, cmd in order:
            for attempt in range(args.retries + 1):
                waited, busy = (
                    engine_bench.wait_for_quiet(args.quiet_wait, args.quiet_below)
                    if args.quiet_wait > 0
                    else (0.0, float("nan"))
                )
                res = engine_bench.run_child(name, cmd, base, timeout=900)
                res["quiet_wait_s"], res["others_busy_before"] = waited, busy
                res["contended"] = res["other_cpu_frac"] >= args.quiet_below
                if not res["contended"] or attempt == args.retries:
                    break
                discarded.append({"round": rnd + 1, "name": name, **res})
                print(
                    f"  round {rnd + 1} {name:<10} discarded: other processes used "
                    f"{res['other_cpu_frac'] * 100:.0f}% of the CPUs during it; running it again",
                    flush=True,
                )
            results[name].append(res)
            r = res["run"]
            extra = (
                f"  Ping {res['ping']['median_us']:.0f} us"
                f"  CountTokens {res['count_tokens']['median_us']:.0f} us"
                if name == "D-Bus"
                else ""
            )
            print(
                f"  round {rnd + 1} {name:<10} TTFT {r['ttft_s'] * 1000:6.1f} ms  "
                f"decode {r['decode_tok_s']:6.1f} tok/s  ({r['tokens_out']} tokens, {r['chunks']} chunks)"
                f"{extra}  others {res['other_cpu_frac'] * 100:3.0f}% CPU"
                + (" CONTENDED" if res["contended"] else "")
                + (f" (waited {waited:.0f} s)" if waited >= 5 else ""),
                flush=True,
            )
    busy_after = engine_bench.busy_processes()

    d, p = results["D-Bus"], results["in-process"]
    rows = {
        "decode tok/s": (med(d, "run", "decode_tok_s"), med(p, "run", "decode_tok_s")),
        "TTFT ms": (
            tuple(x * 1000 for x in med(d, "run", "ttft_s")),
            tuple(x * 1000 for x in med(p, "run", "ttft_s")),
        ),
        "engine decode tok/s*": (med(d, "run", "engine_decode_tok_s"), med(p, "run", "engine_decode_tok_s")),
        "engine TTFT ms*": (med(d, "run", "engine_ttft_ms"), med(p, "run", "engine_ttft_ms")),
        "peak RSS MB": (med(d, "daemon_vmhwm_mb"), med(p, "vmhwm_mb")),
    }
    header = f"{'':<22}{'D-Bus app':>11}{'in-process':>12}{'ratio':>8}   spread D-Bus / in-process"
    print(f"\nmedians over {args.rounds} round(s)\n{header}\n{'-' * len(header)}")
    for label, (dv, pv) in rows.items():
        print(
            f"{label:<22}{dv[0]:>11.1f}{pv[0]:>12.1f}{dv[0] / pv[0]:>8.3f}   "
            f"{dv[1]:.1f}-{dv[2]:.1f} / {pv[1]:.1f}-{pv[2]:.1f}"
        )
    print(
        "* the engine's own usage figures (Response stats / StreamChunk.usage): TTFT from request accepted, "
        "decode over graph runs only\n  peak RSS: llmosd's VmHWM vs the in-process child's"
    )

    lat = {
        "Peer.Ping (bus floor)": (med(d, "ping", "median_us"), med(d, "ping", "p99_us")),
        'CountTokens("hi")': (med(d, "count_tokens", "median_us"), med(d, "count_tokens", "p99_us")),
        'in-process encode("hi")': (med(p, "encode_hi_us", "median"), med(p, "encode_hi_us", "p99")),
    }
    print(f"\nround trips, {CALLS} calls each, one at a time (median over rounds of each round's figure)")
    print(f"{'':<26}{'median us':>10}{'p99 us':>10}")
    for label, (m, q) in lat.items():
        print(f"{label:<26}{m[0]:>10.0f}{q[0]:>10.0f}")

    checks = []
    dec_ratio = rows["decode tok/s"][0][0] / rows["decode tok/s"][1][0]
    ttft_ratio = rows["TTFT ms"][0][0] / rows["TTFT ms"][1][0]
    checks.append(
        {
            "metric": "decode",
            "ratio": dec_ratio,
            "target": f">= {1 - OVERHEAD_MAX:.2f}x",
            "pass": dec_ratio >= 1 - OVERHEAD_MAX,
        }
    )
    checks.append(
        {
            "metric": "TTFT",
            "ratio": ttft_ratio,
            "target": f"<= {1 + OVERHEAD_MAX:.2f}x",
            "pass": ttft_ratio <= 1 + OVERHEAD_MAX,
        }
    )
    print("\nD-Bus / in-process (overhead target <= 5 %):")
    for c in checks:
        over = (1 - c["ratio"]) if c["metric"] == "decode" else (c["ratio"] - 1)
        print(
            f"  {c['metric']:<7} {c['ratio']:6.3f}x  overhead {over * 100:+5.1f} %   target {c['target']:<9} "
            + ("PASS" if c["pass"] else "MISS")
        )
    # the two runs of a round ran back to back, so they share the host's slow or fast phase
    paired = {
        key: [x["run"][key] / y["run"][key] for x, y in zip(d, p, strict=True)]
        for key in ("decode_tok_s", "ttft_s")
    }
    print(
        "  per round (D-Bus / in-process of the same round): decode "
        + " ".join(f"{v:.3f}" for v in paired["decode_tok_s"])
        + f" (median {statistics.median(paired['decode_tok_s']):.3f}); TTFT "
        + " ".join(f"{v:.3f}" for v in paired["ttft_s"])
        + f" (median {statistics.median(paired['ttft_s']):.3f})"
    )

    notes = []
    for r in d:
        run = r["run"]
        if run["tokens_out"] != NEW_TOKENS or run["chunks"] != run["chunks_reported"]:
            notes.append(
                f"D-Bus: {run['tokens_out']} tokens, {run['chunks']} chunks received "
                f"of {run['chunks_reported']} sent"
            )
        if not run["text_matches_response"]:
            notes.append("D-Bus: the joined chunks differ from the Response's text")
        if r.get("daemon_exit") != 0:
            notes.append(f"llmosd exited {r.get('daemon_exit')}")
    if {r["run"]["tokens_in"] for r in d} != {r["run"]["tokens_in"] for r in p}:
        notes.append("prompt token counts differ between D-Bus and in-process")
    texts = {r["run"]["text"] for r in d + p}
    print(
        f"\nprompt tokens: D-Bus {sorted({r['run']['tokens_in'] for r in d})}, in-process "
        f"{sorted({r['run']['tokens_in'] for r in p})}; same greedy text in every run: {len(texts) == 1}"
    )
    print(
        f"D-Bus: {med(d, 'run', 'chunks')[0]:.0f} Chunk signals for "
        f"{med(d, 'run', 'tokens_out')[0]:.0f} tokens; "
        f"PromptStream reply after {med(d, 'run', 'call_reply_s')[0] * 1000:.2f} ms; Response "
        f"{med(d, 'run', 'last_chunk_to_response_ms')[0]:.2f} ms after the last Chunk; "
        f"llmosd start {med(d, 'daemon_start_s')[0]:.1f} s"
    )
    print(
        "CPU s per timed stream (10 ms ticks): in-process child "
        f"{med(p, 'run', 'cpu_s')[0]:.2f}; llmosd {med(d, 'run', 'llmosd_cpu_s')[0]:.2f} "
        f"(event-loop thread {med(d, 'run', 'llmosd_loop_cpu_s')[0]:.2f}), "
        f"dbus-daemon {med(d, 'run', 'dbus_daemon_cpu_s')[0]:.2f}, app {med(d, 'run', 'app_cpu_s')[0]:.2f}"
    )
    for n in notes:
        print(f"  note: {n}")
    for b in busy_after:
        print(f"  busy after: {b}")

    if args.json:
        doc = {
            "bench": "service",
            "date": started.isoformat(timespec="seconds"),
            "machine": engine_bench.machine(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "rounds": args.rounds,
            "threads": args.threads,
            "info": info,
            "new_tokens": NEW_TOKENS,
            "rows": rows,
            "latency": lat,
            "checks": checks,
            "paired_ratios": paired,
            "busy_before": busy_before,
            "busy_after": busy_after,
            "results": results,
            "discarded_contended_runs": discarded,
        }
        _common.write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
