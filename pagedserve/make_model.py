"""`pagedserve make-model`: an HF-format model directory with random weights, built offline.

transformers' own config and model classes make the weights; a byte-level BPE tokenizer is trained
on text every machine has (the Python standard library's sources). The same seed gives the same
directory, byte for byte in the weights.
"""

from __future__ import annotations

import functools
import json
import math
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

NATIVE_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
PRESETS = ("micro", "tiny", "small", "llama-1b")

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
EOT, HEADER_START, HEADER_END = "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, EOT, HEADER_START, HEADER_END]

# Llama-3 style: every message framed by role headers, ended by <|eot_id|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tokenizer_vocab: int  # tokens the BPE tokenizer learns
    vocab_size: int = 0  # embedding rows; 0 means the tokenizer's size
    max_position_embeddings: int = 2048
    corpus_bytes: int = 3_000_000  # how much stdlib text trains the tokenizer
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)
    window: int = 4096  # sliding window of the fallback recipes that have one

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


PRESET_SHAPES = {
    # The fallback tests' size: about 0.2M parameters, built in a second.
    "micro": Preset(64, 2, 4, 2, 128, tokenizer_vocab=1024, corpus_bytes=400_000, window=16),
    "tiny": Preset(128, 4, 4, 2, 256, tokenizer_vocab=2048, corpus_bytes=1_500_000, window=64),
    "small": Preset(768, 12, 12, 4, 2048, tokenizer_vocab=4000),
    "llama-1b": Preset(
        2048, 16, 32, 8, 8192, tokenizer_vocab=16000, vocab_size=128256,
        max_position_embeddings=131072, corpus_bytes=8_000_000, dtype="bfloat16",
    ),
}


def _moe(p: Preset, experts_key: str = "num_local_experts", **extra) -> dict:
    """Four experts, two per token, each half the dense MLP's width."""
    return {experts_key: 4, "num_experts_per_tok": 2, "moe_intermediate_size": p.intermediate_size // 2,
            **extra}


def _alternating(p: Preset, **extra) -> dict:
    """Sliding-window and global layers in turn, as Gemma 2/3, Cohere 2 and EXAONE 4 have them."""
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(p.num_layers)]
    return {"sliding_window": p.window, "layer_types": types, **extra}


# The transformers fallback's architectures (config model_type -> what sets each apart, exercised
# at the micro size): each config comes from transformers' own class, with its defaults otherwise.
# A scale away from 1 (Granite, Cohere) or a soft-cap is kept where greedy ties stay rare.
FALLBACK_RECIPES: dict[str, Callable[[Preset], dict]] = {
    "gemma": lambda p: {"head_dim": p.head_dim},
    "gemma2": lambda p: _alternating(p, head_dim=p.head_dim, query_pre_attn_scalar=p.head_dim * 2,
                                     attn_logit_softcapping=8.0, final_logit_softcapping=30.0),
    "gemma3_text": lambda p: _alternating(p, head_dim=p.head_dim, query_pre_attn_scalar=p.head_dim,
                                          attn_logit_softcapping=None, final_logit_softcapping=None),
    "phi": lambda p: {"partial_rotary_factor": 0.5},
    "phi3": lambda p: {},
    "olmo": lambda p: {"clip_qkv": 4.0},
    "olmo2": lambda p: {},
    "olmo3": lambda p: _alternating(p),
    "granite": lambda p: {"embedding_multiplier": 1.5, "residual_multiplier": 0.8,
                          "attention_multiplier": 0.2, "logits_scaling": 0.5},
    "granitemoe": lambda p: _moe(p, embedding_multiplier=1.5, attention_multiplier=0.2,
                                 logits_scaling=0.5),
    "cohere": lambda p: {"logit_scale": 2.0, "use_qk_norm": True},
    "cohere2": lambda p: _alternating(p, logit_scale=2.0),
    "stablelm": lambda p: {"use_qkv_bias": True, "qk_layernorm": True},
    "starcoder2": lambda p: {"sliding_window": p.window},
    "gpt_neox": lambda p: {"rotary_pct": 0.5},
    "gptj": lambda p: {"rotary_dim": p.head_dim // 2},
    "gpt2": lambda p: {},
    "falcon": lambda p: {"multi_query": True, "alibi": False},  # one K/V head for all queries
    "mixtral": lambda p: _moe(p, sliding_window=None),
    "qwen2_moe": lambda p: _moe(p, "num_experts", shared_expert_intermediate_size=p.intermediate_size),
    "qwen3_moe": lambda p: _moe(p, "num_experts", head_dim=p.head_dim, norm_topk_prob=True),
    "olmoe": lambda p: _moe(p, "num_experts"),
    "ernie4_5": lambda p: {"head_dim": p.head_dim},
    "ernie4_5_moe": lambda p: {"head_dim": p.head_dim, "moe_num_experts": 4, "moe_k": 2,
                               "moe_intermediate_size": p.intermediate_size // 2,
                               "moe_layer_start_index": 0, "moe_num_shared_experts": 1},
    "glm": lambda p: {"head_dim": p.head_dim},
    "glm4": lambda p: {"head_dim": p.head_dim},
    "smollm3": lambda p: {"no_rope_layers": [int(i % 2 == 0) for i in range(p.num_layers)]},
    "helium": lambda p: {"head_dim": p.head_dim},
    "exaone4": lambda p: _alternating(p, head_dim=p.head_dim),
    "persimmon": lambda p: {},
    "nemotron": lambda p: {"head_dim": p.head_dim},
    "arcee": lambda p: {"head_dim": p.head_dim},
    "seed_oss": lambda p: {"head_dim": p.head_dim},
    "gpt_bigcode": lambda p: {"multi_query": True},
    "codegen": lambda p: {"rotary_dim": p.head_dim // 2},
    "opt": lambda p: {"ffn_dim": p.intermediate_size, "word_embed_proj_dim": p.hidden_size},
    "biogpt": lambda p: {"scale_embedding": True},
}
ARCHITECTURES = NATIVE_ARCHITECTURES + tuple(FALLBACK_RECIPES)


def _arch_overrides(arch: str, preset_name: str, p: Preset) -> dict:
    """What distinguishes each architecture, exercised even at the tiny size."""
    if arch == "llama":
        factor = 8.0 if preset_name == "llama-1b" else 4.0
        original = 8192 if preset_name == "llama-1b" else 256
        return {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": original,
            },
            "tie_word_embeddings": preset_name == "llama-1b",
        }
    if arch == "mistral":
        return {"sliding_window": 4096 if p.window > 64 else p.window, "rope_theta": 10000.0}
    if arch == "qwen2":
        return {"tie_word_embeddings": True, "rope_theta": 1000000.0, "use_sliding_window": False}
    if arch == "qwen3":
        # An explicit head_dim that is not hidden/heads, as real Qwen3 checkpoints have.
        head_dim = {"micro": 24, "tiny": 48}.get(preset_name, 128)
        return {"head_dim": head_dim, "tie_word_embeddings": preset_name == "tiny",
                "rope_theta": 1000000.0}
    if arch in FALLBACK_RECIPES:
        return FALLBACK_RECIPES[arch](p)
    raise ValueError(f"arch: unsupported architecture {arch!r}; choose from {ARCHITECTURES}")


def stdlib_corpus(max_bytes: int) -> list[str]:
    """Python standard library sources, in a fixed order, up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


@functools.cache  # one per process and size: make-model for many architectures trains it once
def train_tokenizer(vocab_size: int, corpus_bytes: int):
    """A byte-level BPE tokenizer (GPT-2/Llama-3 style) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(stdlib_corpus(corpus_bytes), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        chat_template=CHAT_TEMPLATE, model_max_length=1 << 30,
    )


def build_config(arch: str, preset_name: str, tokenizer):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    p = PRESET_SHAPES[preset_name]
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in (EOS, EOT)]
    kwargs = dict(
        hidden_size=p.hidden_size, num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
        intermediate_size=p.intermediate_size,
        vocab_size=p.vocab_size or len(tokenizer),
        max_position_embeddings=p.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5,
        # Large enough that attention and MLPs shape the output, so greedy text depends on context.
        initializer_range=2.2 / math.sqrt(p.hidden_size),
        tie_word_embeddings=False, torch_dtype=p.dtype,
    )
    kwargs.update(_arch_overrides(arch, preset_name, p))
    config = transformers.AutoConfig.for_model(arch, **kwargs)  # arch is the model_type
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[arch]]
    return config


def sharpen_logits(model, hidden_size: int) -> None:
    """Scale the LM head so logits spread (std about 4): greedy ties become rare."""
    import torch

    std = 4.0 / math.sqrt(hidden_size)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, std)
        if model.config.tie_word_embeddings:
            model.get_input_embeddings().weight = model.get_output_embeddings().weight


def make_model(arch: str, preset: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write an HF-format model directory; returns its path."""
    import torch
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: unsupported architecture {arch!r}; choose from {ARCHITECTURES}")
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown preset {preset!r}; choose from {PRESETS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = PRESET_SHAPES[preset]
    tokenizer = train_tokenizer(p.tokenizer_vocab, p.corpus_bytes)
    config = build_config(arch, preset, tokenizer)
    torch.manual_seed(seed)
    model_cls = getattr(transformers, config.architectures[0])
    model = model_cls(config).eval()
    sharpen_logits(model, p.hidden_size)
    model = model.to(getattr(torch, p.dtype))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _add_chat_template_to_config(out)
    (out / "pagedserve.json").write_text(json.dumps({"arch": arch, "preset": preset, "seed": seed}))
    return out


def _add_chat_template_to_config(out: Path) -> None:
    """Older loaders read the chat template from tokenizer_config.json; keep it there too."""
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
