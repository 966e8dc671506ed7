"""The benchmarks take a GGUF file as they take an HF directory: its config comes from the file's
metadata (bench.roofline.model_config), which must say what the model's own config.json says."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedserve.bench.roofline import model_config

pytestmark = pytest.mark.real_model


def test_model_config_of_the_real_gguf(smollm2: Path) -> None:
    config = model_config(str(smollm2))
    # SmolLM2-135M-Instruct's published config.json
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (
        49152, 576, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["intermediate_size"] == 1536 and config["tie_word_embeddings"] is True
