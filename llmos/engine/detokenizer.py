"""Incremental detokenization: text deltas that never split a UTF-8 character or leak a stop string.

Byte-level BPE tokens are byte strings, and one character (an emoji, a CJK ideograph) can span several
tokens. Bytes are buffered until they decode; text that could still be the start of a stop string is held
back until it is known not to be one.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable


class IncrementalDetokenizer:
    def __init__(self, token_bytes: Callable[[int], bytes], stop: tuple[str, ...] = ()) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self._stop = stop
        self._held = ""  # decoded text not yet released (a possible stop-string prefix)
        self.text = ""  # everything released so far
        self.stopped_by: str | None = None

    def add(self, token: int) -> str:
        """Feed one token; return the text that is now safe to show (possibly empty)."""
        if self.stopped_by is not None:
            return ""
        try:
            piece = self._decoder.decode(self._token_bytes(token))
        except UnicodeDecodeError:
            # An invalid sequence can never become valid: show U+FFFD for it rather than stall forever.
            self._decoder.reset()
            piece = "\ufffd"
        return self._release(self._held + piece)

    def _release(self, pending: str) -> str:
        for s in self._stop:
            at = pending.find(s)
            if at >= 0:
                self.stopped_by = s
                self._held = ""
                return self._emit(pending[:at])
        keep = 0
        for s in self._stop:  # longest tail of `pending` that is a proper prefix of some stop string
            for n in range(min(len(s) - 1, len(pending)), keep, -1):
                if pending.endswith(s[:n]):
                    keep = n
                    break
        self._held = pending[len(pending) - keep :] if keep else ""
        return self._emit(pending[: len(pending) - keep])

    def flush(self) -> str:
        """End of generation: release held text, and U+FFFD for a dangling partial character."""
        if self.stopped_by is not None:
            return ""
        tail = self._decoder.decode(b"", final=False)
        if self._decoder.getstate()[0]:
            tail += "\ufffd"
        self._decoder.reset()
        out, self._held = self._held + tail, ""
        return self._emit(out)

    def _emit(self, s: str) -> str:
        self.text += s
        return s
