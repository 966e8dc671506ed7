"""Chained block hashes: a full block is named by its parent's hash, its tokens and extra keys.

Two blocks get the same hash only if the whole token prefix up to and including them is the same and
so are the extra keys (today the per-request cache salt; later adapter ids or multimodal hashes), so
a hash names KV content, and equal hashes can share one physical block.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence

from pagedserve.scheduler.block_pool import BlockHash

ROOT_HASH: BlockHash = hashlib.sha256(b"pagedserve.v1 block hash root").digest()

ExtraKeys = tuple[str | int, ...]


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: ExtraKeys = ()) -> (
        BlockHash):
    """SHA-256 of (parent hash, the block's token ids, extra keys), each field length-delimited."""
    h = hashlib.sha256()
    h.update(parent if parent is not None else ROOT_HASH)
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    h.update(json.dumps(list(extra_keys), separators=(",", ":")).encode())
    return h.digest()


def extend_block_hashes(hashes: list[BlockHash], token_ids: Sequence[int], block_size: int,
                        extra_keys: ExtraKeys = ()) -> None:
    """Appends the hashes of the full blocks of token_ids that `hashes` does not cover yet."""
    num_full = len(token_ids) // block_size
    for i in range(len(hashes), num_full):
        parent = hashes[i - 1] if i > 0 else None
        block = token_ids[i * block_size:(i + 1) * block_size]
        hashes.append(hash_block(parent, block, extra_keys))
