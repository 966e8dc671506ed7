"""The router's tokenizer: the `tokenizers` library on tokenizer.json, and the chat template.

transformers is not used here (it imports torch); the few things it would read for us, the special
tokens and the chat template, come straight from tokenizer_config.json and chat_template.jinja. The
template renders in a sandboxed, immutable Jinja environment set up like transformers' own, so the
same template gives the same text.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


_BYTE_DECODER: dict[str, int] = {}


class ChatTemplateError(ValueError):
    """The chat template refused the conversation (raise_exception) or failed to render."""


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (used to mark assistant turns) renders its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja's Extension API)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox that cannot reach Python internals."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


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

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        model_dir = Path(model_dir)
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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

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
                    **kwargs: Any) -> str:
        """The chat template's text for these messages (plain dicts with role and content).

        continue_final_message: end the text right after the last message's content (no end of
        turn), so the model continues it, as transformers' apply_chat_template does.
        template: a template source to use instead of the model's (still sandboxed)."""
        try:
            compiled = compile_chat_template(template) if template else self._template
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat_template does not compile: {e}") from e
        if compiled is None:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            text = compiled.render({
                "tools": None, "documents": None, **self.special_tokens, **kwargs,
                "messages": messages, "add_generation_prompt": add_generation_prompt,
            })
        except Exception as e:  # the template's own errors, and what it does with odd messages
            raise ChatTemplateError(f"chat template: {type(e).__name__}: {e}") from e
        return _cut_after_final(text, messages) if continue_final_message else text

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """Token ids of the rendered chat; the template writes its own BOS, so none is added."""
        text = self.render_chat(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


_BYTE_DECODER.update(_byte_decoder())
