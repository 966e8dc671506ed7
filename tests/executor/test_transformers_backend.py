"""Choosing the model implementation, and refusing what the transformers fallback cannot run: each
refusal is one ValueError naming the architecture and the reason, raised at load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.loader import load_model
from pagedserve.executor.models.impl import check_transformers_config, choose_model_impl
from pagedserve.executor.models.llama import LlamaFamilyForCausalLM
from pagedserve.executor.models.transformers_backend import TransformersForCausalLM
from pagedserve.executor.models.transformers_probe import Call, UnsupportedModel, _check_calls
from tests.conftest import model_dir

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=256, max_position_embeddings=256, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs: a second thread only waits
    yield
    torch.set_num_threads(threads)


def _hf_model_dir(tmp_path: Path, model_type: str, **config) -> Path:
    """A random transformers model of `model_type`, saved as an HF-format directory."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = transformers.AutoConfig.for_model(model_type, **{**SMALL, **config})
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    cfg.architectures = [cls.__name__]
    torch.manual_seed(0)
    cls(cfg).save_pretrained(tmp_path)
    return tmp_path


def _impl_logs(logs: list[dict]) -> list[tuple]:
    return [(e["event"], e["architecture"], e.get("model_class") or e.get("reason"))
            for e in logs if e["event"].startswith("model implementation")]


def test_auto_picks_native_where_registered_and_says_so() -> None:
    with capture_logs() as logs:
        model, config = load_model(model_dir("llama", "micro"), dtype="float32")
        assert isinstance(model, LlamaFamilyForCausalLM)
        model, config = load_model(model_dir("gemma", "micro"), dtype="float32")
        assert isinstance(model, TransformersForCausalLM)
    assert _impl_logs(logs) == [
        ("model implementation: native", "LlamaForCausalLM", "LlamaFamilyForCausalLM"),
        ("model implementation: transformers fallback", "GemmaForCausalLM",
         "no native implementation")]
    assert (config.num_layers, config.num_kv_heads, config.head_dim) == (2, 2, 16)
    assert config.eos_token_ids and config.vocab_size == 1024


def test_transformers_forced_on_a_native_architecture() -> None:
    with capture_logs() as logs:
        model, _ = load_model(model_dir("qwen3", "micro"), dtype="float32",
                              model_impl="transformers")
    assert isinstance(model, TransformersForCausalLM)
    assert _impl_logs(logs) == [
        ("model implementation: transformers fallback", "Qwen3ForCausalLM", "requested")]


def test_native_refuses_an_architecture_it_lacks() -> None:
    why = r"config\.json: GemmaForCausalLM: no native implementation"
    with pytest.raises(UnsupportedModel, match=why):
        load_model(model_dir("gemma", "micro"), model_impl="native")


def test_model_impl_is_validated() -> None:
    with pytest.raises(ValueError, match="model_impl"):
        ExecutorConfig(model="m", model_impl="vllm")
    with pytest.raises(ValueError, match="model_impl"):
        choose_model_impl({"architectures": ["LlamaForCausalLM"]}, "fast")


@pytest.mark.parametrize(("raw", "why"), [
    ({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
      "is_encoder_decoder": True}, "T5ForConditionalGeneration: an encoder-decoder model"),
    ({"architectures": ["MambaForCausalLM"], "model_type": "mamba"},
     "MambaForCausalLM: model type 'mamba' has state-space or recurrent layers"),
    ({"architectures": ["MyForCausalLM"], "model_type": "my", "auto_map": {"AutoModel": "x.y"}},
     "MyForCausalLM: its modeling code ships with the checkpoint .* --trust-remote-code"),
    ({"architectures": ["FalconForCausalLM"], "model_type": "falcon", "alibi": True},
     "FalconForCausalLM: ALiBi position bias"),
    ({"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
      "layer_types": ["chunked_attention", "full_attention"]},
     r"Llama4ForCausalLM: layer types \['chunked_attention'\]"),
    ({"architectures": ["BloomForCausalLM"], "model_type": "bloom"},
     "BloomForCausalLM: its attention does not go through transformers' AttentionInterface"),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "llama"},
     "GPT2LMHeadModel: config.json's model type 'llama' is transformers' LlamaForCausalLM"),
    ({"architectures": ["NoSuchForCausalLM"], "model_type": "no_such"},
     "NoSuchForCausalLM: transformers .* has no causal language model for model type 'no_such'"),
])
def test_config_level_refusals(raw: dict, why: str) -> None:
    with pytest.raises(UnsupportedModel, match=f"^{why}"):
        check_transformers_config(raw)


def test_remote_code_is_left_to_the_probe_when_trusted() -> None:
    check_transformers_config({"architectures": ["MyForCausalLM"], "model_type": "my",
                               "auto_map": {"AutoModelForCausalLM": "m.MyForCausalLM"}},
                              trust_remote_code=True)


@pytest.mark.parametrize(("model_type", "config", "why"), [
    ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16),
     "GptOssForCausalLM: its attention uses attention sinks"),
    ("deepseek_v3", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                         kv_lora_rank=16, q_lora_rank=None, first_k_dense_replace=2),
     "DeepseekV3ForCausalLM: query, key and value have 4x24, 4x24 and 4x16"),
    ("bert", dict(is_decoder=False), "BertLMHeadModel: its attention is bidirectional"),
])
def test_probe_refusals(tmp_path: Path, model_type: str, config: dict, why: str) -> None:
    path = _hf_model_dir(tmp_path, model_type, **config)
    with pytest.raises(UnsupportedModel, match=rf"config\.json: {why}"):
        load_model(path, dtype="float32")


def test_probe_refuses_a_model_that_numbers_tokens_itself(monkeypatch) -> None:
    original = TransformersForCausalLM.run_base

    def ignore_positions(self, input_ids, positions, inputs_embeds=None):
        return original(self, input_ids, torch.arange(len(positions)), inputs_embeds)

    monkeypatch.setattr(TransformersForCausalLM, "run_base", ignore_positions)
    why = r"config\.json: GemmaForCausalLM: its output does not depend"
    with pytest.raises(UnsupportedModel, match=why):
        load_model(model_dir("gemma", "micro"), dtype="float32")


def test_probe_refuses_logits_it_does_not_reproduce(monkeypatch) -> None:
    # Granite divides its logits by logits_scaling: without that, ours differ from the model's.
    monkeypatch.setattr(TransformersForCausalLM, "compute_logits",
                        lambda self, hidden: self.hf.get_output_embeddings()(hidden).float())
    why = r"config\.json: GraniteForCausalLM: its ForCausalLM forward"
    with pytest.raises(UnsupportedModel, match=why):
        load_model(model_dir("granite", "micro"), dtype="float32")


def _call(module, q=(1, 4, 6, 16), k=(1, 2, 6, 16), mask=False) -> Call:
    return Call(module, q, k, k, mask, ())


def test_calls_check_layers_and_shapes() -> None:
    hf = torch.nn.Module()
    hf.config = type("C", (), {"num_hidden_layers": 3})()
    a, b, c = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    calls = [_call(a), _call(b), _call(c)]
    assert _check_calls(calls, calls, hf, "X").num_kv_heads == 2
    with pytest.raises(UnsupportedModel, match=r"^X: only 2 of its 3 layers"):
        _check_calls(calls[:2], calls[:2], hf, "X")
    with pytest.raises(UnsupportedModel, match=r"^X: no layer calls"):
        _check_calls([], [], hf, "X")
    with pytest.raises(UnsupportedModel, match="more than once per forward"):
        _check_calls([calls[0], calls[0], calls[1]], calls, hf, "X")
    with pytest.raises(UnsupportedModel, match="takes a mask or bias"):
        _check_calls([calls[0], calls[1], _call(c, mask=True)], calls, hf, "X")
    with pytest.raises(UnsupportedModel, match="differ in head counts or head size"):
        _check_calls([calls[0], calls[1], _call(c, k=(1, 1, 6, 16))], calls, hf, "X")


def test_gguf_is_native_only(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="GGUF file runs on the native implementation only"):
        load_model(tmp_path, model_impl="transformers")


def test_config_json_is_required(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        load_model(tmp_path, model_impl="transformers")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no `architectures` entry"):
        load_model(tmp_path)


def _packs_here() -> bool:
    from pagedserve.executor.layers.cpu_gemm import pack_weight

    return pack_weight(torch.randn(16, 16)) is not None


def test_cpu_linears_are_packed_like_native_ones() -> None:
    from pagedserve.executor.models.transformers_cpu import PackedLinear

    if not _packs_here():
        pytest.skip("no packed CPU GEMM on this machine")
    model, _ = load_model(model_dir("llama", "micro"), dtype="float32", model_impl="transformers")
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer; the untied LM head
    assert all(m.weight.is_meta for m in packed)  # the packed copy is the only one


def test_packing_is_undone_when_the_model_fails_with_it(monkeypatch) -> None:
    from pagedserve.executor.models.transformers_cpu import PackedLinear

    if not _packs_here():
        pytest.skip("no packed CPU GEMM on this machine")

    def fail(self, x):
        raise RuntimeError("reads the weight")

    monkeypatch.setattr(PackedLinear, "forward", fail)
    with capture_logs() as logs:
        model, _ = load_model(model_dir("llama", "micro"), dtype="float32",
                              model_impl="transformers")
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert {"event": "linear weights stay unpacked on the CPU", "architecture": "LlamaForCausalLM",
            "reason": "RuntimeError: reads the weight", "log_level": "warning"} in logs
