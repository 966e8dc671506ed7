"""/metrics read with prometheus_client's own parser: every sample, by name and labels (a text
the parser cannot read fails here, so the tests also hold the exposition to the format)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, frozenset of label items) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def family_types(text: str) -> dict[str, str]:
    """Family name (as declared by # TYPE) -> its type."""
    return {f.name: f.type for f in text_string_to_metric_families(text)}
