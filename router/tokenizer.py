"""The router's tokenizer: the `tokenizers` library on tokenizer.json, and the chat template.

transformers is not used here (it imports torch); the few things it would read for us, the special
tokens and the chat template, come straight from tokenizer_config.json and chat_template.jinja. The
template renders in a sandboxed, immutable Jinja environment set up like transformers' own
(router/chat_template.py), so the same template gives the same text.

Encoding goes through `encode_batch_fast`, which releases the GIL while it works (`encode` holds
it) and keeps no per-token strings or offsets (freeing those, under the GIL, takes as long as
encoding), so a thread can tokenize while the event loop serves others.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from pagedserve.router.chat_template import (
    MAX_RENDER_CHARS,
    ChatTemplateError,
    compile_chat_template,
    render,
    render_isolated,
)
from pagedserve.router.gguf_tokenizer import find_gguf_file, load_gguf_tokenizer

__all__ = ["ChatTemplateError", "PromptTooLong", "Tokenizer", "compile_chat_template"]

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


_BYTE_DECODER: dict[str, int] = {}


class PromptTooLong(ValueError):
    """A text has more tokens than the caller can use; count says how many."""

    def __init__(self, count: int, max_tokens: int) -> None:
        super().__init__(f"the text has {count} tokens, more than {max_tokens}")
        self.count = count


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_chat_template(model_dir: Path, config: dict) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json's chat_template (str or named list)."""
    path = model_dir / "chat_template.jinja"
    if path.exists():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _cut_after_final(text: str, messages: list[dict]) -> str:
    final = messages[-1].get("content") if messages else None
    if not isinstance(final, str) or not final.strip():
        raise ChatTemplateError("continue_final_message needs a final message with text")
    for piece in (final, final.strip()):
        at = text.rfind(piece)
        if at >= 0:
            return text[:at + len(piece)]
    raise ChatTemplateError("continue_final_message: the template does not show the final "
                            "message's text")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character each byte is written as -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


# How many characters a normalizer may merge into one: none of these deletes text, and the
# composing ones (NFC, NFKC) merge at most 4 code points, Unicode's longest canonical decomposition.
_NORMALIZER_SHRINK = {"Prepend": 1, "NFD": 1, "NFKD": 1, "Lowercase": 1, "NFC": 4, "NFKC": 4}
_PRE_TOKENIZERS_KEEPING_TEXT = {"ByteLevel", "Metaspace", "Digits", "Punctuation",
                                "UnicodeScripts", "Split"}


def _shrink_factor(normalizer: dict | None) -> int | None:
    """The most characters the normalizer turns into one; None: it may delete text."""
    if normalizer is None:
        return 1
    kind = normalizer.get("type")
    if kind == "Sequence":
        factors = [_shrink_factor(n) for n in normalizer.get("normalizers") or ()]
        return None if None in factors else math.prod(factors)  # type: ignore[arg-type]
    if kind == "Replace":
        pattern = (normalizer.get("pattern") or {}).get("String")
        keeps = pattern is not None and len(normalizer.get("content") or "") >= len(pattern)
        return 1 if keeps else None
    return _NORMALIZER_SHRINK.get(kind)


def _keeps_text(pre: dict | None) -> bool:
    """Whether a pre-tokenizer passes every character on (Whitespace and co. drop spaces)."""
    if pre is None:
        return True
    if pre.get("type") == "Sequence":
        return all(_keeps_text(p) for p in pre.get("pretokenizers") or ())
    return pre.get("type") in _PRE_TOKENIZERS_KEEPING_TEXT and pre.get("behavior") != "Removed"


def max_chars_per_token(hf: HFTokenizer) -> int | None:
    """The most characters of input one token can stand for, or None when the tokenizer gives no
    such bound. A BPE token stands for at most its own string's characters (a byte-level
    token's string has one character per byte), unless unknown characters are fused into one
    token with no byte fallback; WordPiece, Unigram and WordLevel map whole words to one token."""
    spec = json.loads(hf.to_str())
    model = spec.get("model") or {}
    fuses_unknown = model.get("fuse_unk") and model.get("unk_token") is not None
    if model.get("type") != "BPE" or (fuses_unknown and not model.get("byte_fallback")):
        return None
    factor = _shrink_factor(spec.get("normalizer"))
    if factor is None or not _keeps_text(spec.get("pre_tokenizer")):
        return None
    return factor * max(len(token) for token in hf.get_vocab(with_added_tokens=True))


class Tokenizer:
    """Encode, decode and render chat prompts for one model directory."""

    def __init__(self, tokenizer: HFTokenizer, special_tokens: dict[str, str],
                 chat_template: str | None = None) -> None:
        self.hf = tokenizer
        self.special_tokens = special_tokens
        self.chat_template = chat_template
        self._template = compile_chat_template(chat_template) if chat_template else None
        self._byte_fallback_ids: frozenset[int] | None = None
        self._byte_level: bool | None = None
        self._specials: frozenset[int] | None = None
        # a text longer than max_model_len times this has more tokens than the context holds
        self.max_chars_per_token = max_chars_per_token(tokenizer)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        model_dir = Path(model_dir)
        if (gguf_file := find_gguf_file(model_dir)) is not None:  # llama.cpp's one-file format
            return cls(*load_gguf_tokenizer(gguf_file))
        hf = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        special = {key: text for key in SPECIAL_TOKEN_KEYS
                   if (text := _token_text(config.get(key))) is not None}
        return cls(hf, special, _read_chat_template(model_dir, config))

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of the <0xNN> tokens when the decoder uses ByteFallback, else empty.

        ByteFallback decodes a run of byte tokens as one unit (all U+FFFD when the run is not
        valid UTF-8), so the incremental detokenizer waits for a run to end.
        """
        if self._byte_fallback_ids is None:
            decoder = self.hf.decoder
            state = decoder.__getstate__() if decoder is not None else b""
            uses = b"ByteFallback" in (state if isinstance(state, bytes) else b"")
            self._byte_fallback_ids = frozenset(
                i for t, i in self.hf.get_vocab(with_added_tokens=False).items()
                if _BYTE_TOKEN.match(t)) if uses else frozenset()
        return self._byte_fallback_ids

    def encode(self, text: str, add_special_tokens: bool = True,
               max_tokens: int | None = None) -> list[int]:
        """Token ids of text; releases the GIL while it tokenizes. PromptTooLong when there are
        more than max_tokens, before a list of them is built."""
        encoding = self.hf.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0]
        if max_tokens is not None and len(encoding) > max_tokens:
            raise PromptTooLong(len(encoding), max_tokens)
        return encoding.ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def token_text(self, token_id: int) -> str:
        """One token's text as a logprobs entry shows it (special tokens included)."""
        return self.hf.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> list[int]:
        """One token's UTF-8 bytes, exact even for a token that holds part of a character."""
        raw = self.hf.id_to_token(token_id) or ""
        if token_id in self.byte_fallback_ids:
            return [int(raw[3:5], 16)]
        if self._byte_level is None:
            state = self.hf.decoder.__getstate__() if self.hf.decoder is not None else b""
            self._byte_level = b"ByteLevel" in (state if isinstance(state, bytes) else b"")
        if self._byte_level and token_id not in self._special_ids():
            decoder = _BYTE_DECODER
            if all(c in decoder for c in raw):
                return [decoder[c] for c in raw]
        return list(self.token_text(token_id).encode("utf-8"))

    def _special_ids(self) -> frozenset[int]:
        if self._specials is None:
            self._specials = frozenset(
                i for i, tok in self.hf.get_added_tokens_decoder().items() if tok.special)
        return self._specials

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, template: str | None = None,
                    template_kwargs: dict[str, Any] | None = None,
                    max_chars: int = MAX_RENDER_CHARS) -> str:
        """The chat template's text for these messages (plain dicts with role and content).

        continue_final_message: end the text right after the last message's content (no end of
        turn), so the model continues it, as transformers' apply_chat_template does.
        template: a request's own template source, used instead of the model's; it renders in a
        worker process, bounded in time, memory and length (max_chars characters).
        template_kwargs: extra variables for the template (chat_template_kwargs)."""
        if not template and self._template is None:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {"tools": None, "documents": None, **self.special_tokens,
                   **(template_kwargs or {}), "messages": messages,
                   "add_generation_prompt": add_generation_prompt}
        if template:
            text = render_isolated(template, context, max_chars)
        else:
            text = render(self._template, context)  # type: ignore[arg-type]
        return _cut_after_final(text, messages) if continue_final_message else text

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat; the template writes its own BOS, so none is added."""
        text = self.render_chat(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


_BYTE_DECODER.update(_byte_decoder())
