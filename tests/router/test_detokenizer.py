"""Incremental detokenization equals decoding the whole sequence, and never splits a character."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers

from pagedserve.router.detokenizer import REPLACEMENT, IncrementalDetokenizer
from pagedserve.router.tokenizer import Tokenizer

TEXTS = ["héllo wörld 😀 世界 ✓", "def f(x):\n    return x ** 2  # ½ → ∞", "naïve café, Ελληνικά"]


def byte_fallback_tokenizer() -> Tokenizer:
    """A SentencePiece-style (Llama-2) tokenizer: Metaspace pieces, byte fallback, Strip decoder."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    merges = [("▁", "h"), ("▁h", "e"), ("l", "l"), ("ll", "o"), ("▁he", "llo"), ("▁", "w"),
              ("o", "r"), ("▁w", "or"), ("é", "t")]
    for piece in ["▁", "a", "b", "c", "d", "e", "h", "l", "o", "r", "w", "é", "世", "t",
                  *("".join(m) for m in merges)]:
        vocab.setdefault(piece, len(vocab))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                          normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(hf, {"bos_token": "<s>", "eos_token": "</s>"})


@pytest.fixture(scope="module", params=["byte_level", "byte_fallback"])
def tok(request, tokenizer: Tokenizer) -> Tokenizer:
    return tokenizer if request.param == "byte_level" else byte_fallback_tokenizer()


def _sequences(tok: Tokenizer, rng: random.Random, count: int) -> list[list[int]]:
    """Random ids, and random slices of real text's encodings (split multi-byte characters)."""
    encoded = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    out = []
    for _ in range(count):
        if rng.random() < 0.5:
            out.append([rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 25))])
        else:
            ids = rng.choice(encoded)
            a = rng.randrange(len(ids))
            out.append(ids[a:rng.randrange(a + 1, len(ids) + 1)])
    return out


def _stream(tok: Tokenizer, ids: list[int], context: list[int] = (), skip: bool = True
            ) -> list[str]:
    detok = IncrementalDetokenizer(tok, context, skip_special_tokens=skip)
    return [detok.push(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("skip", [True, False])
def test_deltas_add_up_to_whole_decode(tok: Tokenizer, skip: bool) -> None:
    rng = random.Random(1234)
    for ids in _sequences(tok, rng, 400):
        assert "".join(_stream(tok, ids, skip=skip)) == tok.decode(ids, skip), ids


def test_deltas_with_prompt_context_continue_its_text(tok: Tokenizer) -> None:
    rng = random.Random(99)
    seqs = _sequences(tok, rng, 400)
    for ctx, ids in zip(seqs[::2], seqs[1::2]):
        before = tok.decode(ctx)
        if before.endswith(REPLACEMENT) or {ctx[-1], ids[0]} <= tok.byte_fallback_ids:
            continue  # a character (or byte run) split between prompt and output
        expected = tok.decode(ctx + ids)[len(before):]
        assert "".join(_stream(tok, ids, ctx)) == expected, (ctx, ids)


def test_never_emits_part_of_a_character(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        deltas = _stream(tok, ids)
        assert not any(REPLACEMENT in d for d in deltas), deltas
        assert "".join(deltas) == tok.decode(ids) == text
    # "😀" spans several tokens in both tokenizers: some pushes must have held text back.
    assert "" in _stream(tok, tok.encode("😀", add_special_tokens=False))[:-1]


def test_sentencepiece_leading_space_follows_context() -> None:
    tok = byte_fallback_tokenizer()
    ids = tok.encode("hello world", add_special_tokens=False)
    assert tok.decode(ids[1:]) == "world"  # decoded alone, the leading space is stripped
    assert "".join(_stream(tok, ids[1:], ids[:1])) == " world"


# ---- found by mutation testing (make mutation; docs/testing.md) -----------------------------------


def _byte(tok: Tokenizer, b: int) -> int:
    return tok.hf.token_to_id(f"<0x{b:02X}>")


def test_each_token_that_ends_a_character_is_emitted_at_once(tok: Tokenizer) -> None:
    """Text is final as soon as its token ends a character: ASCII comes out token by token, each
    delta what decoding one more token adds."""
    ids = tok.encode("hello world hello", add_special_tokens=False)
    assert len(ids) >= 3
    deltas = _stream(tok, ids)
    assert deltas[-1] == ""  # nothing held back for flush
    for i, delta in enumerate(deltas[:-1]):
        assert delta == tok.decode(ids[: i + 1])[len(tok.decode(ids[:i])):] != "", (i, deltas)


@pytest.mark.parametrize("context", ["", "a", "ab", "abc"])
def test_a_character_split_between_prompt_and_output(context: str) -> None:
    """The prompt ends with the first byte of "€" (E2 82 AC): it is read again with the output's
    two bytes, and the whole characters before it are not emitted again."""
    tok = byte_fallback_tokenizer()
    ctx = tok.encode(context, add_special_tokens=False) if context else []
    e2, b82, bac = (_byte(tok, b) for b in (0xE2, 0x82, 0xAC))
    assert "".join(_stream(tok, [b82, bac], [*ctx, e2])) == "€"
    # Two of its bytes in the prompt, one in the output.
    assert "".join(_stream(tok, [bac], [*ctx, e2, b82])) == "€"


def test_special_tokens_are_skipped_by_default_and_keep_the_space_after_them() -> None:
    tok = byte_fallback_tokenizer()
    hello, world = (tok.encode(w, add_special_tokens=False) for w in ("hello", "world"))
    eos = tok.eos_token_id
    detok = IncrementalDetokenizer(tok)  # skip_special_tokens defaults to True
    deltas = [detok.push(i) for i in [*hello, eos, *world]] + [detok.flush()]
    # A skipped token decodes to nothing: the window must not restart at it, or SentencePiece's
    # Strip would drop the space before "world".
    assert "".join(deltas) == "hello world"
    assert "".join(_stream(tok, [*hello, eos, *world], skip=False)) == "hello</s> world"
