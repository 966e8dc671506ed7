"""The persistent batch: per-request rows that live across steps, and one step's flat inputs.

Each held request owns a row of two tables, written when it arrives and appended to as it grows, so
a plan only carries diffs:

    token_ids   [max_num_seqs, max_model_len]       prompt then output ids
    block_table [max_num_seqs, max_blocks_per_seq]  its block ids, 0 past the end

A step gathers from those rows into buffers of fixed capacity (max_num_batched_tokens tokens,
max_num_seqs sequences) with a few vectorised numpy ops and no per-token Python. The first T / S
entries of each buffer are the step's; on CUDA they are copied into device buffers of the same
capacity (the shape CUDA graphs will need).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.executor.attention_metadata import AttentionMetadata
from pagedserve.executor.request_state import RequestState


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    last_token_indices: torch.Tensor  # [S] int64: each sequence's last row in the flat batch
    num_tokens: int  # T


# Staging buffers and what a device copy holds past a step's live entries (padding, so a kernel,
# or a CUDA graph replayed at a larger padded size, reads nothing stale): slot -1 is skipped by the
# KV write, a sequence of length 0 attends to nothing, block id 0 is never read.
BUFFERS = {  # name: (dtype, padding)
    "input_ids": (torch.int64, 0),
    "positions": (torch.int64, 0),
    "slot_mapping": (torch.int64, -1),
    "cu_seqlens_q": (torch.int32, None),  # padded with the step's token count: 0 query rows
    "seq_lens": (torch.int32, 0),
    "block_tables": (torch.int32, 0),
    "last_token_indices": (torch.int64, 0),
}


class InputBatch:
    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 block_size: int, device: torch.device | str = "cpu"):
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.device = torch.device(device)
        self.token_ids = np.zeros((max_num_seqs, max_model_len), dtype=np.int32)
        self.block_table = np.zeros((max_num_seqs, self.max_blocks_per_seq), dtype=np.int32)
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.on_device = self.device.type == "cuda"
        capacity = {"input_ids": max_num_batched_tokens, "positions": max_num_batched_tokens,
                    "slot_mapping": max_num_batched_tokens, "cu_seqlens_q": max_num_seqs + 1,
                    "seq_lens": max_num_seqs, "last_token_indices": max_num_seqs,
                    "block_tables": max_num_seqs * self.max_blocks_per_seq}
        # On CUDA two pinned staging sets take turns: step N+1 writes one while step N's
        # non-blocking copies may still read the other (a prompt chunk samples nothing, so no
        # sync separates two such steps). Before a set is rewritten, the event recorded after
        # its last upload is waited on; it is two steps old, so the wait is almost always free.
        self._stages = [{name: torch.zeros(capacity[name], dtype=BUFFERS[name][0],
                                           pin_memory=self.on_device) for name in BUFFERS}
                        for _ in range(2 if self.on_device else 1)]
        self._stage_np = [{n: t.numpy() for n, t in s.items()} for s in self._stages]
        self._uploaded = [torch.cuda.Event() if self.on_device else None for _ in self._stages]
        self._turn = 0
        self._dev = self._stages[0] if not self.on_device else {
            name: torch.zeros_like(t, device=self.device) for name, t in self._stages[0].items()
        }
        self._dirty = dict.fromkeys(BUFFERS, 0)  # entries of each device buffer ever written

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    # ---- per-request rows ---------------------------------------------------------------------

    def add(self, state: RequestState) -> None:
        """Give the request a row and write its tokens and block table there."""
        state.row = self._free_rows.pop()
        self.token_ids[state.row, : state.num_tokens] = state.prompt_token_ids + state.output_token_ids
        self.block_table[state.row] = 0
        self.block_table[state.row, : len(state.block_ids)] = state.block_ids

    def remove(self, state: RequestState) -> None:
        self._free_rows.append(state.row)
        state.row = -1

    def append_blocks(self, state: RequestState, block_ids: Sequence[int]) -> None:
        start = len(state.block_ids)
        state.block_ids.extend(block_ids)
        self.block_table[state.row, start : len(state.block_ids)] = block_ids

    def append_token(self, state: RequestState, token_id: int) -> None:
        """The executor's own copy of a sampled token: computed at the request's next step."""
        if state.num_tokens < self.max_model_len:  # past it the token is never computed
            self.token_ids[state.row, state.num_tokens] = token_id
        state.output_token_ids.append(token_id)

    def write_drafts(self, state: RequestState, draft_token_ids: Sequence[int]) -> None:
        """Speculative drafts after the held tokens, where the step's inputs are gathered from;
        not outputs (the tokens verification keeps are appended and overwrite them)."""
        start = state.num_tokens
        self.token_ids[state.row, start : start + len(draft_token_ids)] = draft_token_ids

    def token_table(self, states: Sequence[RequestState]) -> torch.Tensor:
        """[S, longest] int64: the requests' prompt + output ids (what penalties read)."""
        width = max(s.num_tokens for s in states)
        rows = np.array([s.row for s in states])
        return torch.from_numpy(self.token_ids[rows, :width].astype(np.int64))

    # ---- one step -----------------------------------------------------------------------------

    def prepare(self, states: Sequence[RequestState], num_scheduled: Sequence[int],
                computed: Sequence[int] | None = None) -> StepInputs:
        """Flat inputs for computing tokens [computed, computed + scheduled) of each request
        (computed: each one's num_computed_tokens unless given, as a draft model's own counts are).

        For request i with c computed and n scheduled tokens, owning query rows cu[i]:cu[i+1]:

            tokens held:   | 0 ........ c-1 | c ........ c+n-1 | c+n ... (held, not yet computed)
                             already in KV    computed now: positions c..c+n-1,
                                              slot of p = block_ids[p // block_size] * block_size
                                                          + p % block_size
            seq_lens[i] = c + n (the context attention sees); the last query row cu[i+1] - 1 is
            the one whose logits sample, when c + n reaches the end of the held tokens.
        """
        num_seqs, bs = len(states), self.block_size
        buf = self._next_stage()
        rows = np.array([s.row for s in states], dtype=np.int64)
        computed = np.array([s.num_computed_tokens for s in states] if computed is None
                            else computed, dtype=np.int64)
        sched = np.asarray(num_scheduled, dtype=np.int64)
        cu = buf["cu_seqlens_q"][: num_seqs + 1]
        cu[0] = 0
        np.cumsum(sched, out=cu[1:])
        num_tokens = int(cu[-1])
        seq_of_token = np.repeat(np.arange(num_seqs), sched)
        positions = np.arange(num_tokens) - cu[:-1][seq_of_token] + computed[seq_of_token]
        row_of_token = rows[seq_of_token]
        buf["positions"][:num_tokens] = positions
        buf["input_ids"][:num_tokens] = self.token_ids[row_of_token, positions]
        blocks = self.block_table[row_of_token, positions // bs].astype(np.int64)
        buf["slot_mapping"][:num_tokens] = blocks * bs + positions % bs
        seq_lens = computed + sched
        buf["seq_lens"][:num_seqs] = seq_lens
        # On CUDA the table keeps its full width (one stride for every step, as a captured graph
        # needs); on the CPU only the columns this step's longest context reaches are gathered.
        width = self.max_blocks_per_seq if self.on_device else int(-(-seq_lens.max() // bs))
        tables = buf["block_tables"][: num_seqs * width].reshape(num_seqs, width)
        tables[:] = self.block_table[rows, :width]
        buf["last_token_indices"][:num_seqs] = cu[1:] - 1
        t = self._upload(buf, {
            "input_ids": num_tokens, "positions": num_tokens, "slot_mapping": num_tokens,
            "cu_seqlens_q": num_seqs + 1, "seq_lens": num_seqs, "block_tables": num_seqs * width,
            "last_token_indices": num_seqs,
        })
        attn = AttentionMetadata(
            slot_mapping=t["slot_mapping"], cu_seqlens_q=t["cu_seqlens_q"], seq_lens=t["seq_lens"],
            block_tables=t["block_tables"].view(num_seqs, width),
            max_seqlen_q=int(sched.max()), max_seqlen_k=int(seq_lens.max()),
        )
        return StepInputs(t["input_ids"], t["positions"], attn, t["last_token_indices"], num_tokens)

    def _next_stage(self) -> dict[str, np.ndarray]:
        """The staging set this step writes, once the copies that last read it have finished."""
        self._turn = (self._turn + 1) % len(self._stages)
        done = self._uploaded[self._turn]
        if done is not None:
            done.synchronize()
        return self._stage_np[self._turn]

    def _upload(self, buf: dict[str, np.ndarray], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        """The first `size` entries of each buffer, on the device. On CUDA the entries a larger
        earlier step left on the device are overwritten with padding in the same copy."""
        if not self.on_device:
            return {name: self._dev[name][:size] for name, size in sizes.items()}
        stage = self._stages[self._turn]
        for name, size in sizes.items():
            extent = max(size, self._dirty[name])
            pad = BUFFERS[name][1] if name != "cu_seqlens_q" else int(buf["cu_seqlens_q"][size - 1])
            buf[name][size:extent] = pad
            self._dev[name][:extent].copy_(stage[name][:extent], non_blocking=True)
            self._dirty[name] = extent
        self._uploaded[self._turn].record()  # waiting on one never recorded returns at once
        return {name: self._dev[name][:size] for name, size in sizes.items()}
