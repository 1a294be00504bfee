"""One request as the arbiter sees it: whose it is, at which class, which session KV it continues.

A request wraps an engine `Sequence` (tokens, sampling, detokenizer) with what the scheduler and the KV
manager need: the app (fair share and quotas), the class (who goes first), the session key (whose
parked KV to restore and where to park it after), and callbacks to the caller's side.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llmos.arbiter.policy import Account, Priority
from llmos.engine.constraint import TokenConstraint
from llmos.engine.llm_engine import Prompt
from llmos.engine.sampling import SamplingParams
from llmos.engine.sequence import Sequence

_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    prompt: Prompt
    params: SamplingParams
    app_id: str = "unknown"
    uid: int | None = None  # the user running the app: quotas and fair shares count per (app, user)
    priority: Priority = Priority.NORMAL
    session_key: str | None = None  # KV of this conversation is parked under this key between turns
    max_context: int = 0  # the app's quotas (see policy.AppPolicy); 0 = none
    tokens_per_minute: int = 0
    max_queued: int = 0
    constraint: TokenConstraint | None = None  # grammar-constrained decoding (e.g. a JSON Schema)
    on_delta: Callable[[str], None] | None = None  # called on the arbiter's thread
    on_done: Callable[[Request], None] | None = None  # finished, cancelled or failed (see .error)
    request_id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.monotonic)
    admitted_at: float = 0.0  # when it last got a KV slot (preemption takes the newest first)
    prompt_ids: list[int] | None = None  # the prompt already tokenized (a long one, off this thread)
    seq: Sequence | None = None  # made on submit (else the prompt is tokenized on the arbiter's thread)
    error: Exception | None = None
    reused_tokens: int = 0  # prompt tokens whose KV was restored (session or shared prefix)
    restored_from: str = ""  # "", "memory", "disk", "prefix" or "recomputed" (a swap file was bad)
    preemptions: int = 0
    auto_prefix: bool = False  # a stateless client's: reuse and keep KV for its account (auto_prefix.py)

    @property
    def account(self) -> Account:
        """Whose tokens these are. An app id alone is not per user (two users' copies of one app share
        it), so counting by it would let one user's sessions and queue exhaust another's."""
        return (self.app_id, self.uid)

    @property
    def who(self) -> str:
        """The account in words, for quota messages."""
        return self.app_id if self.uid is None else f"{self.app_id} (uid {self.uid})"

    @property
    def admitted(self) -> bool:
        return self.seq is not None and self.seq.cache is not None

    @property
    def prefilling(self) -> bool:
        return self.seq is not None and self.seq.prefilled < len(self.seq.prompt_ids)

    @property
    def done(self) -> bool:
        return self.error is not None or (self.seq is not None and self.seq.finished)
