"""Speculative decoding and jump-forward: llmos against llama.cpp, with and without its prompt lookup.

Four workloads on the default model (bench/_spec_workloads.py), greedy, each ending at end-of-sequence
or its token limit: free text (bench/engine.py's 256-token prompt), a grounded extraction from a
public-domain passage, three agent tool steps (JSON, constrained by a JSON Schema in both engines:
llguidance in llmos, a GBNF grammar from the same schema in llama.cpp), and a code edit that returns
most of its input. (llama.cpp's tool steps run unconstrained unless --peer-grammar: llama-cpp-python's
grammar sampler takes about a second a token on this model's 49k vocabulary here, which would make
that column about the sampler, not decoding.) Engines, each in its own fresh child, one child at a
time, alternating for `--rounds` rounds (bench/engine.py's machinery: wait for a quiet machine,
measure how busy the others were, repeat a contended child):

* llmos: `LLMEngine.stream()` (speculation and jump-forward on, the default), and once more with
  `speculative=False` (every token one graph run: the baseline speculation must beat);
* llama.cpp: `Llama.generate()` with defaults, and with `draft_model=LlamaPromptLookupDecoding(
  num_pred_tokens=10)` (llama-cpp-python's own prompt lookup).

Per workload: decode tok/s = (tokens - 1) / (wall time after the first token), the wall time of the
whole answer, and for llmos the share of draft tokens accepted. Every child warms up on one untimed
generation first. Results and method: docs/performance.md.

    .venv/bin/python bench/speculative.py --rounds 3 [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _common
import _spec_workloads as wl
import engine as eb  # bench/engine.py: prompt, quiet-machine and child machinery

ENGINES = ("llmos", "llmos no-spec", "llama.cpp", "llama.cpp lookup")
TARGETS = {  # workload: (engine it is compared with, ratio of decode tok/s must be >=)
    "free text": [("llama.cpp", 1.0)],
    "grounded": [("llama.cpp", 1.8), ("llama.cpp lookup", 1.3)],
    "code edit": [("llama.cpp", 1.8), ("llama.cpp lookup", 1.3)],
}


# -- the children -------------------------------------------------------------------------------------------
def prep_child() -> None:
    """Import the graph if needed; encode every workload's prompt with the model's own template."""
    cfg = _common.read_config()
    from llmos.default_model import DEFAULT_MODEL_NAME, default_gguf_path
    from llmos.engine.llm_engine import encode_prompt
    from llmos.manifest import ModelManifest
    from llmos.model_store import ModelStore
    from llmos.tokenizer import Tokenizer

    store = ModelStore(cfg["store"])
    gguf = default_gguf_path(lambda msg: print(msg, file=sys.stderr))
    model_dir = store.import_gguf(
        gguf, precision="int4", name=DEFAULT_MODEL_NAME, make_default=store.default_dir() is None
    )
    from llmos.chat_template import ChatTemplate

    m, tok = ModelManifest.read(model_dir), Tokenizer.load(model_dir)
    bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else ""
    template = ChatTemplate(m.chat_template, bos, tok.id_to_token(tok.eos_id))

    def enc(msgs: list[dict[str, str]]) -> list[int]:
        return encode_prompt(tok, template, msgs)

    workloads = {
        "free text": {"prompts": [eb.build_prompt_ids(model_dir)], "max_tokens": 128},
        "grounded": {"prompts": [enc(wl.GROUNDED)], "max_tokens": 160},
        "tool steps": {
            "prompts": [enc(wl.tool_messages(s)) for s in wl.TOOL_STEPS],
            "max_tokens": 96,
            "json_schema": json.dumps(wl.TOOL_SCHEMA),
        },
        "code edit": {"prompts": [enc(wl.CODE_EDIT)], "max_tokens": 256},
    }
    _common.emit(
        {
            "model_dir": str(model_dir),
            "gguf": str(gguf),
            "eos_ids": m.eos_token_ids,
            "workloads": workloads,
            "llmos_source": eb.source_state(),
        }
    )


def _timed(gen: Any, eos: set[int], limit: int) -> dict[str, Any]:
    """Drain a token iterator: ids, time to the first token, total wall time."""
    ids: list[int] = []
    t0 = time.perf_counter()
    first = 0.0
    for tok in gen:
        if not ids:
            first = time.perf_counter() - t0
        ids.append(int(tok))
        if int(tok) in eos or len(ids) >= limit:
            break
    return {"ids": ids, "ttft_s": first, "wall_s": time.perf_counter() - t0}


def llmos_child() -> None:
    cfg = _common.read_config()
    # bench/agents.py (the agent benchmark) would shadow the agents package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.modules.pop("agents", None)
    from agents.structured_output import StructuredOutput
    from llmos.engine.llm_engine import LLMEngine
    from llmos.engine.sampling import SamplingParams

    engine = LLMEngine(cfg["model_dir"], threads=int(cfg["threads"]), max_context=2048)
    so = StructuredOutput(engine.tokenizer)
    eos = set(cfg["eos_ids"])

    def run(prompt: list[int], w: dict[str, Any]) -> dict[str, Any]:
        constraint = so.constraint(w["json_schema"]) if w.get("json_schema") else None
        params = SamplingParams(max_tokens=w["max_tokens"], speculative=bool(cfg["speculative"]))
        usage: list[Any] = []

        def tokens() -> Any:
            for chunk in engine.stream(prompt, params, constraint=constraint):
                usage[:] = [chunk.usage] if chunk.usage else usage
                yield from chunk.token_ids

        out = _timed(tokens(), set(), 10**9)  # the engine stops itself at EOS and max_tokens
        u = usage[0]
        out.update(draft=u.draft_tokens, accepted=u.accepted_tokens, forced=u.forced_tokens)
        return out

    _measure(cfg, run, eos)


def llamacpp_child() -> None:
    cfg = _common.read_config()
    import _llamacpp_amx
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    bufts = _llamacpp_amx.drop_amx() if not cfg.get("amx") else None
    llm = llama_cpp.Llama(
        model_path=cfg["gguf"],
        n_threads=int(cfg["threads"]),
        n_threads_batch=int(cfg["threads"]),
        n_ctx=2048,
        n_batch=512,
        draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10) if cfg["lookup"] else None,
        verbose=False,
    )
    eos = set(cfg["eos_ids"])
    grammars: dict[str, Any] = {}

    def run(prompt: list[int], w: dict[str, Any]) -> dict[str, Any]:
        grammar = None
        if w.get("json_schema") and cfg.get("grammar"):
            if w["json_schema"] not in grammars:
                grammars[w["json_schema"]] = LlamaGrammar.from_json_schema(w["json_schema"], verbose=False)
            grammar = grammars[w["json_schema"]]
        llm.reset()
        gen = llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True, grammar=grammar)
        try:
            return _timed(gen, eos, w["max_tokens"])
        except ValueError as e:  # llama-cpp-python 0.3.36's draft path can run its logits table over
            print(f"llama.cpp failed: {e}", file=sys.stderr)
            return {"ids": [], "ttft_s": 0.0, "wall_s": 0.0, "error": str(e)}

    _measure(cfg, run, eos, extra={"extra_buffer_types": bufts})


def _measure(cfg: dict[str, Any], run: Any, eos: set[int], extra: dict[str, Any] | None = None) -> None:
    workloads = cfg["workloads"]
    warm = next(iter(workloads.values()))
    run(warm["prompts"][0], warm)  # the first generation after load is 2-3x slower
    results = {}
    for name, w in workloads.items():
        steps = [run(p, w) for p in w["prompts"]]
        n = sum(len(s["ids"]) for s in steps)
        wall = sum(s["wall_s"] for s in steps)
        after_first = sum(s["wall_s"] - s["ttft_s"] for s in steps)
        results[name] = {
            "errors": [st["error"] for st in steps if "error" in st],
            "tokens": n,
            "wall_s": wall,
            "step_wall_s": wall / len(steps),
            "decode_tok_s": (n - len(steps)) / after_first if after_first > 0 else 0.0,
            "ids": [s["ids"] for s in steps],
            **{k: sum(s.get(k, 0) for s in steps) for k in ("draft", "accepted", "forced")},
        }
    _common.emit({"workloads": results, "loadavg": os.getloadavg()[0], **(extra or {})})


# -- the parent ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-dir", type=Path, default=None, help="model store root (default: the user's)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES)
    )
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="wait up to this long for a quiet machine")
    ap.add_argument("--quiet-below", type=float, default=0.15)
    ap.add_argument("--retries", type=int, default=0, help="run a contended child again (default 0)")
    ap.add_argument(
        "--peer-grammar",
        action="store_true",
        help="constrain llama.cpp's tool steps too (its GBNF sampler takes ~1 s a token here: slow)",
    )
    for c in ("prep", "llmos", "llamacpp"):
        ap.add_argument(f"--child-{c}", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_prep:
        prep_child()
        return 0
    if args.child_llmos:
        llmos_child()
        return 0
    if args.child_llamacpp:
        llamacpp_child()
        return 0
    if importlib.util.find_spec("llama_cpp") is None:
        print(eb.NO_PEER, file=sys.stderr)
        return 2
    py, me = sys.executable, str(Path(__file__).resolve())
    info = eb.run_child("prep", [py, me, "--child-prep"], {"store": str(args.model_dir or "") or None}, 1800)
    base = {
        "threads": args.threads,
        "workloads": info["workloads"],
        "eos_ids": info["eos_ids"],
        "grammar": args.peer_grammar,
    }
    children = {
        "llmos": ([py, me, "--child-llmos"], {**base, "model_dir": info["model_dir"], "speculative": True}),
        "llmos no-spec": (
            [py, me, "--child-llmos"],
            {**base, "model_dir": info["model_dir"], "speculative": False},
        ),
        "llama.cpp": ([py, me, "--child-llamacpp"], {**base, "gguf": info["gguf"], "lookup": False}),
        "llama.cpp lookup": ([py, me, "--child-llamacpp"], {**base, "gguf": info["gguf"], "lookup": True}),
    }
    started = dt.datetime.now().astimezone()
    print(f"{started:%Y-%m-%d %H:%M %Z} | {eb.machine()} | load avg {os.getloadavg()[0]:.2f}")
    print(f"llmos code: {info['llmos_source']}; {args.threads} threads, {args.rounds} rounds, greedy")
    for b in eb.busy_processes():
        print(f"  busy before: {b}")
    engines = tuple(e for e in ENGINES if e in args.engines.split(","))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    for rnd in range(args.rounds):
        order = engines[rnd % len(engines) :] + engines[: rnd % len(engines)]
        for name in order:
            cmd, cfg = children[name]
            for attempt in range(args.retries + 1):
                _waited, _ = (
                    eb.wait_for_quiet(args.quiet_wait, args.quiet_below) if args.quiet_wait else (0, 0)
                )
                res = eb.run_child(name, cmd, cfg, timeout=3600)
                if res["other_cpu_frac"] < args.quiet_below or attempt == args.retries:
                    break
            results[name].append(res)
            figures = "  ".join(f"{w} {r['decode_tok_s']:5.1f}" for w, r in res["workloads"].items())
            print(
                f"  round {rnd + 1} {name:<17} decode tok/s: {figures}  "
                f"(others {res['other_cpu_frac'] * 100:.0f}% CPU, load {res['loadavg']:.1f})",
                flush=True,
            )
    report = summarize(results)
    print_report(report)
    if args.json:
        _common.write_json(
            args.json,
            {
                "bench": "speculative",
                "date": started.isoformat(timespec="seconds"),
                "machine": eb.machine(),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "llmos_source": info["llmos_source"],
                "summary": report,
                "results": results,
            },
        )
    return 0


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, runs in results.items():
        out[name] = {}
        for w in runs[0]["workloads"]:
            rs = [r["workloads"][w] for r in runs]
            out[name][w] = {
                "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs),
                "step_wall_s": statistics.median(r["step_wall_s"] for r in rs),
                "tokens": statistics.median(r["tokens"] for r in rs),
                "acceptance": sum(r["accepted"] for r in rs) / max(1, sum(r["draft"] for r in rs)),
                "forced": statistics.median(r["forced"] for r in rs),
                "other_cpu_frac": statistics.median(r["other_cpu_frac"] for r in runs),
            }
    return out


def print_report(s: dict[str, Any]) -> None:
    names = list(next(iter(s.values())))
    print("\nmedians: decode tok/s (tokens; wall s per answer)")
    print(f"{'engine':<18}" + "".join(f"{w:>24}" for w in names))
    for eng, rows in s.items():
        cells = "".join(
            f"{rows[w]['decode_tok_s']:>9.1f} ({rows[w]['tokens']:>3.0f}; {rows[w]['step_wall_s']:5.2f} s)"
            for w in names
        )
        print(f"{eng:<18}{cells}")
    if "llmos" not in s:
        return
    ll = s["llmos"]
    print(
        "llmos acceptance (accepted / drafted): "
        + ", ".join(f"{w} {ll[w]['acceptance'] * 100:.0f}%" for w in names)
        + "; grammar-forced tokens per run: "
        + ", ".join(f"{w} {ll[w]['forced']:.0f}" for w in names if ll[w]["forced"])
    )
    print("\nratios of decode tok/s (llmos / other):")
    for w in names:
        parts = []
        for other in (o for o in ("llmos no-spec", "llama.cpp", "llama.cpp lookup") if o in s):
            r = ll[w]["decode_tok_s"] / max(s[other][w]["decode_tok_s"], 1e-9)
            target = dict(TARGETS.get(w, [])).get(other)
            verdict = "" if target is None else (" PASS" if r >= target else f" MISS (target {target}x)")
            parts.append(f"{other} {r:.2f}x{verdict}")
        if "llmos no-spec" in s:
            step = ll[w]["step_wall_s"] / max(s["llmos no-spec"][w]["step_wall_s"], 1e-9)
            parts.append(f"wall per answer vs no-spec {step:.2f}x")
        print(f"  {w:<11} " + "; ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
