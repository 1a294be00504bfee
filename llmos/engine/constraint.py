"""A constraint on which tokens a sequence may sample next (grammar-constrained decoding).

The engine knows only this protocol; the grammar engine behind it (llguidance for JSON Schema) lives in
the agent layer. Per token: `mask(logits)` sets every token the grammar forbids to -inf just before
sampling, and `advance(token)` feeds the sampled token to the grammar. An implementation may start
computing the next mask in `advance`, so that it runs while the model computes the next logits.
It may also offer `forced_tokens()`: the tokens the grammar admits as the only continuation, which the
engine appends without sampling, computing them in one run (jump-forward, llmos/engine/speculative.py).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class TokenConstraint(Protocol):
    def mask(self, logits: np.ndarray) -> None:
        """Forbid, in place, every token that cannot come next (its logit becomes -inf)."""

    def advance(self, token: int) -> None:
        """The token that was sampled (always one `mask` allowed)."""

    def forced_tokens(self) -> list[int]:
        """Tokens that must come next whatever the model says (optional: [] means none known)."""
        return []

    @property
    def complete(self) -> bool:
        """True once the output is a complete match and nothing but end-of-sequence may follow."""
