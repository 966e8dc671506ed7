"""The router's tokenizer agrees with transformers (used here only, never in router/)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pagedserve.router.tokenizer import ChatTemplateError, Tokenizer, compile_chat_template

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "def f(x): return x  # é 世界"},
     {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "again?\n\n"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(llama_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(llama_dir))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_matches_transformers(tokenizer: Tokenizer, hf_tokenizer, conversation,
                                            add_generation_prompt: bool) -> None:
    text = hf_tokenizer.apply_chat_template(conversation, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)
    assert tokenizer.render_chat(conversation, add_generation_prompt) == text
    ids = hf_tokenizer.apply_chat_template(conversation, tokenize=True,
                                           add_generation_prompt=add_generation_prompt)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tokenizer.encode_chat(conversation, add_generation_prompt) == list(ids)


def test_encode_decode_match_transformers(tokenizer: Tokenizer, hf_tokenizer) -> None:
    for text in ["hello world", "  import os\n\tx = 1 ½", ""]:
        assert tokenizer.encode(text) == hf_tokenizer(text)["input_ids"]
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
        assert tokenizer.decode(ids, False) == hf_tokenizer.decode(ids)


def test_special_tokens_from_config(tokenizer: Tokenizer) -> None:
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.eos_token == "<|end_of_text|>"
    assert tokenizer.eos_token_id == 1
    assert tokenizer.byte_fallback_ids == frozenset()


def test_template_from_tokenizer_config_when_no_jinja_file(llama_dir: Path, tmp_path: Path,
                                                          tokenizer: Tokenizer) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_dir / name, tmp_path / name)
    other = Tokenizer.from_dir(tmp_path)
    assert other.chat_template == tokenizer.chat_template
    assert other.render_chat(CONVERSATIONS[0]) == tokenizer.render_chat(CONVERSATIONS[0])


def test_template_is_sandboxed_and_can_raise(tokenizer: Tokenizer) -> None:
    escape = Tokenizer(tokenizer.hf, {}, "{{ messages.__class__.__mro__ }}{{ ''.__class__ }}")
    with pytest.raises(ChatTemplateError):
        escape.render_chat(CONVERSATIONS[0])
    strict = Tokenizer(tokenizer.hf, {}, "{% if messages[0]['role'] != 'system' %}"
                                          "{{ raise_exception('system first') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="system first"):
        strict.render_chat(CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError):  # immutable: no mutating calls on inputs
        Tokenizer(tokenizer.hf, {}, "{{ messages.append(1) }}").render_chat(CONVERSATIONS[0])


def test_template_tojson_and_generation_tag() -> None:
    template = compile_chat_template(
        "{% generation %}{{ x | tojson }}{% endgeneration %}{{ strftime_now('%Y') | length }}")
    assert template.render(x={"é": "<b>"}) == '{"é": "<b>"}4'
