"""Incremental detokenization: text deltas that are final, never half a character.

Decoding token by token is wrong in two ways: a byte-level BPE or byte-fallback token may carry only
part of a UTF-8 character (decoded alone it is U+FFFD), and some decoders treat the first token of a
string specially (SentencePiece's Metaspace and Strip drop its leading space). So each step decodes
a short window twice and emits the difference:

    tokens:  [ ... | already emitted, decoded as context | emitted last time | new, unread ]
                   ^ prefix_offset                       ^                  ^ read_offset

    prefix_text = decode(tokens[prefix_offset:read_offset])
    full_text   = decode(tokens[prefix_offset:])
    delta       = full_text[len(prefix_text):]   unless it ends in U+FFFD: then wait for more

The window's first token is one that already produced text, so its special first-token treatment
is the same in both decodes and the delta equals what decoding the whole sequence would add. With
byte fallback (<0xNN> tokens), a run of byte tokens decodes as one unit, valid UTF-8 or all U+FFFD,
so text is only taken once the run has ended. At the end, flush() emits whatever was held back,
U+FFFD included, so the concatenated deltas equal decode(all tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedserve.router.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 6  # prompt tokens decoded as context for the first output tokens


class IncrementalDetokenizer:
    """Feed output token ids one at a time; get back only text that is final."""

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.hold_ids = tokenizer.byte_fallback_ids
        self.tokens = list(context_ids[-CONTEXT_TOKENS:])
        self.read_offset = len(self.tokens)
        self.prefix_offset = 0
        # The context must end on a whole character; tokens after that point are re-read as output.
        while self.read_offset > 0 and self._decode(0, self.read_offset).endswith(REPLACEMENT):
            self.read_offset -= 1

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.tokens[start:end], self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Append one token; return the text that became final (often '', never a partial char)."""
        self.tokens.append(token_id)
        if token_id in self.hold_ids:  # inside a run of byte-fallback tokens
            return ""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset)
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return full_text[len(prefix_text):]

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes as U+FFFD); call once, last."""
        if self.read_offset == len(self.tokens):
            return ""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return full_text[len(prefix_text):]
