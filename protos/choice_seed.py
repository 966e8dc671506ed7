"""The seed of each sequence of a request that asks for several (n > 1), in one place.

Part of the wire contract: a seeded request's choice (or child) i samples with seed + i, modulo
2**64 (SamplingParams.seed is a uint64), so siblings differ yet each is reproducible on its own.
The router numbers a served request's choices and the scheduler its n children; both ask here.
"""

from __future__ import annotations

SEED_MODULUS = 1 << 64


def choice_seed(seed: int, index: int) -> int:
    """Sequence `index`'s seed; any integer seed (negative too) maps into uint64."""
    return (seed + index) % SEED_MODULUS
