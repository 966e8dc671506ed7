"""docs/supported_models.md is generated from the registries; it must match what they say now."""

from __future__ import annotations

from pagedserve import supported_models


def test_supported_models_page_is_current() -> None:
    assert supported_models.DOC.read_text() == supported_models.render(), (
        "docs/supported_models.md is stale: run python -m pagedserve.supported_models")


def test_page_lists_native_and_fallback_architectures() -> None:
    from pagedserve.executor.models import MODEL_REGISTRY
    from pagedserve.make_model import FALLBACK_RECIPES

    text = supported_models.render()
    assert all(f"| `{name}` |" in text for name in MODEL_REGISTRY)
    assert len(FALLBACK_RECIPES) >= 30 and "| `GemmaForCausalLM` | `gemma` |  | yes |" in text
    assert "| `Gemma2ForCausalLM` | `gemma2` | `Gemma2ForCausalLM` | yes |" in text
