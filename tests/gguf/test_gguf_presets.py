"""GGUF files written from the make-model presets (tests/gguf/hf_to_gguf.py, llama.cpp's layout)
served by pagedserve, and every weight type pagedserve loads dequantized as an independent decoder
does.

- Each architecture's tiny preset as a float32 GGUF: pagedserve's greedy tokens equal transformers'
  on the HF directory the file was written from, and the GGUF's tokenizer and chat template equal
  the directory's (tokenizer.json).
- Quantized files (Q4_0 with llama's permuted Q/K rows, Q5_1, Q8_0, F16): pagedserve equals
  transformers' own loading of the same file.
- Each weight type, block by block, against transformers' torch dequantizer (its own code, not
  the gguf package's) or, for the types that has none, numpy decoders written here from ggml's
  block layouts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from pagedserve import LLM, SamplingParams
from pagedserve.executor.gguf_loader import SUPPORTED_TYPES, open_gguf
from pagedserve.llm import load_tokenizer
from pagedserve.router.tokenizer import Tokenizer
from tests.conftest import ARCHS, model_dir
from tests.gguf.conftest import hf_greedy_batch
from tests.gguf.corpus import corpus
from tests.gguf.hf_to_gguf import convert
from tests.hf_reference import TOP, assert_greedy_matches, stdlib_prompts

LENGTHS = [1, 5, 17, 33, 64, 100, 230]  # 230 > mistral's 64-token window
N = 20
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, min_tokens=N, logprobs=TOP)


def _check(path: Path, refs) -> None:
    llm = LLM(path, dtype="float32", num_kv_blocks=256)
    outs = llm.generate([{"prompt_token_ids": r.prompt} for r in refs], GREEDY, use_tqdm=False)
    for out, ref in zip(outs, refs):
        assert_greedy_matches(out.outputs[0].token_ids, out.outputs[0].logprobs, ref)


def _hf_model(path: Path, **kw: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def _prompts(hf_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    return stdlib_prompts(AutoTokenizer.from_pretrained(hf_dir), LENGTHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_preset_gguf_matches_transformers_on_the_hf_dir(arch: str, tmp_path: Path) -> None:
    hf_dir = model_dir(arch)
    path = convert(hf_dir, tmp_path / f"{arch}-tiny.gguf")
    _check(path, hf_greedy_batch(_hf_model(hf_dir), _prompts(hf_dir), N))
    ours, theirs = Tokenizer.from_dir(path), Tokenizer.from_dir(hf_dir)
    for text in corpus(["<|begin_of_text|>", "<|eot_id|>"])[::4]:
        ids = theirs.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids, skip_special_tokens=False) == \
            theirs.decode(ids, skip_special_tokens=False)
    chat = [{"role": "user", "content": "hi"}]
    assert ours.render_chat(chat) == theirs.render_chat(chat)
    wrapped = load_tokenizer(str(path))  # the offline LLM's: BOS added as the file says
    assert wrapped("hello world").input_ids == theirs.encode("hello world")
    assert wrapped.decode(theirs.encode("hello world"), skip_special_tokens=True) == "hello world"


def _variant(hf_dir: Path, out: Path, **config: object) -> Path:
    """A copy of a preset directory with config.json values replaced (same weights)."""
    shutil.copytree(hf_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(config)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize(("arch", "qtype"), [("llama", QType.Q4_0), ("qwen2", QType.Q5_1),
                                             ("qwen2", QType.Q8_0), ("llama", QType.F16)],
                         ids=["llama-Q4_0", "qwen2-Q5_1", "qwen2-Q8_0", "llama-F16"])
def test_quantized_gguf_matches_transformers_on_the_same_file(arch: str, qtype: QType,
                                                              tmp_path: Path) -> None:
    hf_dir = model_dir(arch)
    if arch == "llama":  # transformers' GGUF loader does not read llama.cpp's rope_freqs
        hf_dir = _variant(hf_dir, tmp_path / "plain-rope",
                          rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
    path = convert(hf_dir, tmp_path / "model.gguf", qtype=qtype)
    _check(path, hf_greedy_batch(_hf_model(tmp_path, gguf_file=path.name), _prompts(hf_dir), N))


# --- each weight type against an independent decoder ---------------------------------------------

def _random_blocks(qtype: QType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid blocks: random bytes, with each float16 scale set to a small finite value."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if qtype in (QType.F32, QType.F16, QType.BF16, QType.Q4_0, QType.Q4_1, QType.Q5_0,
                 QType.Q5_1, QType.Q8_0):
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        return values if qtype == QType.F32 else gguf.quants.quantize(values, qtype)
    blocks = rng.integers(0, 256, (rows, cols // block_elems, block_bytes), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.1, (*blocks.shape[:2], 2)).astype(np.float16).view(np.uint8)
    # Where each K-quant keeps its float16 d (and dmin): Q4_K, Q5_K first; Q2_K last (d, dmin);
    # Q3_K, Q6_K last (d only).
    if qtype in (QType.Q4_K, QType.Q5_K):
        blocks[..., :4] = scales
    elif qtype == QType.Q2_K:
        blocks[..., -4:] = scales
    else:
        blocks[..., -2:] = scales[..., :2]
    return blocks.reshape(rows, -1)


def _q5_reference(raw: np.ndarray, with_min: bool) -> np.ndarray:
    """ggml's Q5_0 / Q5_1: d (f16)[, m (f16)], 32 high bits, 16 bytes of low nibbles."""
    blocks = raw.reshape(-1, 24 if with_min else 22)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32) if with_min else None
    rest = blocks[:, 4:] if with_min else blocks[:, 2:]
    high = rest[:, 0:4].copy().view(np.uint32)[:, 0]
    low = rest[:, 4:20]
    q = np.concatenate([low & 0x0F, low >> 4], axis=1).astype(np.int32)
    q |= (((high[:, None] >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int32)
    return d * q + m if with_min else d * (q - 16)


def _reference(qtype: QType, raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    if qtype == QType.F32:
        return raw
    if qtype == QType.F16:
        return raw.astype(np.float32)
    if qtype == QType.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if qtype in (QType.Q5_0, QType.Q5_1):
        return _q5_reference(raw, qtype == QType.Q5_1).reshape(rows, cols)
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    return dequant.dequantize(torch.from_numpy(raw.copy()), int(qtype)).reshape(rows, cols).numpy()


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_each_weight_type_dequantizes_as_an_independent_decoder(qtype: QType,
                                                                tmp_path: Path) -> None:
    from pagedserve.executor.gguf_loader import _dequantize

    rows, cols = 4, 512
    raw = _random_blocks(qtype, rows, cols, np.random.default_rng(int(qtype)))
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    writer.add_tensor("w", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = open_gguf(tmp_path / "t.gguf").tensors[0]
    ours = _dequantize(tensor, tmp_path / "t.gguf")
    expected = _reference(qtype, raw, rows, cols)
    assert ours.shape == (rows, cols)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
