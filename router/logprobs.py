"""Logprobs in OpenAI's two formats, from token ids and the engine's (raw-logit) logprobs.

Completions (legacy):  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{text: lp}],
                        "text_offset": [...]}; top_logprobs holds the `logprobs` most likely
                        tokens and the sampled one (so up to logprobs + 1 entries).
Chat:                  {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
                        "logprob", "bytes"}]}]}; top_logprobs holds exactly the top ones.

Echoed prompt tokens are shown with null logprobs: the engine computes logprobs only for the
tokens it samples.
"""

from __future__ import annotations

from pagedserve.router.generation import TopLogprobs
from pagedserve.router.tokenizer import Tokenizer


class CompletionLogprobs:
    """Builds the completions format piece by piece; text_offset runs on across pieces."""

    def __init__(self, tokenizer: Tokenizer, offset: int = 0) -> None:
        self.tokenizer = tokenizer
        self.offset = offset

    def _empty(self) -> dict:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _token(self, out: dict, token_id: int) -> None:
        text = self.tokenizer.token_text(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(self.offset)
        self.offset += len(text)

    def prompt(self, token_ids: list[int]) -> dict:
        """Echoed prompt tokens: their text and offsets, null logprobs."""
        out = self._empty()
        for token_id in token_ids:
            self._token(out, token_id)
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
        return out

    def sampled(self, token_ids: list[int], logprobs: list[float],
                tops: list[TopLogprobs]) -> dict:
        out = self._empty()
        for token_id, logprob, top in zip(token_ids, logprobs, tops):
            self._token(out, token_id)
            out["token_logprobs"].append(logprob)
            entries = {self.tokenizer.token_text(t): lp for t, lp in top}
            entries.setdefault(self.tokenizer.token_text(token_id), logprob)
            out["top_logprobs"].append(entries)
        return out


def merge_completion_logprobs(parts: list[dict]) -> dict:
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key in out:
            out[key] += part[key]
    return out


def _entry(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict:
    return {"token": tokenizer.token_text(token_id), "logprob": logprob,
            "bytes": tokenizer.token_bytes(token_id)}


def chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], logprobs: list[float],
                  tops: list[TopLogprobs], num_top: int) -> dict:
    """{"content": [...]} for these tokens; num_top top entries each (the engine's order)."""
    content = []
    for token_id, logprob, top in zip(token_ids, logprobs, tops):
        entry = _entry(tokenizer, token_id, logprob)
        entry["top_logprobs"] = [_entry(tokenizer, t, lp) for t, lp in top[:num_top]]
        content.append(entry)
    return {"content": content}
