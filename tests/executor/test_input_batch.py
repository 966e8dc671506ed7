"""InputBatch: one step's flat inputs, checked against a per-token Python loop on the CPU; on CUDA,
the staging buffers a pending copy still reads are never rewritten, and what a device buffer holds
past the step's live entries is padding (slot -1, length 0), as replayed CUDA graphs will need."""

from __future__ import annotations

import random

import pytest
import torch

from pagedserve.executor.input_batch import InputBatch
from pagedserve.executor.request_state import RequestState
from pagedserve.protos import executor_pb2

BLOCK = 4


def _state(rid: str, prompt: list[int], computed: int, first_block: int) -> RequestState:
    num_blocks = -(-len(prompt) // BLOCK)
    return RequestState(rid, prompt, [], executor_pb2.SamplingParams(),
                        list(range(first_block, first_block + num_blocks)), computed)


def _batch(device: str) -> InputBatch:
    return InputBatch(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64,
                      block_size=BLOCK, device=device)


def _expected(states: list[RequestState], sched: list[int]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"input_ids": [], "positions": [], "slot_mapping": []}
    for s, n in zip(states, sched):
        for p in range(s.num_computed_tokens, s.num_computed_tokens + n):
            out["input_ids"].append(s.prompt_token_ids[p])
            out["positions"].append(p)
            out["slot_mapping"].append(s.block_ids[p // BLOCK] * BLOCK + p % BLOCK)
    return out


def _random_step(rng: random.Random, batch: InputBatch, tag: str) -> tuple[list, list[int]]:
    states, sched, block = [], [], 0
    for i in range(rng.randint(1, 5)):
        prompt = [rng.randrange(1000) for _ in range(rng.randint(1, 20))]
        computed = rng.randrange(len(prompt))
        states.append(_state(f"{tag}{i}", prompt, computed, block))
        block += len(states[-1].block_ids)
        sched.append(rng.randint(1, len(prompt) - computed))
        batch.add(states[-1])
    return states, sched


def test_prepare_matches_a_per_token_loop() -> None:
    rng = random.Random(0)
    batch = _batch("cpu")
    for step in range(20):
        states, sched = _random_step(rng, batch, f"s{step}-")
        got = batch.prepare(states, sched)
        want = _expected(states, sched)
        assert got.input_ids.tolist() == want["input_ids"]
        assert got.positions.tolist() == want["positions"]
        assert got.attn.slot_mapping.tolist() == want["slot_mapping"]
        lens = [s.num_computed_tokens + n for s, n in zip(states, sched)]
        assert got.attn.seq_lens.tolist() == lens
        for i, s in enumerate(states):
            needed = -(-lens[i] // BLOCK)
            assert got.attn.block_tables[i, :needed].tolist() == s.block_ids[:needed]
        for s in states:
            batch.remove(s)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
def test_a_pending_upload_reads_its_own_step() -> None:
    """Step A's copies wait behind a busy stream while step B is prepared: A must still get A."""
    rng = random.Random(1)
    batch = _batch("cuda")
    a_states, a_sched = _random_step(rng, batch, "a")
    b_states, b_sched = _random_step(rng, batch, "b")
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued ahead of A's copies
    a = batch.prepare(a_states, a_sched)
    a_ids = a.input_ids.clone()  # runs in stream order: after A's copy, before B's
    a_slots = a.attn.slot_mapping.clone()
    batch.prepare(b_states, b_sched)
    torch.cuda.synchronize()
    want = _expected(a_states, a_sched)
    assert a_ids.tolist() == want["input_ids"]
    assert a_slots.tolist() == want["slot_mapping"]


@pytest.mark.cuda
@cuda
def test_device_buffers_hold_padding_past_a_smaller_step() -> None:
    rng = random.Random(2)
    batch = _batch("cuda")
    big, big_sched = _random_step(rng, batch, "big")
    batch.prepare(big, big_sched)
    for s in big[1:]:
        batch.remove(s)
    small = batch.prepare(big[:1], [1])
    torch.cuda.synchronize()
    dev = batch._dev
    extent = batch._dirty
    assert (dev["slot_mapping"][1:extent["slot_mapping"]] == -1).all()
    assert (dev["seq_lens"][1:extent["seq_lens"]] == 0).all()
    assert (dev["cu_seqlens_q"][1:extent["cu_seqlens_q"]] == 1).all()
    assert small.attn.block_tables.shape == (1, batch.max_blocks_per_seq)


@pytest.mark.cuda
@cuda
def test_long_prompt_in_chunks_gives_the_tokens_of_one_chunk() -> None:
    """A prompt of several chunks makes steps in a row that sample nothing (no sync between them),
    the case where a rewritten staging buffer could corrupt the KV cache."""
    from pagedserve import LLM, SamplingParams
    from tests.conftest import model_dir

    prompt = {"prompt_token_ids": [random.Random(3).randrange(1, 2000) for _ in range(1900)]}
    params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8)
    tokens = []
    for budget in (128, 2048):
        llm = LLM(model_dir("llama"), dtype="float32", device="cuda", max_model_len=2048,
                  max_num_batched_tokens=budget, num_kv_blocks=256)
        tokens.append(llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids)
        del llm
    assert tokens[0] == tokens[1]
