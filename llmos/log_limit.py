"""Log a failure that repeats once, count the repeats, and say when it clears.

A caller or a broken environment can make the same thing fail once per request or once per step. A
swap directory on a full 2 MB tmpfs once put 1,552 identical ERROR lines into the log in two minutes:
the one line that mattered was buried, and journald's per-service rate limit then drops lines, the
useful ones included. So each kind of failure gets

- its first occurrence as one full line: what failed, why, and what the administrator can do;
- its repeats counted, not logged, with a summary line at most every `every_s` seconds
  ("swap writes to /var/lib/llmos/swap/812 failed 1,551 more times since 2026-11-21 14:02:11; last: …");
- one line when it clears (the same operation succeeded again), if its failure was logged.

A failure that comes back right after clearing starts no new line before `every_s` has passed since
the last line of its kind: a condition that flaps with every request (fail, succeed, fail, …) gives
at most a failure or summary line and its recovery line per kind per `every_s`, not two per request.
Failures that were counted but never logged show up in the next line of their kind.

Kinds are short fixed phrases chosen by the code ("prefill steps", "swap writes to DIR"), never text
from a caller, so the table stays small. Callers keep their own counters for status; this only decides
what reaches the log. One lock, because the engine thread and the event loop both log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EVERY_S = 600.0  # at most one summary line per kind every 10 minutes


@dataclass
class _Kind:
    failing: bool = False
    announced: bool = False  # this failure episode reached the log, so its recovery will too
    episode_failures: int = 0
    episode_since: float = 0.0  # wall-clock time the episode began
    unlogged: int = 0  # failures counted since the last line of this kind
    last_line: float | None = None  # monotonic time of the last line of this kind
    last_line_wall: float = 0.0


class LimitedLog:
    """Failure lines for `logger`, at most one per kind every `every_s` seconds, plus recoveries."""

    def __init__(
        self,
        logger: logging.Logger,
        every_s: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.logger = logger
        self.every_s = every_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._kinds: dict[str, _Kind] = {}
        self._lock = threading.Lock()

    def failed(
        self,
        kind: str,
        reason: object,
        hint: str = "",
        *,
        level: int = logging.ERROR,
        exc_info: Any = None,
    ) -> bool:
        """One failure of `kind` ("swap writes to /x") because of `reason`; `hint` says what the
        administrator can do. Logged as "<kind> failed: <reason>. <hint>" if no line of this kind was
        logged in the last `every_s` seconds, else counted. True if a line was logged."""
        now, wall = self._clock(), self._wall_clock()
        with self._lock:
            k = self._kinds.setdefault(kind, _Kind())
            if not k.failing:
                k.failing, k.announced = True, False
                k.episode_failures, k.episode_since = 0, wall
            k.episode_failures += 1
            if k.last_line is not None and now - k.last_line < self.every_s:
                k.unlogged += 1
                return False
            n, since = k.unlogged + 1, _when(k.last_line_wall)
            if k.announced:  # the episode is known: how often since its last line, and the latest reason
                self.logger.log(
                    level, "%s failed %s more %s since %s; last: %s", kind, f"{n:,}", _times(n), since, reason
                )
            else:
                earlier = f" ({n:,} times since {since})" if k.unlogged else ""
                self.logger.log(
                    level,
                    "%s failed: %s%s%s; repeats are counted and summarised at most every %s",
                    kind,
                    reason,
                    earlier,
                    f". {hint}" if hint else "",
                    _duration(self.every_s),
                    exc_info=exc_info,
                )
            k.announced, k.unlogged, k.last_line, k.last_line_wall = True, 0, now, wall
            return True

    def recovered(self, kind: str, note: str = "") -> bool:
        """`kind` worked. If it was failing and that was logged, one line says it works again (with the
        failures since the episode began); True if a line was logged."""
        with self._lock:
            k = self._kinds.get(kind)
            if k is None or not k.failing:
                return False
            k.failing = False
            if not k.announced:  # a repeat within the quiet period: left for the next line to count
                return False
            n = k.episode_failures
            self.logger.info(
                "%s work again after %s %s since %s%s",
                kind,
                f"{n:,}",
                "failure" if n == 1 else "failures",
                _when(k.episode_since),
                f"; {note}" if note else "",
            )
            k.announced, k.unlogged = False, 0
            k.last_line, k.last_line_wall = self._clock(), self._wall_clock()
            return True

    def failing(self, kind: str) -> bool:
        with self._lock:
            k = self._kinds.get(kind)
            return k is not None and k.failing


def _times(n: int) -> str:
    return "time" if n == 1 else "times"


def _when(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
