"""Reasoning parsers (`--reasoning-parser`): a thinking model's output split into the thinking
(`reasoning_content`) and the answer (`content`), for text still arriving too.

    deepseek_r1  the template opens <think> in the prompt: everything up to </think> is thinking
                 (a leading <think> the model writes itself is dropped); no </think>: all thinking
    qwen3        thinking only when the output starts with <think>; otherwise all answer

The split is monotone (as the tool-call parsers are): for a longer text both parts only grow, and
text that could still be the start of a marker is held back, so streamed deltas concatenate to
the whole message. The answer's leading whitespace is dropped. A constraint (a JSON schema, a
tool grammar) applies to the answer only: `answer_constraint` wraps its grammar so that the
thinking, up to the first </think>, is free.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.router.structured_outputs import REASONING_END, Constraint, after_reasoning

START = "<think>"
PARSERS = ("deepseek_r1", "qwen3")


@dataclass(frozen=True)
class Split:
    reasoning: str
    content: str
    decided: bool = True


def _hold(text: str, marker: str, final: bool) -> str:
    if final:
        return text
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return text[:-k]
    return text


def split(parser: str, text: str, final: bool) -> Split:
    """The reasoning and the answer in text (all of it, or so far)."""
    if START.startswith(text) and not final:
        return Split("", "", decided=False)  # could still be <think>
    body = text
    if text.startswith(START):
        body = text[len(START):]
    elif parser == "qwen3":
        return Split("", text)  # qwen3 without thinking
    at = body.find(REASONING_END)
    if at < 0:
        return Split(_hold(body, REASONING_END, final), "")
    return Split(body[:at], body[at + len(REASONING_END):].lstrip())


@dataclass
class ReasoningStream:
    parser: str
    text: str = ""
    _sent_reasoning: int = 0
    _sent_content: int = 0

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(new reasoning, new answer text) for this much more text."""
        self.text += text
        s = split(self.parser, self.text, final)
        if not s.decided:
            return "", ""
        reasoning, content = s.reasoning[self._sent_reasoning:], s.content[self._sent_content:]
        self._sent_reasoning, self._sent_content = len(s.reasoning), len(s.content)
        return reasoning, content


def answer_constraint(parser: str | None, c: Constraint | None) -> Constraint | None:
    """The constraint as the model must meet it: after its thinking, when it thinks."""
    if c is None or parser is None:
        return c
    return after_reasoning(c, optional=parser == "qwen3")
