"""A small HF-directory -> GGUF converter for tests, written after llama.cpp's convert_hf_to_gguf.py
for the four architectures pagedserve runs (it is not on PyPI by itself).

What it reproduces of llama.cpp's layout: tensor names; Q/K rows permuted for the "llama" arch
(Mistral is written as "llama" plus a sliding window); Llama 3.1 rope scaling as a rope_freqs
tensor; tied embeddings as a missing output.weight; the byte-level BPE tokenizer as metadata.
Weights are written in float32 unless `qtype` names a quantized type for the 2-D weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from safetensors.numpy import load_file

ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
        "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                "lm_head": "output"}


def convert(hf_dir: Path, out: Path, qtype: QType = QType.F32, name: str = "test") -> Path:
    """Write hf_dir's model as one GGUF file at `out`."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = ARCH[cfg["architectures"][0]]
    writer = gguf.GGUFWriter(out, arch)
    writer.add_name(name)
    _hyperparameters(writer, cfg)
    _tokenizer(writer, hf_dir)
    for tensor_name, data, kind in _tensors(hf_dir, cfg, arch, qtype):
        writer.add_tensor(tensor_name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _hyperparameters(w: gguf.GGUFWriter, cfg: dict) -> None:
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    rope = cfg.get("rope_parameters") or {}
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    if cfg["architectures"][0] == "MistralForCausalLM" and cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])


def _tokenizer(w: gguf.GGUFWriter, hf_dir: Path) -> None:
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    vocab = dict(spec["model"]["vocab"])
    special = {t["content"]: t["id"] for t in spec["added_tokens"] if t["special"]}
    vocab.update(special)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == max(vocab.values()) + 1, "token ids must be dense"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")  # make-model trains ByteLevel with GPT-2's split
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
                       for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m
                        for m in spec["model"]["merges"]])
    ids = {key: vocab[tok_cfg[key]] for key in ("bos_token", "eos_token", "pad_token")
           if tok_cfg.get(key)}
    w.add_bos_token_id(ids["bos_token"])
    w.add_eos_token_id(ids["eos_token"])
    if "<|eot_id|>" in vocab:
        w.add_eot_token_id(vocab["<|eot_id|>"])
    if "pad_token" in ids:
        w.add_pad_token_id(ids["pad_token"])
    w.add_add_bos_token(spec.get("post_processor") is not None)  # make-model's adds BOS
    w.add_chat_template((hf_dir / "chat_template.jinja").read_text())


def _tensors(hf_dir: Path, cfg: dict, arch: str, qtype: QType):
    """(GGUF name, data, type) for every weight, in a fixed order."""
    weights = load_file(hf_dir / "model.safetensors")
    if cfg.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type") == "llama3":
        yield "rope_freqs.weight", _llama3_factors(cfg, rope), QType.F32
    for hf_name in sorted(weights):
        data = weights[hf_name].astype(np.float32)
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = cfg["num_attention_heads"] if ".q_proj." in hf_name \
                else cfg["num_key_value_heads"]
            data = _permute(data, heads)
        kind = qtype if data.ndim == 2 else QType.F32  # norms stay float32, as llama.cpp's
        yield _gguf_name(hf_name), _encode(data, kind), kind


def _gguf_name(hf_name: str) -> str:
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{suffix}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}.{suffix}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation: per head, HF rows (i, i + d/2) become rows (2i, 2i + 1)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]) \
        .swapaxes(1, 2).reshape(w.shape)


def _encode(data: np.ndarray, kind: QType) -> np.ndarray:
    if kind == QType.F32:
        return data
    if kind == QType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, kind)


def _llama3_factors(cfg: dict, rope: dict) -> np.ndarray:
    """llama.cpp's per-frequency divisors for Llama 3.1 scaling (its generate_extra_tensors)."""
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)
