"""Turning committed tokens into text safely while streaming.

Tokens can split a UTF-8 character, and a stop string can straddle steps, so text is
released only once it can no longer change: incomplete bytes and any tail that could
still grow into a stop string are held back.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    def __init__(self, stop: str | Sequence[str] = ()) -> None:
        if isinstance(stop, str):  # one stop string, not one per character
            stop = (stop,)
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = tuple(stop)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""  # decoded text not yet released
        self.stopped = False  # a stop string was found; nothing more will be released

    def feed(self, data: bytes) -> str:
        """Add token bytes; return the text that is now final (may be empty)."""
        if self.stopped:
            return ""
        self._pending += self._utf8.decode(data)
        cut = min((i for i in (self._pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        hold = max((self._partial_stop(s) for s in self.stop), default=0)
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> str:
        """The generation ended: release what was held back."""
        if self.stopped:
            return ""
        out, self._pending = self._pending + self._utf8.decode(b"", final=True), ""
        return out

    def _partial_stop(self, stop: str) -> int:
        """Length of the longest tail of the pending text that starts `stop`."""
        for n in range(min(len(stop) - 1, len(self._pending)), 0, -1):
            if self._pending.endswith(stop[:n]):
                return n
        return 0
