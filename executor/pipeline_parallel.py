"""Pipeline parallelism over gloo on the CPU (NCCL for the hand-offs on CUDA): the decoder layers
cut into M stages, each stage a process (or tensor_parallel_size processes), the step's requests
cut into micro-batches that flow through the stages so that stage s works on micro-batch k while
stage s+1 works on k-1.

Ranks: world size tp x pp, rank = stage * tp + tensor-parallel rank. Rank 0 (stage 0, tp rank 0)
is the executor the scheduler talks to; it starts the others and broadcasts each plan to all of
them, as with tensor parallelism alone (executor/tensor_parallel.py), so every rank holds the same
request state and prepares the same flat inputs. Then, per micro-batch k (requests in plan order,
a request's rows never split, up to M micro-batches of about equal tokens):

    stage 0      embed -> its layers -> send (hidden, residual) to rank + tp  ─┐
    stage s      receive from rank - tp -> its layers -> send to rank + tp    <┘ ...
    stage M-1    receive -> its layers -> final norm -> keep the final hidden rows

Sends are asynchronous (a broadcast in the two ranks' own gloo group, which unlike gloo's isend
can be polled), so stage 0 starts micro-batch k+1 while k is in flight. The last stage computes the logits of the sampling rows and samples once for the whole step, as one
rank would (so seeds, penalties and grammar masks see exactly what they see without stages),
then broadcasts the sampled tokens and logprobs (one float64 tensor, SamplerOutput.packed) from
its tp rank 0 to every rank: each appends them to its own request state, and rank 0 builds the
StepResult from them. Tensor-parallel collectives inside a stage run over that stage's own group
(parallel_state.use_tp_group; the shared-memory all-reduce is for one stage only). On CUDA the
hand-offs and those groups are NCCL on the GPU tensors, the samples' broadcast stays gloo
(executor/rank_devices.py).

Rank 0 waits on those messages polling its ranks' processes, so a rank of any stage that dies
fails rank 0's step naming it, even where the message it waits for would have come from another
rank (one stuck behind the dead one).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pagedserve.executor import parallel_state
from pagedserve.executor.attention_metadata import AttentionMetadata
from pagedserve.executor.input_batch import StepInputs
from pagedserve.executor.kv_cache import KVCache
from pagedserve.executor.models.pipeline_stage import Carried, StageLayers
from pagedserve.executor.request_state import RequestState
from pagedserve.executor.sampler import HostSamplerOutput, SamplerOutput

POLL_S = 0.0002  # rank 0's sleep between looks at a pending message (a spin would take a core)
WATCH_EVERY_S = 0.05  # how often rank 0 looks for a dead rank while it waits


@dataclass(frozen=True)
class MicroBatch:
    requests: range  # of the step's scheduled requests
    tokens: range  # of the step's flat rows


def split_micro_batches(num_scheduled: Sequence[int], max_parts: int) -> list[MicroBatch]:
    """Up to max_parts runs of consecutive requests, of about equal tokens; a request's rows stay
    together, so one request is one micro-batch."""
    n, total = len(num_scheduled), sum(num_scheduled)
    parts = min(max_parts, n)
    cuts, seen = [0], 0
    for i, count in enumerate(num_scheduled[:-1]):
        seen += count
        k = len(cuts)  # the cut this would be
        # cut at k/parts of the tokens, or where each remaining part needs a remaining request
        if k < parts and (seen * parts >= total * k or n - i - 1 == parts - k):
            cuts.append(i + 1)
    cuts.append(n)
    starts = [0, *itertools.accumulate(num_scheduled)]
    return [MicroBatch(range(a, b), range(starts[a], starts[b]))
            for a, b in itertools.pairwise(cuts)]


def micro_batch_inputs(inputs: StepInputs, mb: MicroBatch, num_scheduled: Sequence[int],
                       seq_lens: Sequence[int]) -> StepInputs:
    """The step's flat inputs cut to one micro-batch (views; its query offsets start at 0)."""
    (a, b), (t0, t1) = (mb.requests.start, mb.requests.stop), (mb.tokens.start, mb.tokens.stop)
    attn = inputs.attn
    if (a, b) == (0, len(num_scheduled)):
        return inputs
    sub = AttentionMetadata(
        slot_mapping=attn.slot_mapping[t0:t1], cu_seqlens_q=attn.cu_seqlens_q[a : b + 1] - t0,
        seq_lens=attn.seq_lens[a:b], block_tables=attn.block_tables[a:b],
        max_seqlen_q=max(num_scheduled[a:b]), max_seqlen_k=max(seq_lens[a:b]))
    return StepInputs(inputs.input_ids[t0:t1], inputs.positions[t0:t1], sub,
                      inputs.last_token_indices[a:b] - t0, t1 - t0)


def join_stage_groups(tp_size: int, pp_size: int, rank: int, backend: str = "gloo") -> None:
    """The groups of the model's collectives (backend: rank_devices.model_backend), this rank's
    installed (parallel_state): with pipeline stages a two-rank group per hand-off (rank r of
    stage s to rank r + tp of s + 1; a broadcast in it can be polled, gloo's isend cannot) and
    each stage's tensor-parallel group for the layers' collectives; without, on NCCL, one group of
    every rank (on gloo the default group serves). Every rank enters every new_group call in the
    same order (torch.distributed requires it), right after joining the default group."""
    parallel_state.use_tp_group(None)
    parallel_state.use_stage_links(None, None)
    if pp_size == 1:
        if backend != "gloo" and tp_size > 1:  # the default group is gloo: CPU bytes only
            parallel_state.use_tp_group(dist.new_group(list(range(tp_size)), backend=backend))
        return
    links: list[dist.ProcessGroup | None] = [None, None]
    for sender in range((pp_size - 1) * tp_size):
        group = dist.new_group([sender, sender + tp_size], backend=backend)
        if rank in (sender, sender + tp_size):
            links[rank == sender] = group  # [from the previous stage, to the next]
    parallel_state.use_stage_links(*links)
    for stage in range(pp_size if tp_size > 1 else 0):
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(ranks, backend=backend)
        if rank in ranks:
            parallel_state.use_tp_group(group)


class PipelineStage:
    """One rank's part of each step: its micro-batches' hand-offs and the samples' broadcast."""

    def __init__(self, stage: StageLayers, rank: int, tp_size: int, pp_size: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.stage, self.pp_size = stage, pp_size
        self.rank, self.prev = rank, rank - tp_size  # the previous stage's rank of our tp rank
        self.sampler_rank = (pp_size - 1) * tp_size  # the last stage's tp rank 0
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, torch.device(device)
        # rank 0: why the group broke (RankGroup.failure), looked at while a message is awaited
        self.watch: Callable[[], str | None] | None = None

    def forward(self, model: nn.Module, inputs: StepInputs,
                scheduled: Sequence[tuple[RequestState, int]],
                kv_cache: KVCache) -> torch.Tensor | None:
        """This stage's layers over every micro-batch: the final-norm hidden states of the
        whole step [T, hidden] on the last stage, None on the others. Call before the
        requests' num_computed_tokens move."""
        counts = [n for _, n in scheduled]
        seq_lens = [s.num_computed_tokens + n for s, n in scheduled]
        finals: list[torch.Tensor] = []
        sends: list[tuple[dist.Work, torch.Tensor]] = []
        for mb in split_micro_batches(counts, self.pp_size):
            part = micro_batch_inputs(inputs, mb, counts, seq_lens)
            carried = None if self.stage.first else self._receive(len(mb.tokens))
            out = model(part.input_ids, part.positions, part.attn, kv_cache, carried=carried)
            if self.stage.last:
                finals.append(out)
            else:
                payload = torch.stack([out.hidden, out.residual])  # one message, not two
                link = parallel_state.stage_links()[1]
                sends.append((dist.broadcast(payload, self.rank, group=link, async_op=True),
                              payload))
        for work, _ in sends:  # the payloads stay alive until sent
            self._wait(work)
        if not finals:
            return None
        return finals[0] if len(finals) == 1 else torch.cat(finals)

    def _receive(self, num_tokens: int) -> Carried:
        payload = torch.empty(2, num_tokens, self.hidden_size, dtype=self.dtype,
                              device=self.device)  # on CUDA the hand-off is NCCL's, GPU to GPU
        link = parallel_state.stage_links()[0]
        self._wait(dist.broadcast(payload, self.prev, group=link, async_op=True))
        return Carried(payload[0], payload[1])

    def share_samples(self, sampled: SamplerOutput | None,
                      num_logprobs: Sequence[int]) -> HostSamplerOutput:
        """The last stage's sampled rows on every rank. sampled: the last stage's own (None on
        the other stages, which learn the shape from the plan: a row per num_logprobs)."""
        k = max(num_logprobs, default=-1)
        if sampled is not None:  # to the host: the default group is gloo (executor/rank_devices.py)
            packed = sampled.packed().cpu()
        else:  # token; its logprob when any row asks; the top k ids and logprobs
            packed = torch.empty(len(num_logprobs), 1 + (k >= 0) + 2 * max(k, 0),
                                 dtype=torch.float64)
        self._wait(dist.broadcast(packed, src=self.sampler_rank, async_op=True))
        return HostSamplerOutput.from_packed(packed.tolist(), k)

    def _wait(self, work: dist.Work) -> None:
        """Waits for a message; on rank 0, looking for dead ranks meanwhile (the message it
        awaits may never come: its sender may be stuck behind the dead rank)."""
        if self.watch is not None:
            next_look = 0.0
            while not work.is_completed():
                if time.monotonic() >= next_look:
                    dead = self.watch()
                    if dead is not None:
                        raise RuntimeError(f"{dead}: the executor cannot step; restart it")
                    next_look = time.monotonic() + WATCH_EVERY_S
                time.sleep(POLL_S)
        work.wait()  # raises what the message failed with
