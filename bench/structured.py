"""Per-token cost of JSON Schema constrained decoding, against the same engine unconstrained.

    .venv/bin/python bench/structured.py [--rounds 5]

Both runs decode the same number of tokens from the same prompt on the default model (greedy, 2
threads), in one process, alternating. The constrained run's mask is computed by llguidance on its own
thread while onnxruntime computes the next logits (agents/structured_output.py); what is left on the
critical path is waiting for it and applying it, reported as `mask_ms_per_token`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from agents.structured_output import StructuredOutput
from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sampling import SamplingParams
from llmos.model_store import ModelStore

SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 12,
                "maxItems": 12,
                "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string", "maxLength": 30}, "count": {"type": "integer"}},
                    "required": ["name", "count"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    }
)
PROMPT = [{"role": "user", "content": "List twelve things in a kitchen with how many there are, as JSON."}]


def run(engine: LLMEngine, so: StructuredOutput | None, n: int | None) -> tuple[float, int, float]:
    """(decode tok/s, tokens, mask ms per token) of one greedy generation."""
    seq = engine.add_request(PROMPT, SamplingParams(max_tokens=n or 400, ignore_eos=n is not None))
    constraint = so.constraint(SCHEMA) if so is not None else None
    seq.constraint = constraint
    while not seq.finished:
        engine.step()
    engine.release(seq)
    mask = constraint.mask_s * 1e3 / len(seq.output_ids) if constraint else 0.0
    return seq.usage.decode_tok_s, len(seq.output_ids), mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    engine = LLMEngine(ModelStore().resolve(), threads=2)
    t0 = time.perf_counter()
    so = StructuredOutput(engine.tokenizer)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    so.compile(SCHEMA)
    compile_ms = (time.perf_counter() - t0) * 1e3
    free, constrained, masks, lengths = [], [], [], []
    for r in range(args.rounds):
        c_rate, n, mask = run(engine, so, None)  # the constrained answer sets the length
        f_rate, _, _ = run(engine, None, n)
        constrained.append(c_rate)
        free.append(f_rate)
        masks.append(mask)
        lengths.append(n)
        print(
            f"round {r + 1}: {n} tokens, constrained {c_rate:.1f} tok/s, free {f_rate:.1f} tok/s, "
            f"mask {mask:.3f} ms/token",
            flush=True,
        )
    c, f = statistics.median(constrained), statistics.median(free)
    print(
        json.dumps(
            {
                "tokens": statistics.median(lengths),
                "constrained_tok_s": c,
                "free_tok_s": f,
                "ratio": c / f,
                "overhead_ms_per_token": 1e3 / c - 1e3 / f,
                "mask_ms_per_token": statistics.median(masks),
                "llguidance_tokenizer_build_s": build_s,
                "schema_compile_ms": compile_ms,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
