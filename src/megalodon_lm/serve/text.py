"""Incremental detokenisation with stop strings, for streaming replies.

Text is released to the client only once it cannot be the start of a stop string (and is not a trailing
U+FFFD, usually the first bytes of a character whose other bytes are not generated yet). When a stop
string appears the reply ends before it; what the model wrote from the stop string on is the `tail`.
"""

from __future__ import annotations

from typing import Any


class StopTracker:
    """Feed tokens one at a time with `add`; read `reply`, `tail` and `stopped`."""

    def __init__(self, tokenizer: Any, stops: list[str] | tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.released = 0  # characters of the reply already handed out
        self.reply = ""
        self.tail = ""
        self.stopped = False
        self._searched = 0  # stop strings cannot start before this character any more

    def add(self, token: int) -> str:
        """Take one generated token; returns the newly releasable text (may be empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        start = max(0, self._searched - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            self.reply, self.tail, self.stopped = text[:cut], text[cut:], True
            return self._release(self.reply)
        self._searched = len(text)
        safe = text.rstrip("\ufffd")
        hold = 0
        for k in range(min(len(safe), max((len(s) for s in self.stops), default=0)), 0, -1):
            if any(s.startswith(safe[-k:]) for s in self.stops):
                hold = k
                break
        self.reply = text
        return self._release(safe[:len(safe) - hold])

    def finish(self) -> str:
        """The reply ended without a stop string (EOS or length): release everything held back."""
        return self._release(self.reply)

    def _release(self, text: str) -> str:
        out = text[self.released:]
        self.released = max(self.released, len(text))
        return out
