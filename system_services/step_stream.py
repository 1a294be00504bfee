"""A run's steps streamed to its owner as the model writes them: Task1's `StepText` and `StepCall`.

An answer step takes the default model seconds; sent whole, the app shows nothing until then. So each
generation that writes a step (the agent loop says which) is read as it grows (agents/step_draft.py):
answer text goes out as `StepText (u step, s delta)`, and a call's tool as `StepCall (u step, s tool)`
once its name is written. Tokens come every few milliseconds, so text is batched: the first piece at
once, then at most one signal every FLUSH_S (a D-Bus message per token would cost the bus more than the
text is worth), and whatever is left when the generation ends goes out before the step's `Step` signal.
The deltas of an answer step always add up to its answer: `settle` sends the rest (an answer cut by a
limit gets its " …", an agent's own step logic that did not stream sends its answer whole).

Everything here runs on the daemon's event loop and does little per token: appending the delta; the step
text is re-read at most once per FLUSH_S.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from agents.agent_loop import Step
from agents.step_draft import read_draft
from agents.tool_format import ToolCallFormat

FLUSH_S = 0.05  # at most ~20 signals a second per run, text still looks live
Send = Callable[[str, str, list[Any]], None]  # (member, signature, body): a unicast to the owner


class StepStream:
    def __init__(self, send: Send, fmt: ToolCallFormat) -> None:
        self._send, self._fmt = send, fmt
        self._step = 0  # the step being written (0: none yet)
        self._raw: list[str] = []  # this generation's text so far, in deltas
        self._sent = ""  # the answer text of `_step` sent so far
        self._named = False  # StepCall sent for this generation
        self._last = 0.0  # monotonic time of the last flush (0: never, the first piece goes at once)
        self._timer: asyncio.TimerHandle | None = None

    def begin(self, step: int) -> Callable[[str], None]:
        """A generation that writes step `step` starts; returns what takes its text deltas. A step whose
        call was a repeat (dropped by the loop) is written again under the same number."""
        self.end()
        if step != self._step:
            self._step, self._sent = step, ""
        self._raw, self._named, self._last = [], False, 0.0
        return self._feed

    def end(self) -> None:
        """The generation is over: what is left goes out now, before the step's `Step`."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._raw:
            self._flush()
        self._raw = []

    def settle(self, step: Step) -> None:
        """Before `step`'s `Step` signal: its answer's text not streamed yet, so the deltas add up to it."""
        if step.answer is None:
            return
        sent = self._sent if step.number == self._step else ""
        if step.answer.startswith(sent) and len(step.answer) > len(sent):
            self._send("StepText", "us", [step.number, step.answer[len(sent) :]])
        self._step, self._sent = step.number, step.answer

    # -- per token -----------------------------------------------------------------------------------
    def _feed(self, delta: str) -> None:
        self._raw.append(delta)
        if self._timer is not None:
            return  # a flush is due: it takes this delta too
        wait = self._last + FLUSH_S - time.monotonic()
        if wait <= 0:
            self._flush()
        else:
            self._timer = asyncio.get_running_loop().call_later(wait, self._flush)

    def _flush(self) -> None:
        self._timer = None
        self._last = time.monotonic()
        text = "".join(self._raw)
        self._raw = [text]  # joined once per flush, not once per token
        draft = read_draft(self._fmt, text)
        if draft.answer is not None:
            # the answer so far only grows; a reading that is not a continuation (never seen) waits
            if draft.answer.startswith(self._sent) and len(draft.answer) > len(self._sent):
                self._send("StepText", "us", [self._step, draft.answer[len(self._sent) :]])
                self._sent = draft.answer
        elif draft.tool is not None and not self._named:
            self._named = True
            self._send("StepCall", "us", [self._step, draft.tool])
