"""Loading HF-format directories: sharded and single-file checkpoints, tied embeddings, config
parsing, dtype resolution, and errors that name the problem and the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedserve.executor import loader
from pagedserve.executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedserve.executor.loader import load_model, resolve_dtype
from pagedserve.executor.model_config import ModelConfig
from tests.conftest import model_dir


def copy_model(
    src: Path, dst: Path, tensors: dict[str, torch.Tensor] | None = None, **config
) -> Path:
    """src's config (with `config` keys overridden) and tokenizer files in dst; weights `tensors`
    (default: src's) as one model.safetensors."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    save_file(
        load_file(src / "model.safetensors") if tensors is None else tensors,
        dst / "model.safetensors",
    )
    return dst


def logits(model, n: int = 20) -> torch.Tensor:
    """Last-token logits of a fixed prompt, through a real paged cache."""
    from pagedserve.executor.attention_metadata import AttentionMetadata
    from pagedserve.executor.kv_cache import KVCache

    cfg = model.config
    cache = KVCache(
        cfg.num_layers, 4, 16, cfg.num_kv_heads, cfg.head_dim, model.lm_head.weight.dtype, "cpu"
    )
    pos = torch.arange(n)
    attn = AttentionMetadata(
        pos + 16,
        torch.tensor([0, n], dtype=torch.int32),
        torch.tensor([n], dtype=torch.int32),
        torch.tensor([[1, 2]], dtype=torch.int32),
        n,
        n,
    )
    with torch.inference_mode():
        return model.compute_logits(model(pos * 7 % cfg.vocab_size, pos, attn, cache)[-1:])


def test_sharded_checkpoint_loads_same_weights(tmp_path: Path) -> None:
    src = model_dir("llama")
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    dst = copy_model(src, tmp_path / "sharded")
    (dst / "model.safetensors").unlink()
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, dst / file)
    weight_map = {n: file for file, part in shards.items() for n in part}
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    sharded, _ = load_model(dst, dtype="float32")
    single, _ = load_model(src, dtype="float32")
    assert torch.equal(logits(sharded), logits(single))


def test_tied_embeddings_share_one_tensor() -> None:
    path = model_dir("qwen2")
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    model, cfg = load_model(path, dtype="float32")
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tied_checkpoint_that_also_stores_lm_head_loads(tmp_path: Path) -> None:
    src = model_dir("qwen2")
    tensors = load_file(src / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    model, _ = load_model(copy_model(src, tmp_path / "m", tensors), dtype="float32")
    assert torch.equal(logits(model), logits(load_model(src, dtype="float32")[0]))


def test_unsupported_architecture_names_config_and_architecture(tmp_path: Path) -> None:
    path = copy_model(model_dir("llama"), tmp_path / "m", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"config\.json.*GPT2LMHeadModel"):
        load_model(path)


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(tmp_path)


def test_missing_safetensors(tmp_path: Path) -> None:
    path = copy_model(model_dir("llama"), tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_model(path)


def test_missing_shard_named_in_index(tmp_path: Path) -> None:
    path = copy_model(model_dir("llama"), tmp_path / "m")
    weight_map = {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
    }
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors.*index\.json"):
        load_model(path)


def test_shape_mismatch_names_tensor_shapes_and_file(tmp_path: Path) -> None:
    tensors = load_file(model_dir("llama") / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:32].clone()
    path = copy_model(model_dir("llama"), tmp_path / "m", tensors)
    with pytest.raises(
        ValueError,
        match=rf"{name}.*expected shape \(64, 128\), got \(32, 128\).*model\.safetensors",
    ):
        load_model(path)


def test_missing_weights_are_named(tmp_path: Path) -> None:
    tensors = load_file(model_dir("llama") / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"], tensors["lm_head.weight"]
    path = copy_model(model_dir("llama"), tmp_path / "m", tensors)
    with pytest.raises(
        ValueError, match=r"missing weights \(2\): .*model\.layers\.2\.mlp\.up_proj\.weight"
    ) as e:
        load_model(path)
    assert "lm_head.weight" in str(e.value)


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    tensors = load_file(model_dir("llama") / "model.safetensors")
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    path = copy_model(model_dir("llama"), tmp_path / "m", tensors)
    with pytest.raises(
        ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"
    ):
        load_model(path)


def test_dtype_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("bfloat16", "float32", cpu) == torch.float32
    assert resolve_dtype("float32", torch.bfloat16, cpu) == torch.bfloat16
    assert (
        resolve_dtype("float32", "float16", cpu) == torch.float16
    )  # explicit wins, even on the CPU
    assert resolve_dtype("float16", None, cuda) == torch.float16
    assert resolve_dtype("float32", None, cuda) == torch.float32
    monkeypatch.setattr(loader, "cpu_supports_bf16", lambda: True)
    # On the CPU, auto means bf16 where the CPU has it, whatever the checkpoint holds.
    assert resolve_dtype("float32", "auto", cpu) == torch.bfloat16
    assert resolve_dtype(None, None, cpu) == torch.bfloat16
    assert resolve_dtype("bfloat16", "auto", cpu) == torch.bfloat16
    assert resolve_dtype("float16", None, cpu) == torch.bfloat16
    monkeypatch.setattr(loader, "cpu_supports_bf16", lambda: False)
    assert resolve_dtype("bfloat16", None, cpu) == torch.float32
    assert resolve_dtype("float32", "auto", cpu) == torch.float32
    with pytest.raises(ValueError, match=r"dtype.*int8"):
        resolve_dtype("float32", "int8", cpu)


def test_dtype_override_loads_in_that_dtype() -> None:
    model, cfg = load_model(model_dir("qwen3"), dtype="bfloat16")
    assert cfg.torch_dtype == "float32"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert logits(model).dtype == torch.float32


def test_config_parsing_of_the_four_tiny_models() -> None:
    llama, mistral, qwen2, qwen3 = (
        ModelConfig.from_dir(model_dir(a)) for a in ("llama", "mistral", "qwen2", "qwen3")
    )
    assert llama.rope_scaling == {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    }
    assert (
        llama.rope_theta == 500000.0 and llama.eos_token_ids == (1, 3) and llama.bos_token_id == 0
    )
    assert mistral.sliding_window == 64 and mistral.layer_sliding_window(3) == 64
    assert qwen2.attention_bias and qwen2.tie_word_embeddings and qwen2.sliding_window == 0
    assert qwen3.qk_norm and qwen3.head_dim == 48 and not qwen3.attention_bias


def test_config_older_formats_and_transformers_defaults() -> None:
    base = {
        "vocab_size": 10,
        "hidden_size": 8,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "intermediate_size": 16,
    }
    old = ModelConfig.from_dict(
        {
            **base,
            "architectures": ["LlamaForCausalLM"],
            "rope_theta": 5e5,
            "max_position_embeddings": 512,
            "eos_token_id": 7,
            "rope_scaling": {
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
            },
        },
        generation={"eos_token_id": [7, 9]},
    )
    assert old.rope_theta == 5e5 and old.rope_scaling["original_max_position_embeddings"] == 512
    assert old.eos_token_ids == (7, 9) and old.num_kv_heads == 2 and old.head_dim == 4
    mistral = ModelConfig.from_dict({**base, "architectures": ["MistralForCausalLM"]})
    assert mistral.sliding_window == 4096 and mistral.rope_scaling is None  # transformers' default
    qwen = ModelConfig.from_dict(
        {
            **base,
            "architectures": ["Qwen2ForCausalLM"],
            "sliding_window": 32768,
            "use_sliding_window": False,
        }
    )
    assert qwen.sliding_window == 0
    qwen = ModelConfig.from_dict(
        {
            **base,
            "architectures": ["Qwen2ForCausalLM"],
            "sliding_window": 32,
            "use_sliding_window": True,
            "max_window_layers": 2,
        }
    )
    assert [qwen.layer_sliding_window(i) for i in range(4)] == [0, 0, 32, 32]


def test_unsupported_rope_type_fails_at_load(tmp_path: Path) -> None:
    path = copy_model(
        model_dir("mistral"),
        tmp_path / "m",
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4},
    )
    with pytest.raises(ValueError, match="rope_scaling"):
        load_model(path)


def test_tensor_parallel_shards_reassemble_the_full_weight() -> None:
    """The TP seam: each rank's weight_loader keeps its slice; the slices make up the whole."""
    full = {s: torch.randn(n, 8) for s, n in (("q", 16), ("k", 4), ("v", 4))}
    ranks = [
        QKVParallelLinear(8, 2, num_heads=8, num_kv_heads=2, bias=False, tp_rank=r, tp_size=4)
        for r in range(4)
    ]
    for layer in ranks:
        for shard, w in full.items():
            layer.weight_loader(layer.weight, w, shard)
    q = torch.cat([layer.weight[:4] for layer in ranks])
    assert torch.equal(q, full["q"])
    # 2 KV heads over 4 ranks: ranks 0-1 hold head 0, ranks 2-3 head 1.
    assert torch.equal(ranks[1].weight[4:6], full["k"][:2]) and torch.equal(
        ranks[2].weight[6:8], full["v"][2:]
    )
    gate, up = torch.randn(6, 8), torch.randn(6, 8)
    merged = [
        MergedColumnParallelLinear(8, [6, 6], bias=False, tp_rank=r, tp_size=2) for r in range(2)
    ]
    for layer in merged:
        layer.weight_loader(layer.weight, gate, 0)
        layer.weight_loader(layer.weight, up, 1)
    assert torch.equal(merged[1].weight, torch.cat([gate[3:], up[3:]]))
    row = RowParallelLinear(8, 4, bias=False, tp_rank=1, tp_size=2)
    w = torch.randn(4, 8)
    row.weight_loader(row.weight, w)
    assert torch.equal(row.weight, w[:, 4:])
    with pytest.raises(ValueError, match=r"expected shape \(4, 8\), got \(4, 6\)"):
        row.weight_loader(row.weight, torch.randn(4, 6))
