"""Stop strings: text is cut at the first stop string and no part of one is ever released."""

from __future__ import annotations

import random

from pagedserve.router.stop_strings import StopStringMatcher


def _run(text: str, stops: list[str], cuts: list[int], include: bool = False
         ) -> tuple[list[str], bool]:
    m = StopStringMatcher(stops, include)
    out, prev = [], 0
    for cut in [*cuts, len(text)]:
        emitted, stopped = m.feed(text[prev:cut])
        out.append(emitted)
        prev = cut
        if stopped:
            return out, True
    out.append(m.flush())
    return out, False


def _expected(text: str, stops: list[str], include: bool = False) -> tuple[str, bool]:
    hits = [(i, s) for s in stops if (i := text.find(s)) >= 0]
    if not hits:
        return text, False
    at, stop = min(hits, key=lambda h: (h[0] + len(h[1]), h[0]))
    return text[: at + len(stop)] if include else text[:at], True


def test_random_texts_and_chunkings() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice("abc") for _ in range(rng.randrange(0, 20)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randrange(1, 5)))
                 for _ in range(rng.randrange(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randrange(0, len(text) + 1)))
        include = rng.random() < 0.3
        out, stopped = _run(text, stops, cuts, include)
        want, want_stopped = _expected(text, stops, include)
        assert ("".join(out), stopped) == (want, want_stopped), (text, stops, cuts)
        # Every release is final: the text released so far is always a prefix of the answer.
        for k in range(len(out)):
            assert want.startswith("".join(out[: k + 1]))


def test_partial_stop_is_held_then_released() -> None:
    m = StopStringMatcher(["\n\nQuestion"])
    assert m.feed("the answer is 42\n") == ("the answer is 42", False)
    assert m.feed("\nQues") == ("", False)
    assert m.feed("ts") == ("\n\nQuests", False)  # not the stop string after all
    assert m.feed("\n\nQuestion: next") == ("", True)


def test_no_stops_passes_text_through() -> None:
    m = StopStringMatcher([])
    assert m.feed("abc") == ("abc", False)
    assert m.flush() == ""
