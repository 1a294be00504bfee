"""The arbiter on the real default model: a session swapped to disk and restored keeps its greedy tokens.

The issue asks that a ~512-token session swapped out (int8, 16-token key chunks) and restored gives
exactly the same next greedy tokens as the same session never swapped. Measured with
bench/swap_fidelity.py (13 conversations: the three below plus licence texts, Python source and essays,
this repo's docs; ~512 tokens in the KV, then 64 greedy tokens of a second turn, EOS ignored):

- The exact fp32 graph of the default model: the int8 round trip (relative error 0.4 %) moves a top-1 vs
  top-5 logit gap by at most 0.19 (min logit cosine 0.9994) and the 64 tokens are identical in 12 of 13
  conversations; the 13th splits at token 56, where the never-swapped run's top-2 margin is 0.032
  logits. An fp16 round trip or recomputing the KV by prefill changes nothing there.
- The default int4 graph rounds activations to 8 bits per block of 32 inside every matmul (as llama.cpp's
  Q4_1 kernels do), so any change to the KV, however small, can tip a rounding and is amplified: moving
  every fp32 KV value by one ulp, an fp16 round trip, or recomputing the same tokens' KV by prefill
  instead of decode all move the logits about as much as int8 does (gaps by up to 0.7-1.3). The greedy
  tokens then split at the first near tie, whichever of these it is: all 64 identical in 1/13
  conversations for int8, 3/13 for one ulp, fp16, and recompute from scratch; each splits as early as
  token 0-2 in some conversation. Only a bit-exact KV keeps them all (a session parked in memory, even
  when decoded in one batch with another app's request: 13/13). Teacher-forced over 832 steps, the top
  token changed at 26 steps with int8 KV, 27 recomputed, 22 one ulp off; never where the never-swapped
  run's top-2 margin was above 0.272 logits (recomputed: 0.261).

So no lossy KV format can keep every greedy token on the int4 graph, and neither can the recompute
fallback. Two tests, then. On the fp32 graph, the literal requirement: all 64 tokens identical, on the
three conversations below (all 64 measured). On the default int4 graph, the tolerance we chose: the
tokens are identical up to the first step where the never-swapped run is at a near tie (top-2 margin
below TIE_MARGIN = 0.5 logits, about twice the largest margin at which any flip was measured), where the
swapped run must be at a near tie too; and until then the logits, computed from identical tokens, stay
close (cosine >= 0.98; measured minimum 0.990 for int8, 0.985 for recompute). Measured on these three
conversations with int4: identical for 13 (prose; split at a margin of 0.272), 35 (code; 0.081) and all 64
(chat) tokens.

Checked by breaking the restore on purpose: zeroing the last 16 restored positions, or giving every
position its predecessor's KV, fails 5 of the 6 cases; a 6-bit codec fails the three fp32 cases, a 4-bit
one all six. (Permuting the positions changes nothing: attention over rotated keys ignores their order.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from llmos.arbiter.arbiter import Arbiter
from llmos.arbiter.policy import ArbiterConfig
from llmos.arbiter.request import Request
from llmos.arbiter.swap_store import SwapStore
from llmos.default_model import DEFAULT_MODEL_NAME
from llmos.engine.kv_cache import KVCache
from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sampling import SamplingParams
from llmos.model_store import ModelStore

pytestmark = pytest.mark.model

PROMPT_TOKENS = 470  # the first turn's prompt; with its answer (up to 64 tokens) the KV holds ~512 tokens
FIRST = SamplingParams(max_tokens=64)
SECOND = SamplingParams(max_tokens=64, ignore_eos=True)
TIE_MARGIN = 0.5  # logits; see the module docstring
# The greedy tokens stay identical; the int4 graph's logits drift more than the exact graph's, by CPU:
# >= 0.98 on AVX2/AVX-512 machines, 0.9737 at worst on an AMX one (Sapphire Rapids), where onnxruntime's
# int8-activation MatMulNBits kernel rounds differently. Any real damage to the KV is far below this.
MIN_COSINE = 0.97


@dataclass(frozen=True)
class Conversation:
    name: str
    system: str
    intro: str  # the first user turn is intro + body (cut to fit PROMPT_TOKENS) + outro
    body: str
    outro: str
    followup: str  # the second user turn


PROSE = Conversation(
    name="prose",
    system="You are a patient tutor. Answer questions about the text the student shares, in plain words.",
    intro="I have to present this passage in class tomorrow. Here it is:\n\n",
    body="""\
The first lighthouses were not towers at all but fires lit on hilltops, tended by whoever lived nearest
the harbour and paid, when they were paid, in fish or grain. The Pharos of Alexandria changed that. Built
on a small island at the mouth of the harbour in the third century before our era, it rose more than a
hundred metres in three stages: a square base, an octagonal middle and a round top where a fire burned
through the night. Travellers wrote that its light could be seen from fifty kilometres out to sea, which
is almost certainly an exaggeration, but the tower itself was real enough to survive for over a thousand
years before earthquakes brought it down. For centuries afterwards most coasts made do with far less.
Monasteries kept lamps burning on dangerous headlands, merchants' guilds paid for beacons at river
mouths, and in many places wreckers were suspected of lighting false fires to lure ships onto the rocks.
The great change came with the industrial age. In 1822 Augustin Fresnel showed that a lens built from
concentric rings of glass prisms could gather the light of a single lamp into a beam many times brighter
than any mirror could manage, while weighing a fraction of a solid lens of the same size. Within a few
decades Fresnel lenses stood in lighthouses on every continent, graded by size into orders, the largest
taller than a man. Each light was given its own character, a pattern of flashes and darkness, so that a
navigator who counted the seconds could tell one headland from the next. Keeping the lights was hard and
lonely work. Keepers trimmed wicks, polished brass and glass, wound the clockwork that turned the lens,
and wrote the weather into a log every few hours. On rock stations far from shore, relief boats could be
delayed for weeks by storms, and families on the mainland learned to read the state of the sea in the
silence of the radio. Electricity, and then automation, ended that way of life. By the end of the
twentieth century almost every lighthouse in the world ran without a keeper, checked now and then by a
technician, and satellite navigation had made many of them more of a comfort than a necessity. Yet
ships still lose power and instruments still fail, and on a dark night a sailor who sees the familiar
flash of a known light knows exactly where he is, as sailors have for two thousand years.
""",
    outro="\n\nWhat are the main points I should explain, and in what order?",
    followup="Now give me one question the class might ask, and a short answer to it.",
)

CODE = Conversation(
    name="code",
    system="You are a senior Python developer doing a careful code review. Be specific and brief.",
    intro="Please review this module from our billing service:\n\n```python\n",
    body='''\
import time
from collections import OrderedDict


class ExpiringCache:
    """A least recently used cache whose entries also expire after a fixed time."""

    def __init__(self, capacity, ttl_seconds):
        self.capacity = capacity
        self.ttl = ttl_seconds
        self.items = OrderedDict()

    def get(self, key, default=None):
        entry = self.items.get(key)
        if entry is None:
            return default
        value, stored_at = entry
        if time.time() - stored_at > self.ttl:
            del self.items[key]
            return default
        self.items.move_to_end(key)
        return value

    def put(self, key, value):
        if key in self.items:
            self.items.move_to_end(key)
        self.items[key] = (value, time.time())
        if len(self.items) > self.capacity:
            self.items.popitem(last=True)

    def purge(self):
        now = time.time()
        for key, (value, stored_at) in self.items.items():
            if now - stored_at > self.ttl:
                del self.items[key]


def invoice_total(lines, tax_rate, discount=None):
    total = 0
    for line in lines:
        total += line["quantity"] * line["unit_price"]
    if discount:
        total = total - total * discount / 100
    total = total + total * tax_rate
    return round(total, 2)


def monthly_report(invoices, cache=ExpiringCache(100, 60)):
    report = {}
    for invoice in invoices:
        customer = invoice["customer"]
        cached = cache.get(customer)
        if cached is not None:
            report[customer] = cached
            continue
        amount = invoice_total(invoice["lines"], invoice["tax_rate"], invoice.get("discount"))
        report[customer] = report.get(customer, 0) + amount
        cache.put(customer, report[customer])
    return report
''',
    outro="```\n\nWhat bugs do you see?",
    followup="Which of these bugs would you fix first, and how exactly?",
)

CHAT = Conversation(
    name="chat",
    system="You help a small team keep track of their work. Read the messages the user pastes and answer.",
    intro="Here is today's chat from our team channel:\n\n",
    body="""\
Maya (09:02): morning all. the staging deploy from last night failed again, same error about the
database migration timing out. I rolled it back, so staging is on Monday's build for now.
Tom (09:05): ugh. that's the third time this week. is it the index on the orders table?
Maya (09:06): pretty sure. the migration adds an index to orders and staging has a copy of production
data from last month, about forty million rows. it takes longer than the ten minute deploy timeout.
Priya (09:11): can we build the index concurrently? postgres supports that, it just can't run inside a
transaction, so the migration tool needs a flag for it.
Tom (09:12): our migration tool wraps everything in a transaction by default. I think there is an option
to turn it off per migration, I'll look.
Maya (09:15): thanks Tom. Priya, can you check with the data team whether the orders table really needs
that index? the ticket says it's for the new monthly export, which runs once a month at night.
Priya (09:16): will do. I'll ask Sam, he wrote the export.
Leo (09:30): sorry, late. customer call. the Henderson account is asking again about the invoice PDF
layout, they want their purchase order number on every page, not just the first. they need it before
the end of the month for their audit.
Maya (09:32): that's the invoice template, right? who owns that now that Ana moved teams?
Leo (09:33): nobody officially. I can take it if someone shows me where the templates live.
Tom (09:35): they're in the documents service, templates folder. I can pair with you after lunch.
Leo (09:36): great, 14:00?
Tom (09:36): works.
Priya (10:20): Sam says the export can live without the index, it just runs slower, maybe twenty minutes
instead of two. he's fine with that for now but wants it back before the yearly export in January.
Maya (10:24): ok. then let's drop the index from this release and ship the rest today. Tom, can you still
look into the concurrent option so we can add it back properly next sprint?
Tom (10:25): yes, I'll write it up as a ticket with what I find.
Maya (10:26): and I'll re-run the staging deploy without that migration before lunch and tell you all
when it's green.
""",
    outro="\nWho has to do what, and by when?",
    followup="Write the short status update Maya could post at the end of the day.",
)

CONVERSATIONS = (PROSE, CODE, CHAT)


def first_turn(engine: LLMEngine, conv: Conversation, prompt_tokens: int = PROMPT_TOKENS) -> list[dict]:
    """System + user messages whose rendered prompt is as close to `prompt_tokens` as the body allows
    (the body is cut at a word boundary, its whitespace and line breaks kept)."""
    words = re.split(r"(?<=\s)(?=\S)", conv.body)

    def messages(n: int) -> list[dict]:
        user = conv.intro + "".join(words[:n]).rstrip() + conv.outro
        return [{"role": "system", "content": conv.system}, {"role": "user", "content": user}]

    lo, hi = 0, len(words)  # the largest n whose prompt fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if engine.count_tokens(messages(mid)) <= prompt_tokens:
            lo = mid
        else:
            hi = mid - 1
    return messages(lo)


# -- the tests ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> ModelStore:
    s = ModelStore(tmp_path_factory.mktemp("store"))
    s.import_gguf(default_gguf, precision="int4", name=DEFAULT_MODEL_NAME, make_default=True)
    s.import_gguf(default_gguf, precision="fp32", name=DEFAULT_MODEL_NAME)
    return s


@pytest.fixture(scope="module")
def int4(store: ModelStore) -> LLMEngine:
    return LLMEngine(store.resolve(), threads=2)


@pytest.fixture(scope="module")
def fp32(store: ModelStore) -> LLMEngine:
    return LLMEngine(store.resolve(f"{DEFAULT_MODEL_NAME}--fp32"), threads=2)


@dataclass
class Turn:
    req: Request
    tokens: list[int]
    logits: np.ndarray  # [64, vocab]: what each of the second turn's tokens was picked from


def _run(arb: Arbiter, req: Request) -> Request:
    arb.submit(req)
    while arb.step():
        pass
    assert req.done and req.error is None, req.error
    return req


def _recorded(arb: Arbiter, req: Request, monkeypatch: pytest.MonkeyPatch) -> Turn:
    """Run `req` alone, keeping the logits each of its tokens was picked from."""
    rows: list[np.ndarray] = []
    assert arb.engine is not None
    runner = arb.engine.runner
    prefill, decode = runner.prefill, runner.decode

    def recording_prefill(cache: KVCache, ids: list[int], all_logits: bool = False) -> np.ndarray:
        out = prefill(cache, ids, all_logits)
        rows.append(out[-1].copy())
        return out

    def recording_decode(caches: list[KVCache], tokens: list[int]) -> np.ndarray:
        out = decode(caches, tokens)
        rows.append(out[-1].copy())  # the only sequence in the batch
        return out

    with monkeypatch.context() as m:
        m.setattr(runner, "prefill", recording_prefill)
        m.setattr(runner, "decode", recording_decode)
        _run(arb, req)
    assert req.seq is not None
    tokens = list(req.seq.output_ids)
    logits = np.stack(rows[-len(tokens) :])  # the last prefill chunk's row, then one row per decode
    assert len(tokens) == 64 and [int(t) for t in logits.argmax(-1)] == tokens
    return Turn(req, tokens, logits)


def _kept_and_swapped(
    engine: LLMEngine, conv: Conversation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Turn, Turn]:
    """The first turn of `conv`, then its second turn twice: from the session's KV as it was parked (in
    memory, never swapped) and from the same KV after it went to disk under memory pressure."""
    arb = Arbiter(lambda: engine, ArbiterConfig(), SwapStore(tmp_path / "swap", model_key="test"))
    messages = first_turn(engine, conv)
    first = _run(arb, Request(messages, FIRST, app_id="app", session_key="swapped"))
    parked = arb.kv.parked["swapped"]
    assert first.seq is not None and parked.kv is not None and arb.snapshot()["swap_outs"] == 0
    ids, kv = list(parked.ids), parked.kv.copy()
    assert arb.swap_out_idle() == 1  # int8, to a swap file; nothing of it stays in memory
    assert parked.kv is None and arb.snapshot()["kv_swapped_bytes"] > 0
    arb.kv.park("kept", ("app", None), ids, kv)  # the same session's KV, never swapped
    messages += [
        {"role": "assistant", "content": first.seq.detok.text},
        {"role": "user", "content": conv.followup},
    ]
    kept = _recorded(arb, Request(list(messages), SECOND, app_id="app", session_key="kept"), monkeypatch)
    swapped = _recorded(arb, Request(messages, SECOND, app_id="app", session_key="swapped"), monkeypatch)
    assert kept.req.restored_from == "memory"
    assert swapped.req.restored_from == "disk", swapped.req.restored_from
    snap = arb.snapshot()
    assert (snap["swap_outs"], snap["swap_restores"], snap["swap_recomputes"]) == (1, 1, 0)
    assert swapped.req.reused_tokens == kept.req.reused_tokens > 500
    return kept, swapped


def _split(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def _margin(row: np.ndarray) -> float:
    top2 = np.sort(row)[-2:]
    return float(top2[1] - top2[0])


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=lambda c: c.name)
def test_a_swapped_session_continues_with_the_same_greedy_tokens_on_the_exact_graph(
    fp32: LLMEngine, conv: Conversation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's requirement as stated, on the graph where a tiny change in the KV stays tiny."""
    kept, swapped = _kept_and_swapped(fp32, conv, tmp_path, monkeypatch)
    assert swapped.tokens == kept.tokens
    cos = (kept.logits * swapped.logits).sum(-1) / (
        np.linalg.norm(kept.logits, axis=-1) * np.linalg.norm(swapped.logits, axis=-1)
    )
    assert cos.min() >= 0.999, cos.min()  # measured: 0.9994 at worst over 13 conversations


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=lambda c: c.name)
def test_a_swapped_session_continues_with_the_same_greedy_tokens_on_the_default_model(
    int4: LLMEngine, conv: Conversation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Identical until the first near tie of the never-swapped run, if any (see the module docstring)."""
    kept, swapped = _kept_and_swapped(int4, conv, tmp_path, monkeypatch)
    split = _split(kept.tokens, swapped.tokens)
    same_history = slice(0, min(split + 1, 64))  # both picked these from the same tokens
    a, b = kept.logits[same_history], swapped.logits[same_history]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos.min() >= MIN_COSINE, f"logits moved too far (cosine {cos.min():.4f}) before token {split}"
    if split < 64:
        margins = _margin(kept.logits[split]), _margin(swapped.logits[split])
        assert max(margins) < TIE_MARGIN, (
            f"the swapped session left the greedy path at token {split}, where the never-swapped one's "
            f"top-2 margin was {margins[0]:.3f} logits (the swapped one's {margins[1]:.3f}): not a near tie"
        )
