"""Engine speed and memory at real sizes: llmos against llama.cpp on 0.5B and 1B models in Q4_0/Q4_1/Q4_K_M.

bench/engine.py measures the default 135M model. This measures the models people actually download, by
shape: random-weight llama models built by bench/synthetic_model.py (Qwen2.5-0.5B's and Llama-3.2-1B's
bodies with SmolLM2's tokenizer and tied embeddings), written as F16 and quantized by llama.cpp's own
quantizer, cached under ~/.cache/llmos/bench/synthetic. Speed does not depend on the weight values.

Per model x format ("row"):

1. import: `ModelStore(<bench store>).import_gguf(gguf, "int4")` in its own child, timed, peak RSS
   (VmHWM) read at the end. A row whose import fails is reported by name in one line; its llama.cpp
   figures are still measured.
2. timing: exactly bench/engine.py's children (the same 256-token chat prompt ids, 128 greedy tokens
   with EOS ignored, `--threads`, the same n_ctx for both engines, one untimed warm-up generation per
   child), llmos and llama.cpp alternating for `--rounds` rounds, each child on a quiet machine and run
   again when contended (engine.py's `measured_child`). Medians are reported.
3. bytes per decoded token: computed from the files by bench/decode_bytes.py (llama.cpp: the GGUF tensors
   a step reads; llmos: onnxruntime's prepacked MatMulNBits layout plus the other initializers), beside
   the resident-set growth of each engine's load as a measured check; effective GB/s = bytes/token x
   decode tok/s, set beside this machine's read bandwidth measured by bench/membw.py (before and after).

    .venv/bin/python bench/engine_sizes.py --rounds 3 [--sizes 0.5B 1B] [--formats Q4_0 Q4_1 Q4_K_M]
        [--threads 2] [--n-ctx 1024] [--reuse-imports] [--json out.json]

Needs the `bench` extra (llama-cpp-python); exits 2 without it. Results and method: docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common
import engine

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SIZES = ("0.5B", "1B")
FORMATS = ("Q4_0", "Q4_1", "Q4_K_M")
MEAN_DECODE_POSITION = engine.PROMPT_TOKENS + engine.NEW_TOKENS // 2

# llmos / llama.cpp, per row (issue 11): (metric key, ratio must be >= or <=, bound)
TARGETS = {
    "decode": ("decode_tok_s", ">=", 1.0),
    "prefill": ("prefill_tok_s", ">=", 1.5),
    "TTFT": ("ttft_ms", "<=", 0.7),
    "peak RSS": ("vmhwm_mb", "<=", 1.1),
    "disk": ("model_mb", "<=", 1.15),
}
IMPORT_RSS_TARGET = 1.5  # import peak RSS <= 1.5x the GGUF's size


def bench_dir() -> Path:
    from llmos.paths import cache_dir

    return cache_dir() / "bench"


# -- children -----------------------------------------------------------------------------------------------
def build_child() -> None:
    """Build (or find cached) one synthetic GGUF; report its path, size and tensor types."""
    cfg = _common.read_config()
    from collections import Counter

    import decode_bytes
    import synthetic_model
    from gguf import GGUFReader

    t0 = time.perf_counter()
    path = synthetic_model.ensure_model(
        cfg["size"],
        cfg["format"],
        Path(cfg["tokenizer_gguf"]),
        Path(cfg["cache"]),
        threads=int(cfg["threads"]),
        say=lambda m: print(m, file=sys.stderr, flush=True),
    )
    build_s = time.perf_counter() - t0
    types = Counter(t.tensor_type.name for t in GGUFReader(path, "r").tensors)
    shape = synthetic_model.SHAPES[cfg["size"]]
    head_dim = shape.n_embd // shape.n_head

    def kv(itemsize: int) -> int:
        return decode_bytes.kv_bytes_per_token(
            shape.n_layer, shape.n_head_kv, head_dim, MEAN_DECODE_POSITION, itemsize
        )

    _common.emit(
        {
            "gguf": str(path),
            "bytes": path.stat().st_size,
            "types": dict(types),
            "s": build_s,
            "gguf_decode": decode_bytes.gguf_decode_bytes(path),
            # KV a decode step reads at the mean position; llmos keeps fp32 KV, llama.cpp f16 (its default)
            "kv_bytes_per_token": {"position": MEAN_DECODE_POSITION, "llmos": kv(4), "llama.cpp": kv(2)},
        }
    )


def import_child() -> None:
    """Import one GGUF into the bench store (fresh unless `reuse`); time it, read its peak RSS."""
    cfg = _common.read_config()
    import decode_bytes

    from llmos.engine import native_ops
    from llmos.graph_builder import BUILDER_VERSION
    from llmos.manifest import ModelManifest
    from llmos.model_store import ModelStore

    store = ModelStore(cfg["store"])
    target = store.root / f"{cfg['name']}--int4"
    reused = bool(cfg.get("reuse")) and (target / "manifest.json").is_file()
    if not reused and target.exists():
        shutil.rmtree(target)
    t0 = time.perf_counter()
    try:
        model_dir = store.import_gguf(cfg["gguf"], precision="int4", name=cfg["name"])
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _common.emit({"error": f"{type(e).__name__}: {msg}"[:300], **_common.memory_mb()})
        return
    import_s = time.perf_counter() - t0
    mem = _common.memory_mb()  # before anything below can raise the high-water mark
    files = ("model.onnx", "model.onnx.data", "tokenizer.json")  # what engine.py counts as the model
    _common.emit(
        {
            "model_dir": str(model_dir),
            "reused": reused,
            "builder_version": BUILDER_VERSION,
            "import_s": None if reused else import_s,
            "disk_bytes": sum((model_dir / f).stat().st_size for f in files if (model_dir / f).is_file()),
            "llmos_decode": decode_bytes.llmos_decode_bytes(model_dir),
            "exact_weights": ModelManifest.read(model_dir).exact_weights,
            "custom_op_domains": ModelManifest.read(model_dir).custom_op_domains,
            "native_ops_unavailable": native_ops.unavailable_reason(),
            **mem,
        }
    )


# -- the parent ---------------------------------------------------------------------------------------------
def quiet_child(name: str, cmd: list[str], cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run an import or bandwidth child on a quiet machine, again (up to `--retries` times) when other
    processes were busy during it, as engine.measured_child does; a crashed child is a result."""
    for attempt in range(args.retries + 1):
        waited, busy = (
            engine.wait_for_quiet(args.quiet_wait, args.quiet_below)
            if args.quiet_wait > 0
            else (0.0, float("nan"))
        )
        try:
            res = engine.run_child(name, cmd, cfg, timeout=3600)
        except SystemExit as e:  # the child died (killed, out of memory, segfault) without a result
            return {"error": str(e), "other_cpu_frac": float("nan"), "contended": False}
        res["quiet_wait_s"], res["others_busy_before"] = waited, busy
        res["contended"] = res["other_cpu_frac"] >= args.quiet_below
        if not res["contended"] or attempt == args.retries or res.get("error"):
            return res
        print(
            f"  {name}: other processes used {res['other_cpu_frac'] * 100:.0f}% of the CPUs during it; "
            "running it again",
            flush=True,
        )
    raise AssertionError("unreachable")


def print_bandwidth(bw: dict[str, Any], threads: int) -> None:
    if bw.get("error"):
        print(f"memory bandwidth: not measured ({bw['error']})")
        return
    print(
        f"memory bandwidth: read {bw['read_1t_gb_s']:.1f} GB/s (1 thread), {bw['read_gb_s']:.1f} GB/s "
        f"({threads} threads), copy {bw['copy_gb_s']:.1f} GB/s; others {bw['other_cpu_frac'] * 100:.0f}% CPU",
        flush=True,
    )


def ops_used(imp: dict[str, Any]) -> str:
    """Which matrix ops the imported graph uses, and why not the native one if it is missing."""
    d = imp["llmos_decode"]
    native = " + ".join(f"{n} native {t}" for t, n in sorted(d["native_nodes"].items()))
    out = f"{d['matmulnbits_nodes']} MatMulNBits" + (f" + {native}" if native else "")
    if imp.get("native_ops_unavailable"):
        out += " (native op library unavailable)"
    return out


def mb(x: float | None) -> float:
    return float("nan") if x is None else x / 1e6


def fmt_ratio(x: float | None) -> str:
    return "    -" if x is None else f"{x:5.2f}x"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per row (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    ap.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    ap.add_argument("--n-ctx", type=int, default=engine.N_CTX, help="context for both engines (default 1024)")
    ap.add_argument(
        "--cache", type=Path, default=None, help="bench cache (default ~/.cache/llmos/bench): GGUFs, store"
    )
    ap.add_argument(
        "--reuse-imports",
        action="store_true",
        help="keep llmos models already in the bench store (import time and RSS are then not measured)",
    )
    ap.add_argument(
        "--native-ops",
        choices=("auto", "off"),
        default="auto",
        help="auto: import as llmos does (its native GGUF ops when the library loads, see "
        "llmos/engine/native_ops.py and $LLMOS_GGUF_OPS); off: MatMulNBits for every matrix",
    )
    ap.add_argument("--membw-mb", type=int, default=1024, help="bandwidth buffer in MiB (default 1024)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="as in bench/engine.py (default 120)")
    ap.add_argument("--quiet-below", type=float, default=0.15, help="as in bench/engine.py (default 0.15)")
    ap.add_argument("--retries", type=int, default=2, help="as in bench/engine.py (default 2)")
    ap.add_argument("--child-build", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-import", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_build:
        build_child()
        return 0
    if args.child_import:
        import_child()
        return 0
    if args.rounds < 1 or args.threads < 1:
        ap.error("--rounds and --threads must be at least 1")
    if importlib.util.find_spec("llama_cpp") is None:
        print(engine.NO_PEER, file=sys.stderr)
        return 2

    py, me = sys.executable, str(BENCH_DIR / "engine_sizes.py")
    cache = args.cache or bench_dir()
    store = cache / "store"
    if args.native_ops == "off":  # every child inherits it: a library path that does not exist
        os.environ["LLMOS_GGUF_OPS"] = str(cache / "no-native-ops" / "absent.so")
        store = cache / "store-matmulnbits"
    print("preparing: the default model gives the tokenizer and the prompt ids ...", flush=True)
    prep = subprocess.run(
        [py, str(BENCH_DIR / "engine.py"), "--child-prep"],
        cwd=str(REPO),
        input=json.dumps({"store": None, "precision": "int4"}),
        capture_output=True,
        text=True,
        check=False,
    )
    info = _common.parse_result(prep.stdout)
    if info is None or info.get("error"):
        sys.stderr.write(prep.stdout[-2000:] + prep.stderr[-4000:])
        print(f"preparing failed (exit {prep.returncode})", file=sys.stderr)
        return 2 if info and info.get("error") == "llama_cpp" else 1
    prompt_ids = info["prompt_ids"]

    rows = [(s, f) for s in args.sizes for f in args.formats]
    built: dict[tuple[str, str], dict[str, Any]] = {}
    for size, f in rows:
        proc = subprocess.run(
            [py, me, "--child-build"],
            cwd=str(REPO),
            input=json.dumps(
                {
                    "size": size,
                    "format": f,
                    "cache": str(cache / "synthetic"),
                    "tokenizer_gguf": info["gguf"],
                    "threads": args.threads,
                }
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        res = _common.parse_result(proc.stdout)
        if res is None:
            sys.stderr.write(proc.stderr[-3000:])
            print(f"building the {size} {f} model failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        built[size, f] = res
        types = ", ".join(f"{k} {v}" for k, v in sorted(res["types"].items()))
        print(f"  {size} {f}: {Path(res['gguf']).name}, {mb(res['bytes']):.1f} MB ({types})", flush=True)

    started = dt.datetime.now().astimezone()
    print(f"\n{started:%Y-%m-%d %H:%M %Z} | {engine.machine()} | load avg {os.getloadavg()[0]:.2f}")
    print(
        f"onnxruntime {info['onnxruntime']}, llama-cpp-python {info['llama_cpp_python']}, "
        f"python {platform.python_version()}\nllmos code: {info['llmos_source']}"
    )
    print(f"native GGUF ops: {args.native_ops} (LLMOS_GGUF_OPS={os.environ.get('LLMOS_GGUF_OPS', 'unset')})")
    print(
        f"prompt {len(prompt_ids)} tokens, {engine.NEW_TOKENS} greedy tokens (EOS ignored), "
        f"{args.threads} threads, n_ctx {args.n_ctx}, {args.rounds} rounds per row"
    )
    busy_before = engine.busy_processes()
    for b in busy_before:
        print(f"  busy before: {b}")

    membw_cmd = [py, str(BENCH_DIR / "membw.py"), "--child"]
    membw_cfg = {"mb": args.membw_mb, "threads": args.threads, "reps": 5}
    bandwidth = [quiet_child("membw", membw_cmd, membw_cfg, args)]
    print_bandwidth(bandwidth[0], args.threads)

    print("\nimporting into llmos (int4) ...", flush=True)
    imports: dict[tuple[str, str], dict[str, Any]] = {}
    for size, f in rows:
        gguf = built[size, f]["gguf"]
        res = quiet_child(
            "import",
            [py, me, "--child-import"],
            {"gguf": gguf, "store": str(store), "name": f"bench-{size}-{f}", "reuse": args.reuse_imports},
            args,
        )
        imports[size, f] = res
        if res.get("error"):
            print(f"  {size} {f}: IMPORT FAILED: {res['error']}", flush=True)
            continue
        if res["reused"]:
            print(f"  {size} {f}: already in the bench store (--reuse-imports), import not measured")
            continue
        ratio = res["vmhwm_mb"] * 1e6 / built[size, f]["bytes"]
        print(
            f"  {size} {f}: imported, {res['import_s']:.1f} s, peak RSS {res['vmhwm_mb']:.0f} MB = "
            f"{ratio:.2f}x the GGUF, {mb(res['disk_bytes']):.1f} MB on disk, {ops_used(res)}; "
            f"others {res['other_cpu_frac'] * 100:.0f}% CPU",
            flush=True,
        )

    base = {
        "prompt_ids": prompt_ids,
        "new_tokens": engine.NEW_TOKENS,
        "threads": args.threads,
        "n_ctx": args.n_ctx,
        "n_batch": engine.N_BATCH,
        "warmup": 1,
    }
    results: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    discarded: list[dict[str, Any]] = []

    def save(report: list[dict[str, Any]], busy_after: list[str], complete: bool) -> None:
        """Write --json; also after every row (complete=False), so an interrupted run keeps its rows."""
        if not args.json:
            return
        doc = {
            "bench": "engine_sizes",
            "complete": complete,
            "date": started.isoformat(timespec="seconds"),
            "machine": engine.machine(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "rounds": args.rounds,
            "threads": args.threads,
            "n_ctx": args.n_ctx,
            "native_ops": args.native_ops,
            "llmos_gguf_ops_env": os.environ.get("LLMOS_GGUF_OPS"),
            "llmos_source": info["llmos_source"],
            "onnxruntime": info["onnxruntime"],
            "llama_cpp_python": info["llama_cpp_python"],
            "prompt_ids": prompt_ids,
            "bandwidth": bandwidth,
            "rows": report,
            "busy_before": busy_before,
            "busy_after": busy_after,
            "results": {f"{s} {f}": r for (s, f), r in results.items()},
            "discarded_contended_runs": discarded,
        }
        if complete:
            _common.write_json(args.json, doc)
        else:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")

    for size, f in rows:
        print(f"\n{size} {f}:", flush=True)
        engines: list[tuple[str, list[str], dict[str, Any]]] = []
        if not imports[size, f].get("error"):
            cfg = {**base, "model_dir": imports[size, f]["model_dir"]}
            engines.append(("llmos", [py, str(BENCH_DIR / "engine.py"), "--child-llmos"], cfg))
        else:
            print(f"  llmos: not measured, the import failed ({imports[size, f]['error'][:120]})")
        engines.append(
            (
                "llama.cpp",
                [py, str(BENCH_DIR / "_peer_llamacpp.py")],
                {**base, "gguf": built[size, f]["gguf"]},
            )
        )
        got: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in engines}
        for rnd in range(args.rounds):
            order = engines[rnd % len(engines) :] + engines[: rnd % len(engines)]
            for name, cmd, cfg in order:
                try:
                    res = engine.measured_child(
                        f"round {rnd + 1} {name:<9}", name, cmd, cfg, args, discarded, rnd + 1
                    )
                except SystemExit as e:  # a crashed child: say so, keep going with the other rows
                    print(f"  round {rnd + 1} {name:<9} FAILED: {e}", flush=True)
                    continue
                got[name].append(res)
        results[size, f] = got
        save(summarize_rows(list(results), built, imports, results), [], complete=False)
    bandwidth.append(quiet_child("membw", membw_cmd, membw_cfg, args))
    print_bandwidth(bandwidth[-1], args.threads)
    busy_after = engine.busy_processes()

    report = summarize_rows(rows, built, imports, results)
    print_report(report, bandwidth, args)
    for b in busy_after:
        print(f"  busy after: {b}")

    save(report, busy_after, complete=True)
    return 0


def summarize_rows(
    rows: list[tuple[str, str]],
    built: dict[tuple[str, str], dict[str, Any]],
    imports: dict[tuple[str, str], dict[str, Any]],
    results: dict[tuple[str, str], dict[str, list[dict[str, Any]]]],
) -> list[dict[str, Any]]:
    out = []
    for size, f in rows:
        imp, got, b = imports[size, f], results[size, f], built[size, f]
        row: dict[str, Any] = {
            "row": f"{size} {f}",
            "gguf": b["gguf"],
            "gguf_bytes": b["bytes"],
            "gguf_types": b["types"],
            "import": imp,
            "engines": {},
            "decode_bytes": {"llama.cpp": b["gguf_decode"], "llmos": imp.get("llmos_decode")},
            "kv_bytes_per_token": b["kv_bytes_per_token"],
        }
        per_token = {
            "llama.cpp": b["gguf_decode"]["bytes"],
            "llmos": imp["llmos_decode"]["bytes"] if not imp.get("error") else None,
        }
        for name, rs in got.items():
            if not rs:
                continue
            s = engine.summarize(rs)
            growth = [
                r["after_load"]["vmrss_mb"] - r["before_load"]["vmrss_mb"] for r in rs if "before_load" in r
            ]
            s["load_rss_growth_mb"] = statistics.median(growth) if growth else None
            s["bytes_per_token"] = per_token[name]
            s["effective_gb_s"] = per_token[name] * s["decode_tok_s"] / 1e9 if per_token[name] else None
            s["same_ids_as_first_round"] = all(r["run"]["ids"] == rs[0]["run"]["ids"] for r in rs)
            row["engines"][name] = s
        lm, lc = row["engines"].get("llmos"), row["engines"].get("llama.cpp")
        if lm and lc:
            row["checks"] = engine.ratio_checks(lm, lc, TARGETS)
            a, b = got["llmos"][0]["run"]["ids"], got["llama.cpp"][0]["run"]["ids"]
            row["same_greedy_ids"] = engine.agreement(a, b)
        if not imp.get("error"):
            # a reused import was not run: its child's peak says nothing about importing
            row["import_rss_ratio"] = None if imp["reused"] else imp["vmhwm_mb"] * 1e6 / row["gguf_bytes"]
            row["exact_weights"] = imp["exact_weights"]
        out.append(row)
    return out


def print_report(
    report: list[dict[str, Any]], bandwidth: list[dict[str, Any]], args: argparse.Namespace
) -> None:
    ok_bw = [b for b in bandwidth if not b.get("error")]
    best_read = max((b["read_gb_s"] for b in ok_bw), default=float("nan"))
    header = (
        f"{'row':<12}{'engine':<11}{'prefill tok/s':>14}{'TTFT ms':>9}{'decode tok/s':>13}{'peak RSS MB':>12}"
        f"{'disk MB':>9}{'MB/token':>10}{'GB/s':>7}{'load RSS +MB':>13}"
    )
    print(f"\nmedians over {args.rounds} round(s)\n{header}\n{'-' * len(header)}")
    for row in report:
        for name in ("llmos", "llama.cpp"):
            s = row["engines"].get(name)
            if s is None:
                why = (
                    row["import"].get("error", "no successful run")
                    if name == "llmos"
                    else "no successful run"
                )
                print(f"{row['row']:<12}{name:<11}  not measured: {why[:90]}")
                continue
            gbs = s["effective_gb_s"]
            growth = s["load_rss_growth_mb"]
            print(
                f"{row['row']:<12}{name:<11}{s['prefill_tok_s']:>14.1f}{s['ttft_ms']:>9.0f}"
                f"{s['decode_tok_s']:>13.1f}{s['vmhwm_mb']:>12.0f}{s['model_mb']:>9.0f}"
                f"{mb(s['bytes_per_token']):>10.0f}{gbs if gbs else float('nan'):>7.1f}"
                f"{growth if growth is not None else float('nan'):>13.0f}"
                + (f"  ({s['contended']} of {s['n']} runs contended)" if s["contended"] else "")
            )
    each = ", ".join(f"{b['read_gb_s']:.1f}" for b in ok_bw)
    each_1t = ", ".join(f"{b['read_1t_gb_s']:.1f}" for b in ok_bw)
    print(
        f"this machine's memory read bandwidth ({args.threads} threads, bench/membw.py): "
        f"best {best_read:.1f} GB/s "
        f"(runs before/after: {each}; 1 thread: {each_1t})"
    )

    labels = [*TARGETS, "import RSS"]
    print("\nllmos / llama.cpp per row (targets: " + ", ".join(_target(k) for k in labels) + ")")
    print(f"{'row':<12}" + "".join(f"{k:>11}" for k in labels) + f"{'import s':>10}{'exact':>7}")
    for row in report:
        checks = {c["metric"]: c for c in row.get("checks", [])}
        cells = []
        for k in TARGETS:
            c = checks.get(k)
            cells.append(
                f"{fmt_ratio(c['ratio'] if c else None)}{'' if not c else (' ' if c['pass'] else '!')}"
            )
        r = row.get("import_rss_ratio")
        cells.append(f"{fmt_ratio(r)}{'' if r is None else (' ' if r <= IMPORT_RSS_TARGET else '!')}")
        imp = row["import"]
        took = imp.get("import_s")
        line = f"{row['row']:<12}" + "".join(f"{c:>11}" for c in cells)
        line += f"{took:>10.1f}" if took else f"{'-':>10}"
        line += f"{row.get('exact_weights', '-')!s:>7}"
        if imp.get("error"):
            line += f"   import failed: {imp['error'][:80]}"
        print(line)
    print("  (! = target missed; ratios need both engines measured)")
    for row in report:
        kv = row["kv_bytes_per_token"]
        parts = row["decode_bytes"]["llmos"]["parts"] if row["decode_bytes"]["llmos"] else {}
        lc = row["decode_bytes"]["llama.cpp"]["by_type"]
        imp = row["import"]
        ops = f" [{ops_used(imp)}]" if not imp.get("error") else ""
        print(
            f"  {row['row']}{ops}: bytes/token llmos "
            + (", ".join(f"{k} {mb(v):.1f}" for k, v in parts.items()) or "-")
            + "; llama.cpp "
            + ", ".join(f"{k} {mb(v):.1f}" for k, v in lc.items())
            + f" (MB). KV read at position {kv['position']} (not in MB/token): "
            f"llmos {mb(kv['llmos']):.1f} MB, llama.cpp {mb(kv['llama.cpp']):.1f} MB"
        )


def _target(label: str) -> str:
    if label == "import RSS":
        return f"import RSS <= {IMPORT_RSS_TARGET}x GGUF"
    _, op, bound = TARGETS[label]
    return f"{label} {op} {bound}x"


if __name__ == "__main__":
    sys.exit(main())
