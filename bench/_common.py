"""Helpers shared by the bench scripts and their child processes.

Kept free of llmos and llama_cpp imports: a peer child imports this, and anything imported here counts
toward that child's peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

RESULT_MARKER = "BENCH_RESULT "  # a child's last stdout line: this marker, then one JSON object


def memory_mb() -> dict[str, float]:
    """This process's peak RSS two ways (getrusage ru_maxrss and /proc VmHWM), plus its current RSS, in MB."""
    out = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key.lower() + "_mb"] = int(rest.split()[0]) / 1024  # "<n> kB"
    except OSError:
        pass
    return out


def cpu_s() -> float:
    """User + system CPU seconds this process has used so far."""
    t = os.times()
    return t.user + t.system


def argmax(row: Any) -> int:
    import numpy as np

    return int(np.argmax(row))


def timed_greedy(
    prefill: Callable[[list[int]], Any], decode: Callable[[int], Any], prompt_ids: list[int], new_tokens: int
) -> dict[str, Any]:
    """Prefill `prompt_ids`, then greedily decode until `new_tokens` tokens exist, timing both phases.

    `prefill(ids)` and `decode(token)` each return the logits row of the last position. TTFT runs from
    just before the prompt is submitted to the first token picked (argmax of the prefill logits); the
    prefill time is the prompt evaluation alone; decode time covers the remaining `new_tokens - 1` tokens,
    each one evaluation plus its argmax.
    """
    c0 = cpu_s()
    t0 = time.perf_counter()
    logits = prefill(prompt_ids)
    t1 = time.perf_counter()
    out = [argmax(logits)]
    t2 = time.perf_counter()
    for _ in range(new_tokens - 1):
        out.append(argmax(decode(out[-1])))
    t3 = time.perf_counter()
    return {
        "prefill_s": t1 - t0,
        "ttft_s": t2 - t0,
        "decode_s": t3 - t2,
        "total_s": t3 - t0,
        "cpu_s": cpu_s() - c0,
        "ids": out,
    }


def rates(run: dict[str, Any], n_prompt: int) -> dict[str, Any]:
    """Add tok/s figures to a timed run (the first new token comes from prefill, the rest from decode)."""
    n_dec = len(run["ids"]) - 1
    return {
        **run,
        "prefill_tok_s": n_prompt / run["prefill_s"],
        "decode_tok_s": n_dec / run["decode_s"] if run["decode_s"] else 0.0,
    }


def read_config() -> dict[str, Any]:
    return json.loads(sys.stdin.read())


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write("\n" + RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def parse_result(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    return None


def write_json(path: Any, doc: dict[str, Any]) -> None:
    """Save a benchmark's full results (figures, checks, discarded runs) for later comparison."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")
