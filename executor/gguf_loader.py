"""Loading a GGUF file (llama.cpp's one-file format): the model's facts from its metadata, its
weights dequantized at load into the model's dtype with the `gguf` package (llama.cpp's reader).

A GGUF names tensors its own way and stores llama's Q and K rows permuted for llama.cpp's rotary
(pairs (i, i + d/2) of a head interleaved as rows 2i, 2i + 1). Both are mapped back to the HF
layout here, so the model's own `load_weights` takes them like a safetensors checkpoint:

    token_embd.weight            model.embed_tokens.weight
    output_norm.weight           model.norm.weight
    output.weight                lm_head.weight              (absent: tied to the embedding)
    blk.N.attn_q.weight          model.layers.N.self_attn.q_proj.weight   (llama: un-permuted)
    blk.N.ffn_gate.weight        model.layers.N.mlp.gate_proj.weight      ... (see _LAYER_TENSORS)
    rope_freqs.weight            per-frequency divisors of the rotary (Llama 3.1 scaling)

Linear weights of a Q type the kernels run (gguf_quant.py: Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q5_K, Q6_K)
are yielded as a QuantizedWeight with the same values, which the layers keep quantized
(layers/quant_weights.py): the projections, the LM head, and the token embedding (dequantized for
its gather there, and kept quantized for an LM head tied to it). Norms, F32/F16/BF16 tensors and
the other Q types become dense float32, as does everything when the checkpoint is opened with
quantized=False (today's `dequantize at load`, kept for comparisons).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from pagedserve.executor.gguf_quant import CONVERTERS, common_form, gguf_quantized, widen
from pagedserve.executor.model_config import ModelConfig
from pagedserve.kernels.quantized import QuantizedWeight

# Which of the file's architectures we run, as the HF class that describes the same model. llama.cpp
# writes Mistral (7B and kin) as "llama"; a sliding window in the metadata makes it Mistral here.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_TYPES = (QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1,
                   QType.Q5_0, QType.Q5_1, QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K,
                   QType.Q6_K)
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                   "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# The tensors that may load quantized (linear layers), and those fused into one layer, which
# pack as one weight: all of a fused set load quantized in one form, or all dense.
_LINEAR = {"token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
           "ffn_up", "ffn_down"}
_FUSED = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))
_ROPE_FREQS = "rope_freqs.weight"
_HEADER_BYTES = 24  # magic, version, tensor count, metadata count


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file a model path names: the path itself, or the one .gguf in a directory that has
    no config.json; None for an HF-format directory (or a path that does not exist)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" or _has_gguf_magic(path) else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise ValueError(f"{path}: holds {len(files)} GGUF files ({names}); name one of them")
    return files[0] if files else None


def _has_gguf_magic(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """The file's reader; a file that is not a whole GGUF gets one ValueError naming it."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
    if size < _HEADER_BYTES:
        raise ValueError(f"{path}: truncated: {size} bytes is too short for a GGUF header")
    if head[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    version = int.from_bytes(head[4:8], "little")
    if version not in gguf.gguf_reader.READER_SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on a damaged file; name it once
        raise ValueError(f"{path}: {_describe_read_error(e)}") from None
    _check_tensor_extents(reader, path, size)
    return reader


def _describe_read_error(e: Exception) -> str:
    text = str(e)
    if "GGMLQuantizationType" in text:  # an enum value this gguf version does not know
        return f"unknown tensor type ({text})"
    if "GGUFValueType" in text:
        return f"unknown metadata value type ({text})"
    return f"truncated or corrupt GGUF file ({type(e).__name__}: {text})"


def _check_tensor_extents(reader: gguf.GGUFReader, path: Path, size: int) -> None:
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ValueError(f"{path}: truncated: tensor {t.name!r} ends at byte {end}, "
                             f"the file has {size}")


class GGUFCheckpoint:
    """One GGUF file: its ModelConfig, and its weights under HF names (iterate it)."""

    def __init__(self, path: str | Path, quantized: bool = True) -> None:
        self.path = Path(path)
        self.quantized = quantized  # False: every weight dense float32 (dequantized at load)
        self.reader = open_gguf(self.path)
        self.arch = str(self._field("general.architecture"))
        self.config = self._model_config()
        self.current: Path | None = None  # the file, while its weights are being read

    def _field(self, key: str, default: Any = ...) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            if default is ...:
                raise ValueError(f"{self.path}: required metadata key {key!r} is missing")
            return default
        return field.contents()

    def _arch_field(self, key: str, default: Any = ...) -> Any:
        return self._field(f"{self.arch}.{key}", default)

    def _model_config(self) -> ModelConfig:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"{self.path}: unsupported architecture {self.arch!r}; "
                             f"supported: {sorted(ARCHITECTURES)}")
        raw = self.hf_config()
        try:
            return ModelConfig.from_dict(raw)
        except ValueError as e:
            raise ValueError(f"{self.path}: {e}") from None

    def hf_config(self) -> dict[str, Any]:
        """The metadata as the config.json of the same model would say it."""
        heads = _uniform(self._arch_field("attention.head_count"), "attention.head_count", self)
        kv_heads = _uniform(self._arch_field("attention.head_count_kv", heads),
                            "attention.head_count_kv", self)
        hidden = int(self._arch_field("embedding_length"))
        head_dim = int(self._arch_field("attention.key_length", hidden // heads))
        rotary = int(self._arch_field("rope.dimension_count", head_dim))
        if rotary != head_dim:
            raise ValueError(f"{self.path}: partial rotary ({rotary} of {head_dim} dimensions) "
                             "is not supported")
        window = int(self._arch_field("attention.sliding_window", 0))
        arch = "MistralForCausalLM" if self.arch == "llama" and window else ARCHITECTURES[self.arch]
        names = {t.name for t in self.reader.tensors}
        return {
            "architectures": [arch], "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "num_hidden_layers": int(self._arch_field("block_count")),
            "intermediate_size": int(self._arch_field("feed_forward_length")),
            "vocab_size": self._vocab_size(),
            "max_position_embeddings": int(self._arch_field("context_length")),
            "rms_norm_eps": float(self._arch_field("attention.layer_norm_rms_epsilon")),
            "rope_parameters": self._rope(), "sliding_window": window or None,
            "tie_word_embeddings": "output.weight" not in names,
            "attention_bias": "blk.0.attn_q.bias" in names,
            "torch_dtype": self._dtype_name(),
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": self._eos_ids(),
        }

    def _vocab_size(self) -> int:
        embed = next((t for t in self.reader.tensors if t.name == "token_embd.weight"), None)
        if embed is None:
            raise ValueError(f"{self.path}: missing tensor 'token_embd.weight'")
        return int(embed.shape[1])  # GGUF shapes list the row length first

    def _rope(self) -> dict[str, Any]:
        """rope_parameters: theta, and a scaling llama.cpp states by metadata or by rope_freqs."""
        theta = float(self._arch_field("rope.freq_base", 10000.0))
        kind = str(self._arch_field("rope.scaling.type", "none"))
        factor = float(self._arch_field("rope.scaling.factor", 0.0) or
                       self._arch_field("rope.scale_linear", 0.0) or 1.0)
        freqs = next((t for t in self.reader.tensors if t.name == _ROPE_FREQS), None)
        if freqs is not None:
            factors = _dequantize(freqs, self.path).reshape(-1)
            return {"rope_theta": theta, "rope_type": "freq_factors",
                    "factors": tuple(float(x) for x in factors)}
        if kind == "none" or (kind == "linear" and factor == 1.0):
            return {"rope_theta": theta, "rope_type": "default"}
        original = self._arch_field("rope.scaling.original_context_length", None)
        extra = {} if original is None else {"original_max_position_embeddings": int(original)}
        return {"rope_theta": theta, "rope_type": kind, "factor": factor, **extra}

    def _dtype_name(self) -> str:
        """The dtype the weights have in the file: float32 or float16 when they are all that, else
        bfloat16 (a quantized file's values come from float16 scales times small integers)."""
        kinds = {t.tensor_type for t in self.reader.tensors if len(t.shape) > 1}
        if kinds <= {QType.F32}:
            return "float32"
        return "float16" if kinds <= {QType.F16, QType.F32} else "bfloat16"

    def _eos_ids(self) -> list[int]:
        """EOS and, when the file names one, the end-of-turn token: llama.cpp stops on both."""
        ids = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
            value = self._field(key, None)
            if value is not None and int(value) not in ids:
                ids.append(int(value))
        return ids

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        """(HF name, dense float32 tensor or QuantizedWeight) for every weight of the file."""
        self.current = self.path
        forms = self.quantized_forms()
        for tensor in self.reader.tensors:
            if tensor.name == _ROPE_FREQS:
                continue  # part of the config (the rotary table), not a parameter
            if tensor.name in forms:
                rows, cols = (int(n) for n in reversed(tensor.shape))
                qw = gguf_quantized(tensor.data, tensor.tensor_type, rows, cols)
                values: torch.Tensor | QuantizedWeight = widen(qw, *forms[tensor.name])
            else:
                values = torch.from_numpy(_dequantize(tensor, self.path))
            if self.arch == "llama" and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
                heads = self.config.num_heads if ".attn_q." in tensor.name else self.config.num_kv_heads
                values = _unpermute(values, heads)
            yield self._hf_name(tensor.name), values
        self.current = None

    def quantized_forms(self) -> dict[str, tuple[int, int]]:
        """The tensors that load quantized, each with its (bits, group): a linear weight of a type
        gguf_quant converts, whose fused siblings (q, k, v; gate, up) all are, in their common
        form. Nothing when the checkpoint was opened with quantized=False."""
        if not self.quantized:
            return {}
        types = {t.name: t.tensor_type for t in self.reader.tensors if len(t.shape) == 2}
        forms = {}
        for name in types:
            stem, _, kind = name.removesuffix(".weight").rpartition(".")  # stem "" if global
            if not name.endswith(".weight") or kind not in _LINEAR:
                continue
            fused = next((f for f in _FUSED if kind in f), (kind,))
            siblings = [types.get(f"{stem}.{k}.weight".lstrip(".")) for k in fused]
            present = [t for t in siblings if t is not None]
            if all(t in CONVERTERS for t in present):
                forms[name] = common_form(present)
        return forms

    def _hf_name(self, name: str) -> str:
        stem, _, suffix = name.rpartition(".")
        if stem in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
        parts = stem.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
            return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
        raise ValueError(f"unexpected tensor {name!r}: {self.config.architecture} has no such "
                         "weight")


def _uniform(value: Any, key: str, checkpoint: GGUFCheckpoint) -> int:
    """A per-model count that some files store per layer: all layers must agree."""
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise ValueError(f"{checkpoint.path}: {key} differs between layers ({value[:8]}...), "
                             "which is not supported")
        value = value[0]
    return int(value)


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    """[rows, row length] float32 (GGUF lists the shape innermost first; numpy outermost first)."""
    if tensor.tensor_type not in SUPPORTED_TYPES:
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ValueError(f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, "
                         f"which is not loaded; supported: {names}")
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.array(values, dtype=np.float32).reshape(shape)  # a copy: the file is read-only


def _unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation: per head, GGUF row 2i + j is HF row j * d/2 + i."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _unpermute(w: torch.Tensor | QuantizedWeight, heads: int) -> torch.Tensor | QuantizedWeight:
    """The rows of a dense weight, or of a quantized one's codes, scales and offsets alike."""
    if not isinstance(w, QuantizedWeight):
        return _unpermute_rows(w, heads)
    offset = None if w.offset is None else _unpermute_rows(w.offset, heads)
    return replace(w, q=_unpermute_rows(w.q, heads), scale=_unpermute_rows(w.scale, heads),
                   offset=offset)
