"""Does swapping a session's KV to disk as int8 change its next greedy tokens? Measured on the default model.

For each conversation (system prompt + a long first user turn, rendered by the chat template to ~470
tokens; the first answer greedy, up to 64 tokens, so ~512 tokens sit in the KV after turn one), the
second user turn is generated greedily (64 tokens, EOS ignored) several ways, all on one engine:

  (a) memory  - an Arbiter with the default budget: the session's KV stays parked in memory, exact fp32;
  (b) disk    - an Arbiter with `kv.budget_bytes = 1`: the parked KV is compressed to int8 (16-token
                chunks), written to a swap file, read back and decompressed for turn two (the arbiter's
                `swap_restores` is checked to grow);
  (c) scratch - no session key: turn two's whole prompt is prefilled from its text;
  (d) batched - (a)'s KV parked again in memory, turn two decoded in one batch with another app's request;
  f16, ulp    - (a)'s KV rounded to fp16 and back, or every value moved one float32 ulp up, loaded into a
                slot by hand and run greedily (the same runner calls the arbiter makes).

(a) vs (c) is the natural baseline: KV written token by token during decode and KV written by a batched
prefill are numerically different paths even without quantisation. The shared-prefix cache is off, so
only the session KV differs. Columns: KV tokens after turn one; tokens reused in turn two; identical
leading greedy tokens vs (a), out of 64; then, teacher-forced along (a)'s tokens: how many of the 64
steps pick another top token than (a), the largest move of the gap between (a)'s top-1 and its next four
candidates (a flip needs a top-2 margin below it), the lowest logit cosine; last, (a)'s largest top-2
margin at a step where (b) resp. (c) picked another token.

    .venv/bin/python bench/swap_fidelity.py [--precision int4|int8|fp32] [--tokens 64] [--threads 2]

Conversations: the three of tests/test_arbiter_real_model.py (written for it) plus excerpts of texts
every machine here has (licences, Python's standard library source and its essays, this repo's docs).
Takes about 2.5 minutes on 2 cores for int4 (more when the machine is busy), about twice that for fp32.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from test_arbiter_real_model import CONVERSATIONS, Conversation, first_turn  # noqa: E402

from llmos.arbiter.arbiter import Arbiter  # noqa: E402
from llmos.arbiter.kv_codec import compress, decompress  # noqa: E402
from llmos.arbiter.policy import ArbiterConfig  # noqa: E402
from llmos.arbiter.request import Request  # noqa: E402
from llmos.arbiter.swap_store import SwapStore  # noqa: E402
from llmos.default_model import DEFAULT_MODEL_NAME, default_gguf_path  # noqa: E402
from llmos.engine.llm_engine import LLMEngine  # noqa: E402
from llmos.engine.sampling import SamplingParams  # noqa: E402
from llmos.model_store import ModelStore  # noqa: E402

STDLIB = Path(argparse.__file__).parent
LICENSES = Path("/usr/share/common-licenses")


def excerpt(path: Path, marker: str, chars: int = 5000) -> str:
    text = path.read_text(encoding="utf-8")
    start = text.index(marker)
    return text[start : start + chars]


def file_conversations() -> list[Conversation]:
    """(source file, marker where the excerpt starts, system prompt, intro, outro, follow-up)."""
    specs = [
        (
            LICENSES / "GPL-3",
            "Preamble",
            "You explain legal documents to people who are not lawyers.",
            "My company wants to use a library under this licence. This is the start of it:\n\n",
            "\n\nWhat does this mean for a company that ships software?",
            "Can we keep our own code closed if we only link to the library?",
        ),
        (
            LICENSES / "Apache-2.0",
            "1. Definitions.",
            "You are a careful open source compliance adviser.",
            "Part of the Apache licence:\n\n",
            "\n\nWhat is a Contribution here, and who owns it?",
            "What do I have to include when I redistribute the software?",
        ),
        (
            LICENSES / "MPL-2.0",
            "1. Definitions",
            "You answer questions about software licences concisely.",
            "Here are the definitions from the Mozilla Public License:\n\n",
            "\n\nExplain 'Larger Work' and 'Modifications' with an example.",
            "How is this different from the GPL?",
        ),
        (
            STDLIB / "heapq.py",
            '__about__ = """',
            "You are a computer science teacher.",
            "I found this essay in Python's heapq module:\n\n",
            "\n\nWhy does the author talk about tournaments?",
            "Give me a tiny Python example that uses heapq for a priority queue.",
        ),
        (
            STDLIB / "textwrap.py",
            "    def _wrap_chunks(self, chunks):",
            "You are an expert Python programmer who explains code line by line.",
            "What does this method do?\n\n```python\n",
            "```",
            "How would you test it? Write one pytest test.",
        ),
        (
            STDLIB / "functools.py",
            "def _lru_cache_wrapper(user_function, maxsize, typed, _CacheInfo):",
            "You review Python code for performance.",
            "This is CPython's pure Python lru_cache:\n\n```python\n",
            "```\n\nWhy is the linked list circular and why the lock?",
            "Could a plain OrderedDict replace the linked list? What would change?",
        ),
        (
            STDLIB / "json" / "decoder.py",
            "def py_scanstring(s, end, strict=True,",
            "You are a helpful assistant for programmers.",
            "Explain this JSON string scanner:\n\n```python\n",
            "```",
            "What happens with a lone surrogate like \\ud800 in the input?",
        ),
        (
            STDLIB / "argparse.py",
            "class HelpFormatter(object):",
            "You are a Python mentor.",
            "I am reading argparse's source:\n\n```python\n",
            "```\n\nWhat is the job of this class?",
            "How do I make my own formatter that shows default values?",
        ),
        (
            REPO / "docs" / "architecture.md",
            "## From a GGUF file to a model directory",
            "You are a technical writer who summarises design documents.",
            "From our architecture notes:\n\n",
            "\n\nSummarise the import pipeline for a new team member.",
            "Which step is most likely to fail on a user's machine, and why?",
        ),
        (
            REPO / "README.md",
            "",
            "You answer questions about software projects from their README.",
            "Here is a project's README:\n\n",
            "\n\nWhat does this project do and who is it for?",
            "List three questions a new user would ask after reading it.",
        ),
    ]
    out = []
    for path, marker, system, intro, outro, followup in specs:
        if path.is_file():
            body = excerpt(path, marker)
            out.append(Conversation(path.name, system, intro, body, outro, followup))
        else:
            print(f"(skipping {path}: not on this machine)", file=sys.stderr)
    return out


def common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def run(arb: Arbiter, *reqs: Request) -> list[Request]:
    for r in reqs:
        arb.submit(r)
    while arb.step():
        pass
    for r in reqs:
        assert r.done and r.error is None, r.error
    return list(reqs)


def tokens(req: Request) -> list[int]:
    assert req.seq is not None
    return list(req.seq.output_ids)


def forced(
    engine: LLMEngine, kv: np.ndarray | None, n: int, prompt: list[int], path: list[int]
) -> np.ndarray:
    """Logits [len(path), vocab] for each next token of `prompt` + `path`, teacher-forced along `path`,
    from a cache holding `kv`'s first n positions (or nothing: prefill it all in the engine's chunks)."""
    cache = engine.pool.allocate()
    try:
        if kv is not None:
            cache.load(kv[:, :, :, :n])
        else:
            n = 0
        rest, size = prompt[n:], engine._chunk_size()
        for i in range(0, len(rest), size):
            last = engine.runner.prefill(cache, rest[i : i + size])[-1]
        rows = [last]
        for tok in path[:-1]:
            rows.append(engine.runner.decode([cache], [tok])[0])
        return np.stack(rows)
    finally:
        cache.free()


def margins(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def gap_noise(ref: np.ndarray, other: np.ndarray, k: int = 5) -> np.ndarray:
    """Per step, how much the gap between `ref`'s top-1 and each of its next k-1 candidates moved: a flip
    can only happen where `ref`'s top-2 margin is below this."""
    top = np.argsort(ref, axis=-1)[:, -k:]
    best, rest = top[:, -1:], top[:, :-1]
    gap_ref = np.take_along_axis(ref, best, -1) - np.take_along_axis(ref, rest, -1)
    gap_other = np.take_along_axis(other, best, -1) - np.take_along_axis(other, rest, -1)
    return np.abs(gap_ref - gap_other).max(-1)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="second-turn tokens compared")
    ap.add_argument("--prompt-tokens", type=int, default=470, help="first-turn prompt length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="int4", help="int4 (the default import), int8 or fp32")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="swap-fidelity-") as tmp:
        measure(args, Path(tmp))


def measure(args: argparse.Namespace, tmp: Path) -> None:
    model_dir = ModelStore(tmp / "store").import_gguf(
        default_gguf_path(lambda m: print(m, file=sys.stderr)),
        precision=args.precision,
        name=DEFAULT_MODEL_NAME,
    )
    engine = LLMEngine(model_dir, threads=args.threads)
    first = SamplingParams(max_tokens=64)
    second = SamplingParams(max_tokens=args.tokens, ignore_eos=True)

    def arbiter(name: str) -> Arbiter:
        swap = SwapStore(tmp / f"swap-{name}", model_key="bench")
        return Arbiter(lambda: engine, ArbiterConfig(prefix_cache_entries=0), swap)

    memory, disk, scratch = arbiter("a"), arbiter("b"), arbiter("c")
    disk.kv.budget_bytes = 1  # every parked session goes to disk as int8

    convs = [*CONVERSATIONS, *file_conversations()]
    rows = []
    t0 = time.perf_counter()
    cols = [("conversation", 15), ("kv", 4), ("reused", 6), ("|", 1), ("b=a", 3), ("c=a", 3), ("d=a", 3)]
    cols += [("f16", 3), ("ulp", 3), ("|", 1), ("int8 flips", 10), ("gap", 5), ("cos", 6), ("|", 1)]
    cols += [("scratch flips", 13), ("gap", 5), ("cos", 6), ("|", 1), ("mrg b", 5), ("mrg c", 5)]
    head = " ".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, (name, w) in enumerate(cols))
    print(f"{args.precision} graph")
    print(head + "\n" + "-" * len(head))
    for i, conv in enumerate(convs):
        key = f"s{i}"
        msgs = first_turn(engine, conv, args.prompt_tokens)
        (a1,) = run(memory, Request(msgs, first, app_id="a", session_key=key))
        (b1,) = run(disk, Request(msgs, first, app_id="b", session_key=key))
        assert tokens(a1) == tokens(b1), "turn one differs between two arbiters"
        parked = memory.kv.parked[key]
        assert parked.kv is not None
        exact, kv_ids = parked.kv.copy(), list(parked.ids)
        int8 = decompress(compress(exact))
        fp16 = exact.astype(np.float16).astype(np.float32)
        ulp = np.nextafter(exact, np.float32(np.inf))  # every value one step up
        rel = float(np.linalg.norm(int8 - exact) / np.linalg.norm(exact))
        assert a1.seq is not None
        turn2 = [
            *msgs,
            {"role": "assistant", "content": a1.seq.detok.text},
            {"role": "user", "content": conv.followup},
        ]
        restores = disk.snapshot()["swap_restores"]
        (a2,) = run(memory, Request(turn2, second, app_id="a", session_key=key))
        (b2,) = run(disk, Request(turn2, second, app_id="b", session_key=key))
        (c2,) = run(scratch, Request(turn2, second, app_id="c"))
        # (d): the same in-memory session, its decode batched with another app's request.
        memory.kv.park(key + "d", ("a", None), kv_ids, exact.copy())
        companion = Request("Tell me a long story about a lighthouse keeper.", second, app_id="z")
        d2, _ = run(memory, Request(turn2, second, app_id="a", session_key=key + "d"), companion)
        assert a2.restored_from == "memory" and b2.restored_from == "disk" and c2.reused_tokens == 0
        assert d2.restored_from == "memory"
        assert disk.snapshot()["swap_restores"] == restores + 1
        ta, tb, tc, td = (tokens(r) for r in (a2, b2, c2, d2))
        for arb, k in ((memory, key), (memory, key + "d"), (disk, key)):
            arb.drop_session(k)  # free it: 13 parked sessions would hold ~0.6 GB

        assert a2.seq is not None
        prompt, n = list(a2.seq.prompt_ids), a2.reused_tokens
        la = forced(engine, exact, n, prompt, ta)
        assert [int(x) for x in la.argmax(-1)] == ta, "teacher-forced run does not reproduce (a)"
        lb = forced(engine, int8, n, prompt, ta)
        lc = forced(engine, None, n, prompt, ta)
        lf = forced(engine, fp16, n, prompt, ta)
        lu = forced(engine, ulp, n, prompt, ta)
        ma = margins(la)
        flips_b = lb.argmax(-1) != la.argmax(-1)
        flips_c = lc.argmax(-1) != la.argmax(-1)
        flips_f = lf.argmax(-1) != la.argmax(-1)
        flips_u = lu.argmax(-1) != la.argmax(-1)
        r = {
            "name": conv.name,
            "kv": len(kv_ids),
            "reused": b2.reused_tokens,
            "rel": rel,
            "ba": common(tb, ta),
            "ca": common(tc, ta),
            "da": common(td, ta),
            "fa": common(ta, [int(x) for x in lf.argmax(-1)]),
            "ua": common(ta, [int(x) for x in lu.argmax(-1)]),
            "flip_b": int(flips_b.sum()),
            "flip_c": int(flips_c.sum()),
            "flip_f": int(flips_f.sum()),
            "flip_u": int(flips_u.sum()),
            "gap_b": float(gap_noise(la, lb).max()),
            "gap_c": float(gap_noise(la, lc).max()),
            "gap_f": float(gap_noise(la, lf).max()),
            "gap_u": float(gap_noise(la, lu).max()),
            "cos_b": float(cosines(la, lb).min()),
            "cos_c": float(cosines(la, lc).min()),
            "mrg_b": float(ma[flips_b].max()) if flips_b.any() else 0.0,
            "mrg_c": float(ma[flips_c].max()) if flips_c.any() else 0.0,
            "margins": ma,
        }
        rows.append(r)
        cells = [r["name"], r["kv"], r["reused"], "|", r["ba"], r["ca"], r["da"], r["fa"], r["ua"], "|"]
        cells += [r["flip_b"], f"{r['gap_b']:.3f}", f"{r['cos_b']:.4f}", "|", r["flip_c"]]
        cells += [f"{r['gap_c']:.3f}", f"{r['cos_c']:.4f}", "|", f"{r['mrg_b']:.3f}", f"{r['mrg_c']:.3f}"]
        line = [
            f"{c:<{w}}" if j == 0 else f"{c!s:>{w}}"
            for j, (c, (_, w)) in enumerate(zip(cells, cols, strict=True))
        ]
        print(" ".join(line), flush=True)
    n = args.tokens
    all_margins = np.concatenate([r["margins"] for r in rows])

    def full(col: str) -> str:
        return f"all {n} in {sum(r[col] == n for r in rows)}/{len(rows)}, min {min(r[col] for r in rows)}"

    steps = len(all_margins)
    print(
        f"\n{len(rows)} conversations, {time.perf_counter() - t0:.0f} s; int8 round trip relative error "
        f"{min(r['rel'] for r in rows):.4f}-{max(r['rel'] for r in rows):.4f}.\n"
        f"Identical leading greedy tokens out of {n}, vs (a) memory:\n"
        f"  (b) disk, int8:           {full('ba')}\n"
        f"  (c) scratch prefill:      {full('ca')}\n"
        f"  (d) memory, batched:      {full('da')}\n"
        f"  fp16 round trip (runner): {full('fa')}\n"
        f"  fp32 KV one ulp up (runner): {full('ua')}\n"
        f"Teacher-forced along (a)'s tokens, {steps} steps; top-1 differs from (a) at: "
        f"{sum(r['flip_b'] for r in rows)} (int8), {sum(r['flip_c'] for r in rows)} (scratch), "
        f"{sum(r['flip_f'] for r in rows)} (fp16), {sum(r['flip_u'] for r in rows)} (one ulp) steps.\n"
        f"Largest move of a top-1/top-5 gap: {max(r['gap_b'] for r in rows):.3f} (int8), "
        f"{max(r['gap_c'] for r in rows):.3f} (scratch), {max(r['gap_f'] for r in rows):.3f} (fp16), "
        f"{max(r['gap_u'] for r in rows):.3f} (one ulp); "
        f"min logit cosine {min(r['cos_b'] for r in rows):.4f} (int8), "
        f"{min(r['cos_c'] for r in rows):.4f} (scratch).\n"
        f"(a)'s top-2 margin where a flip happened: at most {max(r['mrg_b'] for r in rows):.3f} (int8), "
        f"{max(r['mrg_c'] for r in rows):.3f} (scratch). (a)'s margins over all steps: "
        + ", ".join(f"<{t}: {np.mean(all_margins < t):.1%}" for t in (0.1, 0.25, 0.5, 1.0))
    )


if __name__ == "__main__":
    main()
