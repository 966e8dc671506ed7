"""What the attention layers need to know about one step's flat batch of tokens.

The step's tokens are flat (no batch dimension, no padding): sequence i owns query rows
cu_seqlens_q[i]:cu_seqlens_q[i+1], the last q_len_i positions of its context of seq_lens[i] tokens.
Its K/V pages are block_tables[i] in logical order; slot_mapping says where each new token's K/V go.
See kernels/reference/attention.py for the exact semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset per token (-1 = skip)
    cu_seqlens_q: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32, context length including this step's tokens
    block_tables: torch.Tensor  # [S, max_blocks] int32, padding entries 0
    max_seqlen_q: int  # host-side bounds, so kernels launch without a device sync
    max_seqlen_k: int
