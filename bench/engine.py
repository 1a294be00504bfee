"""Engine speed and memory: llmos against llama.cpp on the default model, same prompt ids, greedy.

One invocation runs every engine in its own fresh subprocess, one child at a time (the machine has few
cores and nothing else we start may run beside a timed child), alternating engines for `--rounds`
rounds, and reports the medians. Each child loads the model, runs one untimed warm-up generation (the
first generation after load is 2-3x slower), then one timed generation:

* llmos: the engine's ModelRunner directly - `runner.prefill(cache, prompt)` + argmax (TTFT), then
  `runner.decode([cache], [tok])` + argmax per token - and, as a cross-check, `LLMEngine.generate()`
  with its own usage figures (sampler and detokenizer included).
* llama.cpp (llama-cpp-python, defaults except n_threads, n_ctx (--n-ctx, 1024), n_batch=512):
  `llm.eval(prompt)` + argmax of the last logits (TTFT), then `llm.eval([tok])` + argmax per token;
  once more with
  flash_attn=True.

The prompt is a system + user chat message rendered with the model's own template and cut to exactly
256 tokens; the same ids go to every engine; 128 new tokens, EOS ignored.

The machine is shared: before each child the script waits for other processes to go quiet, measures
how much CPU they used while the child ran, and repeats a child that was contended (--quiet-wait,
--quiet-below, --retries). Peak RSS is VmHWM, read in the child; the parent imports neither engine.
After the timed runs an untimed child checks llmos's teacher-forced agreement with each peer's tokens.
Results and method: docs/performance.md.

    .venv/bin/python bench/engine.py --rounds 3 [--threads 2] [--n-ctx 1024] [--precision int4|int8|fp32]
        [--json out.json]

Needs the `bench` extra (llama-cpp-python); exits 2 without it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PROMPT_TOKENS = 256
NEW_TOKENS = 128
N_CTX = 1024
N_BATCH = 512
TARGETS = {  # llmos / llama.cpp (default row): (metric, ratio must be >= or <=, bound)
    "decode": ("decode_tok_s", ">=", 1.3),
    "prefill": ("prefill_tok_s", ">=", 2.5),
    "TTFT": ("ttft_ms", "<=", 0.4),
    "peak RSS": ("vmhwm_mb", "<=", 0.5),  # VmHWM; ru_maxrss is printed beside it and should agree
}

NO_PEER = (
    "llama-cpp-python is not importable. It is the peer for every figure here and comes with the "
    "optional `bench` extra: pip install -e '.[bench]'"
)

SYSTEM = "You are a careful assistant. Answer in plain English, briefly and accurately."
INSTRUCTION = "Read the passage below and summarise it in three sentences."
PASSAGE = (
    "The first lighthouses were little more than fires lit on hilltops, kept burning through the night by "
    "watchmen who were paid in grain. As trade across the Mediterranean grew, harbours began to build "
    "towers so that the flames could be seen from farther out at sea. The most famous of these stood on "
    "the island of Pharos, at the entrance to the port of Alexandria, and for centuries it was counted "
    "among the wonders of the world. Its keepers burned wood and oil, and some accounts say that a great "
    "polished mirror threw the light toward the horizon during the night and reflected the sun by day. "
    "After the fall of Rome, many coastal lights went dark, and sailors once again relied on landmarks, "
    "soundings and the stars. The revival came slowly. Medieval ports kept lamps in church towers, and "
    "merchant guilds paid for beacons on dangerous headlands. In the eighteenth century, engineers began "
    "to treat the problem as a science. They built towers of interlocking stone that could survive the "
    "worst storms, and they replaced open fires with oil lamps set in front of curved reflectors. The "
    "greatest change arrived in 1822, when the French physicist Augustin Fresnel described a lens made of "
    "concentric rings of glass. His design gathered the light of a single lamp into a narrow, powerful "
    "beam that could be seen more than twenty miles away, and it used far less fuel than the mirrors it "
    "replaced. Within a few decades, Fresnel lenses shone from coasts on every continent. Each light was "
    "given its own pattern of flashes, so that a navigator could tell one station from another simply by "
    "counting the seconds between them. Keepers lived in small houses at the foot of the towers, trimming "
    "wicks, polishing brass and recording the weather in careful logbooks. Electricity, radio beacons and "
    "finally satellite navigation made most of that work unnecessary, and today nearly every lighthouse "
    "runs automatically, although many are still maintained because a bright light on a dark shore "
    "remains the simplest warning a sailor can understand."
)


# -- the prompt ---------------------------------------------------------------------------------------------
def build_prompt_ids(model_dir: Path, n_tokens: int = PROMPT_TOKENS) -> list[int]:
    """System + user message rendered with the model's chat template, the passage cut to fit `n_tokens`.

    The template is rendered with a marker in place of the passage; the text before and after the marker
    and the passage are encoded separately and the passage ids are cut so the whole is exactly `n_tokens`.
    Deterministic, and every engine gets these ids (not text), so tokenizers cannot differ.
    """
    from llmos.chat_template import ChatTemplate
    from llmos.manifest import ModelManifest
    from llmos.tokenizer import Tokenizer

    manifest = ModelManifest.read(model_dir)
    tok = Tokenizer.load(model_dir)
    if not manifest.chat_template:
        raise SystemExit(f"{model_dir} has no chat template")
    bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else ""
    template = ChatTemplate(manifest.chat_template, bos, tok.id_to_token(tok.eos_id))
    marker = "\x00PASSAGE\x00"
    rendered = template.render(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": INSTRUCTION + "\n\n" + marker}],
        add_generation_prompt=True,
    )
    head, tail = rendered.split(marker)

    def enc(text: str, first: bool, special: bool = True) -> list[int]:
        ids = tok.encode(text, parse_special=special)
        if not first and tok.add_bos and ids and ids[0] == tok.bos_id:
            ids = ids[1:]
        return ids

    head_ids, tail_ids = enc(head, True), enc(tail, False)
    room = n_tokens - len(head_ids) - len(tail_ids)
    body = enc(PASSAGE, False, special=False)
    if room < 1 or len(body) < room:
        raise SystemExit(f"the bench passage ({len(body)} tokens) cannot fill {room} prompt tokens")
    ids = head_ids + body[:room] + tail_ids
    assert len(ids) == n_tokens
    return ids


def source_state() -> str:
    """Which llmos code is measured: its directory, git commit and whether llmos/ has local changes."""
    import llmos

    pkg = Path(llmos.__file__).resolve().parent
    try:
        git = ["git", "-C", str(pkg.parent)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "llmos"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return f"{pkg} (not a git checkout)"
    return f"{pkg} at {head}" + (f" + {len(dirty)} uncommitted change(s) under llmos/" if dirty else "")


# -- the preparation child ---------------------------------------------------------------------------------
def prep_child() -> None:
    """Check llama_cpp imports, import/check the llmos graph, build the prompt ids; report versions."""
    cfg = _common.read_config()
    try:
        import llama_cpp
    except Exception as e:  # ImportError, or OSError from a broken shared library
        _common.emit({"error": "llama_cpp", "message": f"{type(e).__name__}: {e}"})
        return
    import onnxruntime

    from llmos.default_model import DEFAULT_MODEL_NAME, default_gguf_path
    from llmos.model_store import ModelStore

    store = ModelStore(cfg["store"])
    gguf = default_gguf_path(lambda msg: print(msg, file=sys.stderr))
    model_dir = store.import_gguf(
        gguf, precision=cfg["precision"], name=DEFAULT_MODEL_NAME, make_default=store.default_dir() is None
    )
    _common.emit(
        {
            "model_dir": str(model_dir),
            "gguf": str(gguf),
            "store": str(store.root),
            "llmos_source": source_state(),
            "prompt_ids": build_prompt_ids(model_dir),
            "onnxruntime": onnxruntime.__version__,
            "llama_cpp_python": llama_cpp.__version__,
        }
    )


# -- the llmos child ----------------------------------------------------------------------------------------
def llmos_child() -> None:
    cfg = _common.read_config()
    from llmos.engine.llm_engine import LLMEngine
    from llmos.engine.sampling import SamplingParams

    prompt, n_new, threads = [int(t) for t in cfg["prompt_ids"]], int(cfg["new_tokens"]), int(cfg["threads"])
    before_load = _common.memory_mb()  # modules imported, nothing loaded
    load_cpu, load_load = _common.cpu_s(), os.getloadavg()[0]
    t0 = time.perf_counter()
    # warmup=False: the engine's own 16-token warm-up would count as load time; we warm up below instead.
    engine = LLMEngine(cfg["model_dir"], threads=threads, max_context=int(cfg["n_ctx"]), warmup=False)
    load_s = time.perf_counter() - t0
    load_cpu = _common.cpu_s() - load_cpu
    after_load = _common.memory_mb()
    runner = engine.runner

    def runner_generation() -> dict[str, Any]:
        cache = engine.pool.allocate()  # not timed, like llm.reset()
        try:
            return _common.timed_greedy(
                lambda ids: runner.prefill(cache, ids)[-1],
                lambda t: runner.decode([cache], [t])[0],
                prompt,
                n_new,
            )
        finally:
            cache.free()

    warm = [runner_generation() for _ in range(int(cfg.get("warmup", 1)))]
    run = _common.rates(runner_generation(), len(prompt))

    params = SamplingParams.of(max_tokens=n_new, ignore_eos=True)
    c0, t0 = _common.cpu_s(), time.perf_counter()
    comp = engine.generate(prompt, params)
    wall = time.perf_counter() - t0
    u = comp.usage
    gen = {
        "prefill_s": u.prefill_s,
        "ttft_s": u.ttft_s,
        "decode_s": u.decode_s,
        "total_s": wall,
        "cpu_s": _common.cpu_s() - c0,
        "prefill_tok_s": u.prefill_tok_s,
        "decode_tok_s": u.decode_tok_s,
        # end to end: every decode step with its sampler and detokenizer work, not only the graph runs
        "decode_wall_tok_s": (u.completion_tokens - 1) / max(wall - u.ttft_s, 1e-9),
        "same_ids_as_runner": comp.token_ids == run["ids"],
    }
    files = ("model.onnx", "model.onnx.data", "tokenizer.json")
    _common.emit(
        {
            "engine": "llmos",
            "load_s": load_s,
            "load_cpu_s": load_cpu,
            "loadavg_at_start": load_load,
            "before_load": before_load,
            "after_load": after_load,
            "provider": runner.provider,
            "precision": engine.manifest.precision,
            "warmup": [{k: v for k, v in w.items() if k != "ids"} for w in warm],
            "run": run,
            "generate": gen,
            "text": engine.tokenizer.decode(run["ids"]),
            "model_bytes": sum(
                os.path.getsize(Path(cfg["model_dir"]) / f)
                for f in files
                if (Path(cfg["model_dir"]) / f).is_file()
            ),
            **_common.memory_mb(),
        }
    )


# -- the sanity child (untimed, after all timed runs) ------------------------------------------------------
def check_child() -> None:
    """Teacher-forced agreement: llmos's argmax at every position of each peer's greedy sequence.

    Free-running greedy sequences part at the first near-tie (tiny numeric differences pick the other
    token, and from there the texts differ), so agreement of the free-running texts says little; this
    says how often llmos picks the same next token as the peer given the same prefix.
    """
    cfg = _common.read_config()
    import numpy as np

    from llmos.engine.llm_engine import LLMEngine

    engine = LLMEngine(
        cfg["model_dir"],
        threads=int(cfg["threads"]),
        max_context=int(cfg["n_ctx"]),
        max_batch=1,
        warmup=False,
    )
    prompt = [int(t) for t in cfg["prompt_ids"]]
    out = {}
    for name, ids in cfg["peers"].items():
        cache = engine.pool.allocate()
        try:
            logits = engine.runner.prefill(cache, prompt + ids[:-1], all_logits=True)[len(prompt) - 1 :]
        finally:
            cache.free()
        picks = logits.argmax(-1)
        # how far below llmos's own pick the peer's token scored, at the worst position where they differ
        behind = logits.max(-1) - logits[np.arange(len(ids)), ids]
        out[name] = {
            "agree": int((picks == np.asarray(ids)).sum()),
            "n": len(ids),
            "max_logit_gap_where_differs": float(behind.max()),
        }
    _common.emit(out)


# -- the parent ---------------------------------------------------------------------------------------------
def _cpu_busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def others_busy(window: float = 2.0) -> float:
    """Share of all cores that other processes used over `window` seconds (this process sleeps)."""
    b0, t0 = _cpu_busy_jiffies()
    time.sleep(window)
    b1, t1 = _cpu_busy_jiffies()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_for_quiet(max_wait: float, below: float) -> tuple[float, float]:
    """Sleep until other processes use less than `below` of the machine, at most `max_wait` seconds.

    Returns (seconds waited, the last busy share seen). Other people's test runs on a shared machine
    skew a timed child far more than run-to-run variance does."""
    t0 = time.monotonic()
    busy = others_busy()
    while busy >= below and time.monotonic() - t0 < max_wait:
        time.sleep(3.0)
        busy = others_busy()
    return time.monotonic() - t0, busy


def run_child(name: str, argv: list[str], cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one child to completion (nothing else of ours runs meanwhile); add how busy the rest of the
    machine was during it: CPU seconds used by other processes, as a fraction of all cores."""
    hz = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0, _ = _cpu_busy_jiffies()
    t0 = time.perf_counter()
    proc = subprocess.run(
        argv,
        input=json.dumps(cfg),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
        check=False,
    )
    wall = time.perf_counter() - t0
    b1, _ = _cpu_busy_jiffies()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = _common.parse_result(proc.stdout)
    if proc.returncode != 0 or res is None:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"the {name} child failed (exit {proc.returncode})")
    child_cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    other = max((b1 - b0) / hz - child_cpu, 0.0)
    res["child_wall_s"] = wall
    res["other_cpu_frac"] = other / (wall * ncpu)
    return res


def measured_child(
    label: str,
    name: str,
    cmd: list[str],
    cfg: dict[str, Any],
    args: argparse.Namespace,
    discarded: list[dict[str, Any]],
    rnd: int,
) -> dict[str, Any]:
    """One timed generation child on a quiet machine: wait for quiet (`args.quiet_wait`, `quiet_below`),
    run it, and run it again (up to `args.retries` times) when other processes used at least
    `quiet_below` of the CPUs meanwhile; thrown-away runs go to `discarded`. Prints one line."""
    for attempt in range(args.retries + 1):
        waited, busy = (
            wait_for_quiet(args.quiet_wait, args.quiet_below) if args.quiet_wait > 0 else (0.0, float("nan"))
        )
        res = run_child(name, cmd, cfg, timeout=900)
        res["quiet_wait_s"], res["others_busy_before"] = waited, busy
        res["contended"] = res["other_cpu_frac"] >= args.quiet_below
        if not res["contended"] or attempt == args.retries:
            break
        discarded.append({"round": rnd, "name": name, **res})
        print(
            f"  {label} discarded: other processes used "
            f"{res['other_cpu_frac'] * 100:.0f}% of the CPUs during it; running it again",
            flush=True,
        )
    r = res["run"]
    print(
        f"  {label} prefill {r['prefill_tok_s']:7.1f} tok/s  "
        f"TTFT {r['ttft_s'] * 1000:6.1f} ms  decode {r['decode_tok_s']:6.1f} tok/s  "
        f"RSS {res.get('vmhwm_mb', float('nan')):6.1f} MB  load {res['load_s']:.2f} s  "
        f"others {res['other_cpu_frac'] * 100:3.0f}% CPU"
        + (" CONTENDED" if res["contended"] else "")
        + (f" (waited {waited:.0f} s)" if waited >= 5 else ""),
        flush=True,
    )
    return res


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    def vals(key: str, src: str = "run") -> list[float]:
        return [r[src][key] if src else r[key] for r in results]

    rows = {
        "prefill_tok_s": vals("prefill_tok_s"),
        "ttft_ms": [v * 1000 for v in vals("ttft_s")],
        "decode_tok_s": vals("decode_tok_s"),
        "ru_maxrss_mb": vals("ru_maxrss_mb", ""),
        "vmhwm_mb": [r.get("vmhwm_mb", float("nan")) for r in results],
        "model_mb": [r["model_bytes"] / 1e6 for r in results],
        "load_s": vals("load_s", ""),
        "other_cpu_frac": vals("other_cpu_frac", ""),
    }
    out: dict[str, Any] = {k: statistics.median(v) for k, v in rows.items()}
    out["spread"] = {k: (min(v), max(v)) for k, v in rows.items()}
    out["n"] = len(results)
    out["contended"] = sum(bool(r.get("contended")) for r in results)
    return out


def ratio_checks(
    llmos: dict[str, Any], peer: dict[str, Any], targets: dict[str, tuple[str, str, float]] | None = None
) -> list[dict[str, Any]]:
    checks = []
    for label, (key, op, bound) in (targets or TARGETS).items():
        r = llmos[key] / peer[key]
        ok = r >= bound if op == ">=" else r <= bound
        checks.append({"metric": label, "ratio": r, "target": f"{op} {bound}x", "pass": ok})
    return checks


def agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    """(positions where the two agree, length of the common prefix)."""
    same = sum(x == y for x, y in zip(a, b, strict=False))
    prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return same, prefix


def machine() -> str:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, {platform.system()} {platform.release()}"


def busy_processes(limit: int = 5) -> list[str]:
    """The busiest other processes right now (ps %CPU is their lifetime average)."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    me = os.getpid()
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and int(parts[0]) != me and float(parts[1]) >= 20.0 and "ps -eo" not in parts[3]:
            rows.append(f"pid {parts[0]} {parts[1]}% ({parts[2]}): {parts[3][:90]}")
    return rows[:limit]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of every engine (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    ap.add_argument(
        "--precision",
        choices=("int4", "int8", "fp32"),
        default="int4",
        help="llmos graph precision; imported into the store if missing (default int4)",
    )
    ap.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="model store root (default: the user model store, see llmos.paths)",
    )
    ap.add_argument(
        "--n-ctx",
        type=int,
        default=N_CTX,
        help="context both engines are configured for (default 1024; 8192 = the model's full context, "
        "which llama.cpp allocates up front and llmos commits as it fills)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--no-flash-attn", action="store_true", help="skip the llama.cpp flash_attn=True row")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="before each child, wait up to this many seconds for other processes to go "
        "quiet (default 120; 0 = never wait)",
    )
    ap.add_argument(
        "--quiet-below",
        type=float,
        default=0.15,
        help="'quiet' = other processes use less than this share of all cores (default 0.15)",
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=2,
        help="run a child again (up to this many times) when other processes used at least "
        "--quiet-below of the CPUs while it ran (default 2)",
    )
    ap.add_argument("--child-llmos", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-prep", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_llmos:
        llmos_child()
        return 0
    if args.child_prep:
        prep_child()
        return 0
    if args.child_check:
        check_child()
        return 0
    if args.rounds < 1 or args.threads < 1:
        ap.error("--rounds and --threads must be at least 1")

    if importlib.util.find_spec("llama_cpp") is None:
        print(NO_PEER, file=sys.stderr)
        return 2
    # Everything heavy (llmos, onnxruntime, the model import) happens in a child, so this process stays
    # small: a child's ru_maxrss also counts the memory of the process it was forked from.
    print("checking the model store (the first run imports the graph, which takes a minute) ...", flush=True)
    prep = subprocess.run(
        [sys.executable, str(BENCH_DIR / "engine.py"), "--child-prep"],
        cwd=str(REPO),
        input=json.dumps(
            {"store": str(args.model_dir) if args.model_dir else None, "precision": args.precision}
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    info = _common.parse_result(prep.stdout)
    if info is None:
        sys.stderr.write(prep.stdout[-2000:] + prep.stderr[-4000:])
        print(f"preparing the model failed (exit {prep.returncode})", file=sys.stderr)
        return 1
    if info.get("error") == "llama_cpp":
        print(NO_PEER + f"\n({info['message']})", file=sys.stderr)
        return 2
    model_dir, gguf, prompt_ids = Path(info["model_dir"]), Path(info["gguf"]), info["prompt_ids"]

    base = {
        "prompt_ids": prompt_ids,
        "new_tokens": NEW_TOKENS,
        "threads": args.threads,
        "n_ctx": args.n_ctx,
        "n_batch": N_BATCH,
        "warmup": 1,
    }
    py = sys.executable
    engines: list[tuple[str, list[str], dict[str, Any]]] = [
        ("llmos", [py, str(BENCH_DIR / "engine.py"), "--child-llmos"], {**base, "model_dir": str(model_dir)}),
        ("llama.cpp", [py, str(BENCH_DIR / "_peer_llamacpp.py")], {**base, "gguf": str(gguf)}),
    ]
    if not args.no_flash_attn:
        engines.append(
            (
                "llama.cpp flash_attn",
                [py, str(BENCH_DIR / "_peer_llamacpp.py")],
                {**base, "gguf": str(gguf), "flash_attn": True},
            )
        )

    started = dt.datetime.now().astimezone()
    busy_before = busy_processes()
    print(f"{started:%Y-%m-%d %H:%M %Z} | {machine()} | load avg {os.getloadavg()[0]:.2f}")
    print(
        f"onnxruntime {info['onnxruntime']}, llama-cpp-python {info['llama_cpp_python']}, "
        f"python {platform.python_version()}"
    )
    print(f"llmos code: {info['llmos_source']}")
    print(f"llmos {args.precision} graph: {model_dir}\nGGUF: {gguf}")
    print(
        f"prompt {len(prompt_ids)} tokens, {NEW_TOKENS} greedy tokens (EOS ignored), "
        f"{args.threads} threads, {args.rounds} rounds, children run one at a time"
    )
    for b in busy_before:
        print(f"  busy before: {b}")

    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in engines}
    discarded: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        order = engines[rnd % len(engines) :] + engines[: rnd % len(engines)]  # rotate who goes first
        for name, cmd, cfg in order:
            res = measured_child(f"round {rnd + 1} {name:<21}", name, cmd, cfg, args, discarded, rnd + 1)
            results[name].append(res)
    busy_after = busy_processes()

    summary = {name: summarize(rs) for name, rs in results.items()}
    header = (
        f"{'engine':<22}{'prefill tok/s':>14}{'TTFT ms':>9}{'decode tok/s':>14}{'peak RSS MB':>13}"
        f"{'ru_maxrss MB':>14}{'model MB':>10}{'load s':>8}"
    )
    print(f"\nmedians over {args.rounds} round(s)\n{header}\n{'-' * len(header)}")
    for name, s in summary.items():
        print(
            f"{name:<22}{s['prefill_tok_s']:>14.1f}{s['ttft_ms']:>9.1f}{s['decode_tok_s']:>14.1f}"
            f"{s['vmhwm_mb']:>13.1f}{s['ru_maxrss_mb']:>14.1f}{s['model_mb']:>10.1f}{s['load_s']:>8.2f}"
        )
    print("spread (min-max):")
    for name, s in summary.items():
        sp = s["spread"]
        print(
            f"  {name:<21} prefill {sp['prefill_tok_s'][0]:.0f}-{sp['prefill_tok_s'][1]:.0f}  "
            f"TTFT {sp['ttft_ms'][0]:.0f}-{sp['ttft_ms'][1]:.0f}  "
            f"decode {sp['decode_tok_s'][0]:.1f}-{sp['decode_tok_s'][1]:.1f}  "
            f"others' CPU {sp['other_cpu_frac'][0] * 100:.0f}-{sp['other_cpu_frac'][1] * 100:.0f}%"
            + (f"  ({s['contended']} kept run(s) contended)" if s["contended"] else "")
        )
    if discarded:
        print(
            f"  {len(discarded)} run(s) discarded and repeated because other processes were busy "
            f"(kept in --json)"
        )

    gens = [r["generate"] for r in results["llmos"]]
    med = {
        k: statistics.median(g[k] for g in gens)
        for k in ("prefill_tok_s", "ttft_s", "decode_tok_s", "decode_wall_tok_s")
    }
    print(
        "llmos via LLMEngine.generate() (cross-check, usage figures): "
        f"prefill {med['prefill_tok_s']:.1f} tok/s, "
        f"TTFT {med['ttft_s'] * 1000:.1f} ms, decode {med['decode_tok_s']:.1f} tok/s (graph runs only), "
        f"{med['decode_wall_tok_s']:.1f} tok/s end to end; same ids as the runner loop: "
        f"{all(g['same_ids_as_runner'] for g in gens)}"
    )

    checks = ratio_checks(summary["llmos"], summary["llama.cpp"])
    print("\nllmos / llama.cpp (default row):")
    for c in checks:
        verdict = "PASS" if c["pass"] else "MISS"
        print(f"  {c['metric']:<9} {c['ratio']:6.2f}x   target {c['target']:<8} {verdict}")
    fa = summary.get("llama.cpp flash_attn")
    if fa:
        print(
            "  vs the flash_attn row: "
            + ", ".join(
                f"{label} {summary['llmos'][key] / fa[key]:.2f}x" for label, (key, _, _) in TARGETS.items()
            )
        )

    l_ids = results["llmos"][0]["run"]["ids"]
    print("\ngreedy text (first 60 chars):")
    print(f"  llmos     {results['llmos'][0]['text'][:60]!r}")
    peers = {name: rs[0]["run"]["ids"] for name, rs in results.items() if name != "llmos"}
    forced = run_child(
        "check",
        [py, str(BENCH_DIR / "engine.py"), "--child-check"],
        {**base, "model_dir": str(model_dir), "peers": peers},
        timeout=900,
    )
    agree = {}
    for name, ids in peers.items():
        same, prefix = agreement(l_ids, ids)
        f = forced[name]
        agree[name] = {"same": same, "common_prefix": prefix, "teacher_forced": f}
        print(f"  {name:<9} {results[name][0]['text'][:60]!r}")
        print(
            f"    {same}/{NEW_TOKENS} tokens agree with llmos (identical for the first {prefix}); "
            f"teacher-forced on {name}'s tokens, llmos picks the same next token {f['agree']}/{f['n']}"
            f" (where not, the peer's token is at most {f['max_logit_gap_where_differs']:.2f} logits "
            "behind llmos's)"
        )
    stable = {name: all(r["run"]["ids"] == rs[0]["run"]["ids"] for r in rs) for name, rs in results.items()}
    if not all(stable.values()):
        print(f"  note: greedy ids differed between rounds: {stable}")
    for b in busy_after:
        print(f"  busy after: {b}")

    if args.json:
        doc = {
            "bench": "engine",
            "date": started.isoformat(timespec="seconds"),
            "machine": machine(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "rounds": args.rounds,
            "threads": args.threads,
            "precision": args.precision,
            "model_dir": str(model_dir),
            "gguf": str(gguf),
            "llmos_source": info["llmos_source"],
            "onnxruntime": info["onnxruntime"],
            "llama_cpp_python": info["llama_cpp_python"],
            "prompt_tokens": len(prompt_ids),
            "new_tokens": NEW_TOKENS,
            "prompt_ids": prompt_ids,
            "summary": summary,
            "checks": checks,
            "llmos_generate_median": med,
            "agreement": agree,
            "busy_before": busy_before,
            "busy_after": busy_after,
            "results": results,
            "discarded_contended_runs": discarded,
        }
        _common.write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
