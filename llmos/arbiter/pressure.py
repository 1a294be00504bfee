"""Is the machine (or this service's cgroup) short of memory right now?

The daemon answers memory pressure by swapping cold KV caches to disk before anything else, long before the
kernel's OOM killer picks a process (an LLM service holding gigabytes is the obvious victim). Two kernel
signals say "short of memory" early:
- PSI, /proc/pressure/memory: the share of the last 10 s in which some (or all) tasks stalled waiting for
  memory. A stall share above a threshold means reclaim is already hurting.
- cgroup v2 memory.events: counters of the times this cgroup hit memory.high (throttled), memory.max
  (reclaim at the hard limit) or ran the OOM killer. Any increase means the limit set for the service by
  systemd (MemoryHigh=/MemoryMax=) is being reached, even when the machine as a whole is fine.
Either source can be missing (kernel without PSI, cgroup v1, a container): the monitor uses what exists and
never raises while running, because the daemon must not die over a diagnostics file.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("llmos.pressure")

PSI_MEMORY = "/proc/pressure/memory"
CGROUP_ROOT = "/sys/fs/cgroup"
# memory.events counters that mean the cgroup is at its limits; `low` only says memory.low protection was
# broken into and `oom_kill` always follows `oom`.
PRESSURE_EVENTS = ("high", "max", "oom")

# Files already reported as malformed: one warning each, not one per check (checks run every few seconds).
_warned: set[str] = set()


@dataclass(frozen=True)
class PressureReading:
    some_avg10: float | None  # % of the last 10 s some task stalled on memory; None without PSI
    full_avg10: float | None  # % of the last 10 s all non-idle tasks stalled at once
    cgroup_high_events: int | None  # memory.events `high` counter; None without a cgroup v2 memory.events
    cgroup_oom_events: int | None  # memory.events `oom` counter
    source: str  # the files this reading came from, " + "-joined, or "none"


def _read(path: str | os.PathLike[str]) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        # Missing (no PSI / no cgroup v2), EOPNOTSUPP (kernel booted with psi=0), permission, a directory...
        return None


def _warn_once(path: str | os.PathLike[str], problem: str) -> None:
    key = os.fspath(path)
    if key not in _warned:
        _warned.add(key)
        log.warning("ignoring %s: %s", key, problem)


def parse_psi(text: str) -> tuple[float, float]:
    """(some avg10, full avg10) from the text of a PSI file; ValueError saying what is wrong otherwise."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        kind, _, rest = line.partition(" ")
        fields = dict(item.partition("=")[::2] for item in rest.split())
        if kind not in ("some", "full") or "avg10" not in fields:
            raise ValueError(f"not a PSI line: {line!r}")
        try:
            value = float(fields["avg10"])
        except ValueError:
            raise ValueError(f"avg10 is not a number in {line!r}") from None
        if not 0.0 <= value <= 100.0:  # also rejects nan
            raise ValueError(f"avg10 is not a percentage in {line!r}")
        found[kind] = value
    missing = [k for k in ("some", "full") if k not in found]
    if missing:
        raise ValueError(f"no {' or '.join(missing)} line")
    return found["some"], found["full"]


def read_psi(path: str | os.PathLike[str] = PSI_MEMORY) -> tuple[float, float] | None:
    """(some avg10, full avg10) in percent; None if the file is missing, unreadable or malformed.

    A malformed file is logged once (per path) at WARNING on "llmos.pressure"; it never raises.
    """
    text = _read(path)
    if text is None:
        return None
    try:
        return parse_psi(text)
    except ValueError as e:
        _warn_once(path, f"malformed PSI file: {e}")
        return None


def parse_cgroup_events(text: str) -> dict[str, int]:
    """The `name count` lines of a cgroup v2 memory.events file; ValueError saying what is wrong otherwise."""
    events: dict[str, int] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"not a `name count` line: {line!r}")
        events[parts[0]] = int(parts[1])
    if not events:
        raise ValueError("no counters")
    return events


def read_cgroup_events(path: str | os.PathLike[str]) -> dict[str, int] | None:
    """The counters of a cgroup v2 memory.events file (low, high, max, oom, oom_kill, ...).

    None if the file is missing, unreadable or malformed (malformed is logged once per path, never raised).
    """
    text = _read(path)
    if text is None:
        return None
    try:
        return parse_cgroup_events(text)
    except ValueError as e:
        _warn_once(path, f"malformed memory.events file: {e}")
        return None


def own_cgroup_events_path(
    proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup", root: str | os.PathLike[str] = CGROUP_ROOT
) -> Path | None:
    """This process's cgroup v2 memory.events file, or None (cgroup v1 memory, root cgroup, not mounted).

    /proc/self/cgroup has a `0::/path` line for the v2 hierarchy. That hierarchy is mounted at
    /sys/fs/cgroup (unified layout) or /sys/fs/cgroup/unified (systemd's hybrid layout, where the memory
    controller usually stays on v1 and the file does not exist). The root cgroup has no memory.events.
    """
    text = _read(proc_cgroup)
    if text is None:
        return None
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, cgroup = rest.partition(":")
        if hierarchy != "0" or controllers or not cgroup.startswith("/"):
            continue
        for base in (Path(root), Path(root) / "unified"):
            candidate = base / cgroup.lstrip("/") / "memory.events"
            if candidate.is_file():
                return candidate
    return None


class PressureMonitor:
    """Polled by the daemon: `check()` says whether to start shedding memory (swap cold KV out first)."""

    def __init__(
        self,
        threshold_pct: float,
        psi_path: str | os.PathLike[str] = PSI_MEMORY,
        cgroup_events_path: str | os.PathLike[str] | Literal["auto"] | None = "auto",
    ) -> None:
        """`threshold_pct`: PSI `some avg10` (0-100) at or above which memory counts as short.

        0 means "always under pressure", whatever the sources say (tests use it to force the reaction).
        `cgroup_events_path`: "auto" finds this process's own cgroup v2 memory.events; None disables it.
        """
        if isinstance(threshold_pct, bool) or not isinstance(threshold_pct, int | float):
            raise ValueError(f"threshold_pct must be a number, not {threshold_pct!r}")
        if not math.isfinite(threshold_pct) or not 0 <= threshold_pct <= 100:
            raise ValueError(f"threshold_pct must be a percentage from 0 to 100, not {threshold_pct!r}")
        self.threshold_pct = float(threshold_pct)
        self.psi_path = os.fspath(psi_path)
        if cgroup_events_path == "auto":
            self.cgroup_events_path: str | None = (
                None if (found := own_cgroup_events_path()) is None else os.fspath(found)
            )
        else:
            self.cgroup_events_path = None if cgroup_events_path is None else os.fspath(cgroup_events_path)
        self.last: PressureReading | None = None
        # Counters as of construction, so the first check() already sees limits hit since startup.
        self._events = self._read_events()
        self.available = read_psi(self.psi_path) is not None or self._events is not None

    def _read_events(self) -> dict[str, int] | None:
        return None if self.cgroup_events_path is None else read_cgroup_events(self.cgroup_events_path)

    def check(self) -> bool:
        """Read both sources now; True when memory is short (see the module docstring). Never raises."""
        psi = read_psi(self.psi_path)
        events = self._read_events()
        sources = [p for p, ok in ((self.psi_path, psi), (self.cgroup_events_path, events)) if ok is not None]
        self.last = PressureReading(
            some_avg10=None if psi is None else psi[0],
            full_avg10=None if psi is None else psi[1],
            cgroup_high_events=None if events is None else events.get("high"),
            cgroup_oom_events=None if events is None else events.get("oom"),
            source=" + ".join(str(s) for s in sources) or "none",
        )
        hit = (
            events is not None
            and self._events is not None
            and any(
                # A counter going down means the cgroup was recreated: a new baseline, not pressure.
                events.get(k, 0) > self._events.get(k, 0)
                for k in PRESSURE_EVENTS
            )
        )
        if events is not None:
            self._events = events
        if self.threshold_pct == 0:
            return True
        return hit or (psi is not None and psi[0] >= self.threshold_pct)
