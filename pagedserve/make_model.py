"""`pagedserve make-model`: an HF-format model directory with random weights, built offline.

transformers' own config and model classes make the weights; a byte-level BPE tokenizer is trained
on text every machine has (the Python standard library's sources). The same seed gives the same
directory, byte for byte in the weights.
"""

from __future__ import annotations

import json
import math
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
PRESETS = ("tiny", "small", "llama-1b")

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


PRESET_SHAPES = {
    "tiny": Preset(128, 4, 4, 2, 256, tokenizer_vocab=2048, corpus_bytes=1_500_000),
    "small": Preset(768, 12, 12, 4, 2048, tokenizer_vocab=4000),
    "llama-1b": Preset(
        2048, 16, 32, 8, 8192, tokenizer_vocab=16000, vocab_size=128256,
        max_position_embeddings=131072, corpus_bytes=8_000_000, dtype="bfloat16",
    ),
}


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
        return {"sliding_window": 64 if preset_name == "tiny" else 4096, "rope_theta": 10000.0}
    if arch == "qwen2":
        return {"tie_word_embeddings": True, "rope_theta": 1000000.0, "use_sliding_window": False}
    if arch == "qwen3":
        # An explicit head_dim that is not hidden/heads, as real Qwen3 checkpoints have.
        head_dim = 48 if preset_name == "tiny" else 128
        return {"head_dim": head_dim, "tie_word_embeddings": preset_name == "tiny",
                "rope_theta": 1000000.0}
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

    p = PRESET_SHAPES[preset_name]
    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
               "qwen3": "Qwen3Config"}
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
    config = getattr(transformers, classes[arch])(**kwargs)
    config.architectures = [getattr(transformers, classes[arch].replace("Config", "ForCausalLM")).__name__]
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
