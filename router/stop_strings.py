"""Stop strings: end the text at the first stop string, and never stream part of one.

Text arrives in final pieces (from the detokenizer). The matcher keeps a small tail of text that
could still be the start of a stop string and releases it only once it cannot be:

    seen:    "... the answer is 42\\n\\nQues"      stop = "\\n\\nQuestion"
    emitted: "... the answer is 42"              held: "\\n\\nQues"  (a prefix of the stop string)

When a stop string completes (the first to end, the longest on a tie), the text before it (plus the stop string itself with
include_in_output) is the last text emitted, and the request finishes with reason "stop".
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    def __init__(self, stops: Sequence[str], include_in_output: bool = False) -> None:
        self.stops = tuple(s for s in stops if s)
        self.include_in_output = include_in_output
        self.held = ""
        self.stopped_on: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text that is final, whether a stop string was found)."""
        assert self.stopped_on is None, "feed after a stop string ended the text"
        if not self.stops:
            return text, False
        buf = self.held + text
        hit = self._first_stop(buf)
        if hit is not None:
            at, stop = hit
            self.stopped_on, self.held = stop, ""
            return buf[: at + len(stop)] if self.include_in_output else buf[:at], True
        keep = self._partial_stop_len(buf)
        self.held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """At the end of generation, the held tail is plain text after all."""
        held, self.held = self.held, ""
        return held

    def _first_stop(self, buf: str) -> tuple[int, str] | None:
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        # The stop string that ends first (text streams in order); on a tie, the longer one.
        return min(hits, key=lambda h: (h[0] + len(h[1]), h[0])) if hits else None

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        longest = min(len(buf), max(len(s) for s in self.stops) - 1)
        for k in range(longest, 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
