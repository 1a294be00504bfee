"""Which of many tools a request is about, by the words they share: BM25 over each tool's name,
description and parameters (names, descriptions, enum values), with light stemming and a small table
of everyday synonyms.

A 135M model reading fourteen tools picks nearly the same one for every request (issue 12); lexical
retrieval is cheap (well under a millisecond for a few dozen tools), does not drift with prompt wording,
and narrows the choice to a few candidates the model then scores. The synonyms are general device and
assistant vocabulary ("wake" for an alarm, "ring" for a call, "louder" for volume), the words people
use for what tool authors name otherwise; nothing in them names a particular app or tool.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from agents.tools import Tool

K1, B = 1.2, 0.75
_WORD = re.compile(r"[a-z0-9]+")
_STOP_WORDS = (
    "a an the to of for in on at by with and or is are be it its this that my me i you your please can "
    "could would will do does did what whats how some any from into as about up so just want need"
)
STOP = frozenset(_STOP_WORDS.split())
# each group: words that mean the same thing to someone asking a device for something
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("alarm", "wake", "waking", "wakeup"),
    ("timer", "countdown", "count"),
    ("message", "text", "sms", "chat", "tell", "write"),
    ("call", "phone", "ring", "dial"),
    ("contact", "number", "address", "email", "details"),
    ("volume", "sound", "loud", "louder", "quiet", "quieter", "mute"),
    ("brightness", "bright", "brighter", "dim", "dimmer", "screen", "display"),
    ("weather", "forecast", "rain", "sunny", "umbrella", "cold", "warm", "hot", "temperature", "snow"),
    ("note", "jot", "notes"),
    ("reminder", "remind", "forget"),
    ("event", "calendar", "schedule", "appointment", "meeting"),
    ("music", "play", "song", "songs", "listen", "hear", "playlist", "album"),
    ("file", "document", "documents", "download", "downloads", "pdf", "search", "find"),
    ("toggle", "switch", "enable", "disable"),
    ("wifi", "wi", "fi", "wireless", "internet"),
    ("flashlight", "torch"),
    ("airplane", "flight", "plane"),
)
_CANON = {w: group[0] for group in SYNONYMS for w in group}


def stem(word: str) -> str:
    """Light suffix stripping: enough that "reminders", "reminding" and "reminded" meet "remind"."""
    for suffix in ("ings", "ing", "ers", "ed", "es", "er", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            if len(word) >= 4 and word[-1] == word[-2] and word[-1] not in "aeiosl":
                word = word[:-1]  # "labelled", "planned": the doubled consonant of the suffix
            return word
    return word


def terms(text: str) -> list[str]:
    """Words of `text`, stop words out; each also stands for its synonym group, when it has one."""
    out = []
    for w in _WORD.findall(text.lower().replace("_", " ")):
        if w in STOP:
            continue
        out.append(stem(w))
        if w in _CANON and _CANON[w] != w:
            out.append(stem(_CANON[w]))
    return out


def tool_text(tool: Tool) -> str:
    """What a tool is known by: name, description, and its parameters' names, descriptions, enums."""
    parts = [tool.spec.name, tool.spec.name, tool.spec.description]  # the name counts twice
    for name, prop in (tool.spec.parameters.get("properties") or {}).items():
        parts.append(name)
        if isinstance(prop, dict):
            parts.append(str(prop.get("description", "")))
            parts += [str(v) for v in prop.get("enum", []) if isinstance(v, str | int)]
    return " ".join(parts)


@dataclass(frozen=True)
class Ranked:
    tool: Tool
    score: float


class ToolIndex:
    """BM25 over the tools of one run (built per run: tools come and go with their apps)."""

    def __init__(self, tools: Sequence[Tool]) -> None:
        self.tools = list(tools)
        self.docs = [Counter(terms(tool_text(t))) for t in self.tools]
        self.avg = sum(sum(d.values()) for d in self.docs) / max(1, len(self.docs))
        df: Counter[str] = Counter()
        for d in self.docs:
            df.update(d.keys())
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}

    def rank(self, request: str) -> list[Ranked]:
        """Every tool with its score for `request`, best first (ties keep registration order)."""
        query = Counter(terms(request))
        scored = []
        for tool, doc in zip(self.tools, self.docs, strict=True):
            length = sum(doc.values())
            s = 0.0
            for w in query:
                f = doc.get(w, 0)
                if f:
                    s += self.idf[w] * f * (K1 + 1) / (f + K1 * (1 - B + B * length / self.avg))
            scored.append(Ranked(tool, s))
        return sorted(scored, key=lambda r: -r.score)
