"""The tokenizer built from GGUF metadata (router/gguf_tokenizer.py) against transformers' GGUF
tokenizer (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), on a corpus of more than 1,000
strings (tests/gguf/corpus.py): ids with and without special tokens, and decoding with and without
them. Two vocabularies: SmolLM2's byte-level BPE (real_model) and a SentencePiece-style BPE written
here (Llama 2 / Mistral layout: '▁', byte fallback, merges rebuilt from scores).

One known difference, by design: for `tokenizer.ggml.pre = "smollm"` llama.cpp (which wrote the
file) and the model's own tokenizer.json split every digit off alone before BPE; transformers'
GGUF tokenizer does not, so it cuts the whitespace before a number differently ("\n   90" ->
"\n  ", " ", "9", "0" instead of "\n   ", "9", "0") and lets a space merge into a non-ASCII
numeral's first byte. Where the two differ the string must hold a numeric character, and ours
must equal transformers' tokenizer with llama.cpp's split put in.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from pagedserve.router.tokenizer import Tokenizer
from tests.gguf.corpus import corpus, stdlib_snippets

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2 + 2?"}],
    [{"role": "user", "content": "日本語で答えて <|im_end|> please"}],
]


def _hf_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _compare(ours: Tokenizer, theirs, texts: list[str]) -> list[str]:
    """Asserts decode equality everywhere; returns the texts whose ids differ."""
    differ = []
    for text in texts:
        for special in (True, False):
            ids = theirs(text, add_special_tokens=special).input_ids
            if ours.encode(text, add_special_tokens=special) != ids:
                differ.append(text)
                continue
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == \
                    theirs.decode(ids, skip_special_tokens=skip), (text, skip)
    return differ


@pytest.fixture(scope="module")
def smollm2_pair(smollm2: Path):
    return Tokenizer.from_dir(smollm2), _hf_gguf_tokenizer(smollm2)


@pytest.mark.real_model
def test_smollm2_corpus(smollm2_pair) -> None:
    ours, theirs = smollm2_pair
    texts = corpus(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>"])
    assert len(texts) >= 1000
    differ = _compare(ours, theirs, texts)
    llama_cpp_split = RawTokenizer.from_str(theirs.backend_tokenizer.to_str())
    llama_cpp_split.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in differ:
        assert any(c.isnumeric() for c in text), text
        assert ours.encode(text) == llama_cpp_split.encode(text).ids, text
    assert differ, "llama.cpp's digit split is not in effect"
    assert [ours.id_to_token(i) for i in ours.encode("x\n   90")] == ["x", "ĊĠĠĠ", "9", "0"]
    print(f"{len(differ)} of {len(texts)} strings tokenize differently (digit split)")


@pytest.mark.real_model
def test_smollm2_chat_template_and_specials(smollm2_pair) -> None:
    ours, theirs = smollm2_pair
    for messages in CHATS:
        text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.render_chat(messages) == text
        assert ours.encode_chat(messages) == theirs(text, add_special_tokens=False).input_ids
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert ours.eos_token_id == theirs.eos_token_id == 2


@pytest.mark.real_model
def test_llm_tokenizer_is_the_routers(smollm2: Path, smollm2_pair) -> None:
    from pagedserve.llm import load_tokenizer

    ours, _ = smollm2_pair
    wrapped = load_tokenizer(str(smollm2))
    for text in corpus(["<|im_start|>", "<|im_end|>"], seed=1)[::5]:
        ids = ours.encode(text)
        assert wrapped(text).input_ids == ids
        assert wrapped.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    for messages in CHATS:
        assert wrapped.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
            == ours.render_chat(messages)


def _write_sentencepiece_gguf(path: Path, merges: bool) -> Path:
    """A Llama-2-layout vocabulary: <unk> <s> </s>, 256 byte tokens, then BPE pieces with '▁'
    for spaces, scored by merge rank (llama.cpp's SentencePiece BPE merges best score first)."""
    import random

    trained = RawTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.decoder = decoders.Metaspace()
    trained.train_from_iterator(stdlib_snippets(3000, random.Random(1)), trainers.BpeTrainer(
        vocab_size=1500, show_progress=False, special_tokens=["<unk>", "<s>", "</s>"]))
    learned = sorted(trained.get_vocab().items(), key=lambda kv: kv[1])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    pieces = [t for t, _ in learned if t not in ("<unk>", "<s>", "</s>")]
    tokens = ["<unk>", "<s>", "</s>", *byte_tokens, *pieces]
    w = gguf.GGUFWriter(path, "llama")
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 64),
                       (w.add_embedding_length, 8), (w.add_feed_forward_length, 8),
                       (w.add_head_count, 1)):
        add(value)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_token_types([2, 3, 3, *[6] * 256, *[1] * len(pieces)])
    if merges:
        spec = trained.to_str()
        import json

        w.add_token_merges([" ".join(m) for m in json.loads(spec)["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("merges", [False, True], ids=["merges-from-scores", "merges-in-file"])
def test_sentencepiece_corpus(tmp_path: Path, merges: bool) -> None:
    path = _write_sentencepiece_gguf(tmp_path / "spm.gguf", merges)
    ours, theirs = Tokenizer.from_dir(path), _hf_gguf_tokenizer(path)
    texts = corpus(["<s>", "</s>"])
    assert _compare(ours, theirs, texts) == []
    assert ours.encode("hello")[0] == 1  # a SentencePiece vocabulary adds BOS by default
