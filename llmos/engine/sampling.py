"""Sampling parameters (validated at the boundary) and the sampler that turns logits into a token."""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from llmos.errors import InvalidSamplingError, validation_problems

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # each is matched against the text after every token: bounded work per token


class SamplingParams(BaseModel):
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    # allow_inf_nan=False: a NaN compares false with every bound, so without it a NaN temperature (a
    # D-Bus double may be one) would be refused as "should be less than or equal to 10"
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)

    max_tokens: int = Field(256, ge=1, le=1_000_000)
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    top_k: int = Field(0, ge=0)  # 0 = off
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    repeat_last_n: int = Field(64, ge=0)  # window the penalty looks back over (llama.cpp's default)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # draft-free speculative decoding and grammar jump-forward (llmos/engine/speculative.py). Opt-in:
    # on the int4 graph a verify run's logits differ from a decode step's in the last bits (two
    # GroupQueryAttention paths, then int8 activation rounding), so a near tie can go the other way, and
    # whether a step drafts depends on measured run times: with it on, a greedy answer is not always
    # the plain one, nor the same run to run. Exact graphs (fp32) give identical output either way.
    speculative: bool = False

    @field_validator("temperature", "top_p", "repetition_penalty", mode="before")
    @classmethod
    def _finite(cls, v: object) -> object:
        """Say what is wrong with a NaN or an infinity, instead of naming a bound it does not break."""
        if isinstance(v, float) and not math.isfinite(v):
            what = "NaN" if math.isnan(v) else "infinity" if v > 0 else "-infinity"
            raise PydanticCustomError("finite_number", "must be a finite number, not {what}", {"what": what})
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: object) -> object:
        if isinstance(v, str):
            v = (v,)
        if isinstance(v, list | tuple):
            if len(v) > MAX_STOP_STRINGS:
                raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
            if any(not isinstance(s, str) or not s for s in v):
                raise ValueError("stop strings must be non-empty strings")
            if any(len(s) > MAX_STOP_CHARS for s in v):
                raise ValueError(f"a stop string is at most {MAX_STOP_CHARS} characters")
            return tuple(v)
        return v

    @classmethod
    def of(cls, **options: object) -> SamplingParams:
        """Build from loose options, turning every validation problem into InvalidSamplingError."""
        try:
            return cls(**options)
        except ValidationError as e:
            problems = validation_problems(e, "options")
            raise InvalidSamplingError(f"invalid generation options: {problems}") from None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class Sampler:
    """Per-sequence sampler; its own randomness makes a seeded run reproducible whatever else runs.

    A draw is an exponential race (the Gumbel-max trick): token argmin(E_i / p_i) with E_i ~ Exp(1) is
    distributed as p. A seeded request takes the E_i of output position n from a generator seeded with
    (seed, n), so the token at n depends only on the seed, n and the logits there, not on how many runs
    produced it. That is what lets speculative decoding (llmos/engine/speculative.py) give a seeded
    request exactly the tokens plain decoding gives: verifying a draft token t is drawing at its
    position and comparing. Accepted with probability p(t); on rejection the draw is distributed as p
    with t removed, renormalized: the standard speculative acceptance rule, with coupled randomness.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def _rng(self, position: int) -> np.random.Generator:
        seed = self.params.seed
        return self.rng if seed is None else np.random.default_rng((seed, position))

    def __call__(self, logits: np.ndarray, history: list[int], position: int = 0) -> int:
        p = self.params
        if p.repetition_penalty != 1.0 and p.repeat_last_n and history:
            logits = logits.copy()
            recent = np.unique(np.asarray(history[-p.repeat_last_n :], dtype=np.int64))
            vals = logits[recent].astype(np.float64)
            with np.errstate(over="ignore"):
                logits = logits.astype(np.float64)
                logits[recent] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        if 0 < p.top_k < logits.shape[0]:
            cand = np.argpartition(logits, -p.top_k)[-p.top_k :]
        else:
            cand = np.arange(logits.shape[0])
        with np.errstate(over="ignore"):
            scaled = logits[cand].astype(np.float64) / p.temperature
        order = np.argsort(-scaled, kind="stable")
        cand, scaled = cand[order], scaled[order]
        if not np.isfinite(scaled[0]):  # a temperature so small it overflows: its limit is greedy
            return int(cand[0])
        probs = np.exp(scaled - scaled[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            cand, probs = cand[:keep], probs[:keep] / probs[:keep].sum()
        race = self._rng(position).exponential(size=len(cand))
        with np.errstate(divide="ignore"):  # a probability that underflowed to 0 never wins
            return int(cand[np.argmin(race / probs)])
