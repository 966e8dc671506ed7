"""The tokenizer a GGUF file describes, built as a `tokenizers.Tokenizer` from its metadata.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types, special ids
and the chat template under `tokenizer.*` keys, and names the pre-tokenizer (how text is split
before BPE) by a short string, `tokenizer.ggml.pre`, whose regexes live in llama.cpp's C++. Two
vocabularies cover the architectures we run:

    tokenizer.ggml.model  "gpt2"   byte-level BPE (Llama 3, Qwen, SmolLM, ...): the split below
                          "llama"  SentencePiece BPE (Llama 2, Mistral): '▁' for spaces, byte
                                   fallback, merges from the file or rebuilt from token scores

The result equals transformers' GGUF tokenizer (tests/gguf), except where transformers' split
differs from llama.cpp's, which wrote the file: for "smollm" (and the StarCoder family) llama.cpp
first splits every digit off alone, as the model's own tokenizer.json does, and so do we.
The metadata is read with the `gguf` package (numpy only, no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # llama.cpp's token types

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2, _DIGITS_THEN_GPT2 = "gpt2", "digits"  # ByteLevel's own (GPT-2) regex; digits split first

# tokenizer.ggml.pre -> the split llama.cpp applies (llama-vocab.cpp's regex_exprs per type).
PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt2", "mpt", "olmo", "jais"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva"), _DIGITS_THEN_GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "dbrx", "smaug-bpe", "falcon3"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"), _QWEN2),
    "tekken": _TEKKEN,
    "gpt-4o": _GPT4O,
}
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def read_gguf_metadata(path: str | Path) -> gguf.GGUFReader:
    """The file's reader (metadata; tensors stay on disk), or one ValueError naming the file.
    The executor checks the same (executor/gguf_loader.py): the import rules keep them apart."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(8)
    if head[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    version = int.from_bytes(head[4:8], "little")
    if version not in gguf.gguf_reader.READER_SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on a damaged file
        raise ValueError(f"{path}: {_read_error(e)}") from None


def _read_error(e: Exception) -> str:
    if "GGMLQuantizationType" in str(e):  # a type id this gguf version does not know
        return f"unknown tensor type ({e})"
    return f"truncated or corrupt GGUF file ({type(e).__name__}: {e})"


def load_gguf_tokenizer(path: str | Path) -> tuple[HFTokenizer, dict[str, str], str | None]:
    """(tokenizer, special tokens by role, chat template) from a GGUF file's metadata."""
    path = Path(path)
    meta = _Metadata(read_gguf_metadata(path), path)
    kind = meta.get("tokenizer.ggml.model")
    tokens = list(meta.get("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
    if kind == "gpt2":
        tok = _byte_level_bpe(meta, tokens)
        add_bos_default = False
    elif kind == "llama":
        tok = _sentencepiece_bpe(meta, tokens)
        add_bos_default = True  # llama.cpp's default for a SentencePiece vocabulary
    else:
        raise ValueError(f"{path}: unsupported tokenizer.ggml.model {kind!r}; "
                         "supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE)")
    _add_special_tokens(tok, tokens, types, byte_level=kind == "gpt2")
    special = {role: tokens[int(i)] for role, key in _SPECIAL_IDS.items()
               if (i := meta.get(f"tokenizer.ggml.{key}", None)) is not None and
               0 <= int(i) < len(tokens)}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tok.post_processor = _post_processor(tok, special, add_bos, add_eos)
    return tok, special, meta.get("tokenizer.chat_template", None)


class _Metadata:
    """Metadata values by key; a missing required key is a ValueError naming file and key."""

    def __init__(self, reader: gguf.GGUFReader, path: Path) -> None:
        self.reader, self.path = reader, path

    def get(self, key: str, default: Any = ...) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            if default is ...:
                raise ValueError(f"{self.path}: required metadata key {key!r} is missing")
            return default
        return field.contents()


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the printable character each byte is written as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


_ALPHABET = _byte_alphabet()
_ALPHABET_CHARS = frozenset(_ALPHABET.values())


def _byte_level_bpe(meta: _Metadata, tokens: list[str]) -> HFTokenizer:
    # A token written in plain text (an added one such as "<think>" with a space) is respelled in
    # the byte alphabet, as the merges spell it.
    vocab = {t if set(t) <= _ALPHABET_CHARS else "".join(_ALPHABET[b] for b in t.encode()): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                 continuing_subword_prefix="", end_of_word_suffix="",
                                 fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(meta)
    tok.decoder = decoders.ByteLevel()
    return tok


def _pre_tokenizer(meta: _Metadata) -> pre_tokenizers.PreTokenizer:
    name = str(meta.get("tokenizer.ggml.pre", "default"))
    split = PRE_TOKENIZERS.get(name)
    if split is None:
        raise ValueError(f"{meta.path}: unsupported pre-tokenizer tokenizer.ggml.pre={name!r}; "
                         f"supported: {sorted(PRE_TOKENIZERS)}")
    if split == _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                 use_regex=True)])
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _sentencepiece_bpe(meta: _Metadata, tokens: list[str]) -> HFTokenizer:
    """Llama 2 style: '▁' marks spaces (one prepended to the text), unknown bytes as <0xNN>."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges_field = meta.get("tokenizer.ggml.merges", None)
    if merges_field is not None:
        merges = [tuple(m.split(" ", 1)) for m in merges_field]
    else:
        merges = merges_from_scores(vocab, list(meta.get("tokenizer.ggml.scores")))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                                 dropout=None))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def merges_from_scores(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    best-scored merged token first (ties: shorter left part first), as transformers rebuilds them."""
    found = []
    for token, score in zip(vocab, scores):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found += [(left, right, score) for left, right in pairs]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _add_special_tokens(tok: HFTokenizer, tokens: list[str], types: list[int],
                        byte_level: bool) -> None:
    """Control tokens (<|im_start|>, ...) match whole and are special; user-defined ones match
    whole but are text. In a byte-level vocabulary a control token spelled outside the byte
    alphabet is a mislabelled one, which llama.cpp's converter can write: skipped."""
    control = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, types)
               if kind == CONTROL and (not byte_level or set(t) <= _ALPHABET_CHARS)]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab()
    user = [AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)


def _post_processor(tok: HFTokenizer, special: dict[str, str], add_bos: bool,
                    add_eos: bool) -> processors.TemplateProcessing:
    """BOS and/or EOS around an encoded text, as the file's add_bos/add_eos flags say."""
    bos = special.get("bos_token") if add_bos else None
    eos = special.get("eos_token") if add_eos else None
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1",
                     *([f"{eos}:1"] if eos else [])])
    specials = [(t, tok.token_to_id(t)) for t in (bos, eos) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def find_gguf_file(path: str | Path) -> Path | None:
    """The GGUF file a model path names: the path itself when it is a file, or the one .gguf in a
    directory without tokenizer.json; None otherwise (an HF-format directory)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir() or (path / "tokenizer.json").exists():
        return None
    files = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(files) > 1:
        raise ValueError(f"{path}: holds {len(files)} GGUF files; name one of them")
    return files[0] if files else None
