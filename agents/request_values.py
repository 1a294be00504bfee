"""Values a request states, read deterministically: clock times in their everyday forms, ISO dates,
numbers (digits or words), quoted titles.

A 135M model asked to write "HH:MM" for "seven in the morning" writes a made-up timestamp (issue 12);
reading the time is not a language-model problem. What is read here is offered to the call as the value
(agents/grounding.py), so what the user said is what the app gets.
"""

from __future__ import annotations

import re

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30,
    "forty": 40, "forty-five": 45, "fifty": 50, "sixty": 60, "ninety": 90, "hundred": 100,
}  # fmt: skip
_NUMBER_WORD = "|".join(sorted(_UNITS, key=len, reverse=True))
_HOUR = r"(?:[01]?\d|2[0-3])"
_AMPM = r"\s*(a\.?m\.?|p\.?m\.?)"
_EVENING = re.compile(r"\b(evening|tonight|afternoon|pm)\b")
_MORNING = re.compile(r"\b(morning|am)\b")


def _hm(hour: int, minute: int, meridiem: str | None, text: str) -> str | None:
    m = (meridiem or "").replace(".", "").lower()
    if m == "pm" and hour < 12:
        hour += 12
    elif m == "am" and hour == 12:
        hour = 0
    elif not m and hour < 12 and _EVENING.search(text) and not _MORNING.search(text):
        hour += 12
    if not (0 <= hour <= 23 and 0 <= minute <= 59):
        return None
    return f"{hour:02d}:{minute:02d}"


def clock_times(text: str) -> list[str]:
    """Every clock time in `text` as 24-hour HH:MM, in order: "07:00", "7am", "9 pm", "8.30",
    "seven in the morning", "half past six", "quarter past eight in the evening", "noon", "10 o'clock"."""
    low = text.lower()
    found: list[tuple[int, str]] = []
    word = rf"(\d{{1,2}}|{_NUMBER_WORD})"

    def num(w: str) -> int:
        return int(w) if w.isdigit() else _UNITS.get(w, -1)

    for m in re.finditer(rf"\b({_HOUR})[:.]([0-5]\d)(?:{_AMPM})?\b", low):
        found.append((m.start(), _hm(int(m.group(1)), int(m.group(2)), m.group(3), low)))
    for m in re.finditer(rf"\b(\d{{1,2}}|{_NUMBER_WORD}){_AMPM}(?![a-z])", low):
        found.append((m.start(), _hm(num(m.group(1)), 0, m.group(2), low)))
    for m in re.finditer(rf"\b(half|quarter) (past|to) {word}\b", low):
        h, mins = num(m.group(3)), 30 if m.group(1) == "half" else 15
        if m.group(2) == "to":
            h, mins = h - 1, 60 - mins
        found.append((m.start(), _hm(h, mins, None, low)))
    for m in re.finditer(rf"\b{word} (?:o'?clock|in the (morning|evening|afternoon)|at night)\b", low):
        found.append((m.start(), _hm(num(m.group(1)), 0, "am" if m.group(2) == "morning" else None, low)))
    for m in re.finditer(r"\b(noon|midday|midnight)\b", low):
        found.append((m.start(), "12:00" if m.group(1) != "midnight" else "00:00"))
    for m in re.finditer(
        rf"\bat {word}\b(?![:.]\d|\s*(?:a\.?m|p\.?m|o'?clock|minutes?|hours?|%|percent))", low
    ):
        found.append((m.start(), _hm(num(m.group(1)), 0, None, low)))
    seen, out = set(), []
    for _, t in sorted((p for p in found if p[1]), key=lambda p: p[0]):
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def iso_dates(text: str) -> list[str]:
    return re.findall(r"\b(\d{4}-[01]\d-[0-3]\d)\b", text)


def numbers(text: str) -> list[float]:
    """Numbers stated in digits or words, in order (a clock time's or date's parts are not numbers)."""
    low = re.sub(r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}[:]\d{2}\b", " ", text.lower())
    out: list[float] = []
    for m in re.finditer(rf"-?\d+(?:\.\d+)?|\b(?:{_NUMBER_WORD}|an?(?= hour))\b", low):
        w = m.group(0)
        if w in ("a", "an"):
            out.append(1.0)
        else:
            out.append(float(w) if w[0].isdigit() or w[0] == "-" else float(_UNITS[w]))
    return out


def quoted(text: str) -> list[str]:
    """Spans the request puts in quotes: 'Gift ideas', "Book club" (an apostrophe inside a word is not
    a quote)."""
    spans = re.findall(r"(?:^|(?<=[\s:(]))['\"“‘](.+?)['\"”’](?=$|[\s.,!?:;)])", text)
    return [s.strip() for s in spans if s.strip()]


_OFF = re.compile(r"\b(off|disable|disabled|deactivate|stop|mute)\b")
_ON = re.compile(r"\b(on|enable|enabled|activate|start)\b")


def switched(text: str) -> bool | None:
    """Whether the request switches something off (False) or on (True); None if it says neither or
    both."""
    low = text.lower()
    off, on = bool(_OFF.search(low)), bool(_ON.search(low))
    return None if off == on else on
