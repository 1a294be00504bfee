"""Import progress for a terminal: a redrawn bar per stage on a TTY, one plain line per stage otherwise.

`ImportProgress` is a `ModelStore` progress callback, `progress(stage, done, total)`. On a terminal each
stage gets one line whose bar is redrawn in place and which ends with the stage's time; on a pipe or a
log file each stage is announced once, when it starts, so logs stay readable (no carriage returns, no
hundreds of lines). `message()` prints a line of its own (download notes) without breaking the bar.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

STAGE_LABELS = {
    "hash": "checksum",
    "tokenizer": "tokenizer",
    "graph": "weights",
    "check": "load check",
    "digest": "file digests",
}
STAGE_NOTES = {
    "hash": "sha256 of the source file",
    "tokenizer": "converting the tokenizer",
    "graph": "building the graph, {total} tensors",
    "check": "loading the built graph in onnxruntime",
    "digest": "sha256 of every file written, for the check at each load",
}
_LABEL_WIDTH = max(map(len, STAGE_LABELS.values()))


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class ImportProgress:
    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None, width: int = 30) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.width = width
        self.stages: list[str] = []  # in the order they started
        self._stage: str | None = None
        self._started = 0.0
        self._open_line = False  # a bar is drawn and the cursor sits at its end

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self._end_line()
            self._stage = stage
            self._started = time.monotonic()
            self.stages.append(stage)
            if not self.tty:
                note = STAGE_NOTES.get(stage, "").format(total=total)
                self._write(f"  {stage}: {note}\n" if note else f"  {stage}\n")
        if self.tty:
            self._draw(stage, done, total)

    def message(self, text: str) -> None:
        """A line of its own (e.g. "downloading ..."), printed above any bar in progress."""
        self._end_line()
        self._write(text + "\n")

    def close(self) -> None:
        self._end_line()

    # -- drawing ---------------------------------------------------------------------------------------
    def _draw(self, stage: str, done: int, total: int) -> None:
        total = max(total, 1)
        done = min(max(done, 0), total)
        filled = self.width * done // total
        bar = "#" * filled + "-" * (self.width - filled)
        label = STAGE_LABELS.get(stage, stage)
        line = f"\r\x1b[K  {label:<{_LABEL_WIDTH}} [{bar}] {done}/{total}"
        if done == total:
            line += f"  {time.monotonic() - self._started:.1f} s"
        self._write(line)
        self._open_line = True

    def _end_line(self) -> None:
        if self._open_line:
            self._write("\n")
            self._open_line = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
