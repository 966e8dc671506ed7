"""The shared-memory all-reduce / all-gather (executor/shm_allreduce.py) with 2 and 3 ranks as real
processes: every rank gets the plain-PyTorch sum of all ranks' tensors in rank order, bit for bit
(float32 in float32; bfloat16 summed in float32, rounded once), in one round or in slot-sized
chunks, over many consecutive calls whose round counters wrap; a rank that dies or never arrives
fails the others' call with an error naming it instead of a hang; and no file is left in /dev/shm.
Then the tensor-parallel executor itself: it runs on the segment, and unlinks it once joined."""

from __future__ import annotations

import glob
import hashlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.executor import shm_allreduce
from pagedserve.executor.shm_allreduce import ShmCommunicator, create_segment, unlink_segment
from tests.conftest import model_dir

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not shm_allreduce.supported(), reason="x86-64 only")]

SLOT = 4096  # a small slot, so that "larger than a slot" is cheap to test
# (shape, dtype, transposed): one element, odd shapes, exactly a slot, 3 slots and a bit, a view;
# float32 and bfloat16 are summed in C, float16 with torch ops
CASES = [((1,), torch.float32, False), ((7, 5), torch.float32, False),
         ((SLOT // 4,), torch.float32, False), ((3 * SLOT // 4 + 5,), torch.float32, False),
         ((33, 17), torch.float32, True), ((1,), torch.bfloat16, False),
         ((32, 48), torch.bfloat16, False), ((5 * SLOT // 2 + 3,), torch.bfloat16, False),
         ((9, 40), torch.bfloat16, True), ((7, 5), torch.float16, False),
         ((SLOT + 3,), torch.float16, False)]


def _part(shape: tuple[int, ...], dtype: torch.dtype, rank: int, call: int) -> torch.Tensor:
    """Rank `rank`'s tensor for call `call`: every rank can make every rank's. Magnitudes differ
    by rank so that the order of the additions shows in float32."""
    g = torch.Generator().manual_seed(7919 * call + rank)
    return (torch.randn(shape, generator=g) * 10.0 ** (rank - 1)).to(dtype)


def _reference(parts: list[torch.Tensor]) -> torch.Tensor:
    """parts[0] + parts[1] + ... in that order, in float32; rounded once to the parts' dtype."""
    acc = parts[0].float().clone()
    for p in parts[1:]:
        acc += p.float()
    return acc.to(parts[0].dtype)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


# ---- what each rank runs (module-level: spawned processes import them) ------------------------

def _sums(comm: ShmCommunicator) -> list[tuple[bool, str]]:
    out = []
    for call, (shape, dtype, transposed) in enumerate(CASES):
        mine = _part(shape, dtype, comm.rank, call)
        want = _reference([_part(shape, dtype, r, call) for r in range(comm.size)])
        if transposed:  # a non-contiguous view: reduced through a contiguous copy
            mine, want = mine.t(), want.t()
        comm.all_reduce(mine)
        out.append((torch.equal(mine, want), _digest(mine)))
    return out


def _gathers(comm: ShmCommunicator) -> list[bool]:
    out = []
    for call, (shape, dtype, _) in enumerate(CASES):
        got = comm.all_gather(_part(shape, dtype, comm.rank, call))
        out.append(all(torch.equal(g, _part(shape, dtype, r, call)) for r, g in enumerate(got)))
    return out


def _many_calls(comm: ShmCommunicator, calls: int) -> list[int]:
    """Consecutive calls, some ranks late now and then (the others run ahead into the other
    bank); returns the calls whose result was wrong."""
    wrong = []
    for call in range(calls):
        if call % 37 == comm.rank:
            time.sleep(0.002)
        x = torch.full((64,), float(100 * call + comm.rank))
        comm.all_reduce(x)
        if not torch.equal(x, torch.full((64,), float(sum(100 * call + r for r in range(comm.size))))):
            wrong.append(call)
    return wrong


def _one_dies(comm: ShmCommunicator, victim: int) -> str:
    for call in range(1000):
        if comm.rank == victim and call == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        comm.all_reduce(torch.ones(16))
    return "no error"


def _one_never_arrives(comm: ShmCommunicator, victim: int) -> str:
    if comm.rank == victim:
        time.sleep(3)
        return "slept"
    comm.all_reduce(torch.ones(16))
    return "no error"


SCENARIOS: dict[str, Callable[..., Any]] = {
    "sums": _sums, "gathers": _gathers, "many_calls": _many_calls, "one_dies": _one_dies,
    "one_never_arrives": _one_never_arrives}


def _worker(scenario: str, path: str, rank: int, size: int, timeout_s: float, kw: dict,
            results) -> None:
    torch.set_num_threads(1)
    comm = ShmCommunicator(path, rank, size, timeout_s)
    try:
        value: Any = SCENARIOS[scenario](comm, **kw)
    except Exception as e:
        value = f"{type(e).__name__}: {e}"
    finally:
        comm.close()
    results.put((rank, value))


def _run(scenario: str, size: int, *, first_round: int = 1, timeout_s: float = 60.0,
         reporting: int | None = None, **kw) -> dict[int, Any]:
    """Each rank's value from `scenario` in `size` spawned processes (`reporting` of them
    report: the others die or are waited for); the segment is gone afterwards."""
    path = create_segment(size, SLOT, first_round)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(scenario, path, r, size, timeout_s, kw, results))
             for r in range(size)]
    try:
        for p in procs:
            p.start()
        got = dict(results.get(timeout=120) for _ in range(size if reporting is None else reporting))
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        unlink_segment(path)
    assert not os.path.exists(path)
    return got


@pytest.mark.parametrize("size", [2, 3])
def test_all_reduce_is_the_rank_order_sum_on_every_rank(size):
    got = _run("sums", size)
    for rank in range(size):
        assert [ok for ok, _ in got[rank]] == [True] * len(CASES), (rank, got[rank])
        assert [d for _, d in got[rank]] == [d for _, d in got[0]]  # the same bytes everywhere


@pytest.mark.parametrize("size", [2, 3])
def test_all_gather_returns_every_rank_s_tensor(size):
    got = _run("gathers", size)
    assert got == {rank: [True] * len(CASES) for rank in range(size)}


@pytest.mark.parametrize("size", [2, 3])
def test_many_calls_across_the_round_counters_wrap(size):
    """1001 rounds starting 500 before 2**64: the counters wrap to 0 half-way."""
    got = _run("many_calls", size, first_round=2**64 - 500, calls=1001)
    assert got == {rank: [] for rank in range(size)}


@pytest.mark.parametrize(("size", "victim"), [(2, 1), (2, 0), (3, 2)])
def test_a_rank_that_dies_fails_the_others_naming_it(size, victim):
    start = time.monotonic()
    got = _run("one_dies", size, reporting=size - 1, victim=victim)
    assert time.monotonic() - start < 60
    for rank, message in got.items():
        assert rank != victim
        assert message.startswith(f"RankDied: tensor-parallel rank {victim} died"), message


def test_a_rank_that_never_arrives_times_out_naming_it():
    got = _run("one_never_arrives", 2, timeout_s=0.5, victim=1)
    assert got[1] == "slept"
    assert got[0].startswith("CollectiveError: tensor-parallel rank(s) [1] did not reach"), got[0]


def test_a_segment_for_other_ranks_is_refused():
    path = create_segment(2, SLOT)
    try:
        with pytest.raises(ValueError, match="3 ranks"):
            ShmCommunicator(path, 0, 3)
    finally:
        unlink_segment(path)


def _own_segments() -> list[str]:
    return glob.glob(f"/dev/shm/pagedserve-tp-{os.getpid()}-*")


def test_the_executor_all_reduces_in_shared_memory_and_leaves_no_file():
    """TP=2 runs on the segment (the other TP tests check its tokens against one rank), the file
    is unlinked once the ranks joined, and a killed rank is named by the next step."""
    params = SamplingParams(max_tokens=4, temperature=0)
    with LLM(str(model_dir("llama", "micro")), dtype="float32", tensor_parallel_size=2,
             num_kv_blocks=16) as llm:
        assert llm.executor.ranks.shm is not None
        assert _own_segments() == []
        llm.generate(["def f(x):"], params)
        proc = llm.executor.ranks.procs[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        with pytest.raises(RuntimeError, match="tensor-parallel rank 1 died"):
            llm.generate(["def f(x):"], params)
    assert _own_segments() == []


def test_gloo_is_used_when_shared_memory_is_turned_off(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_DISABLE_SHM_ALLREDUCE", "1")
    params = SamplingParams(max_tokens=6, temperature=0)
    path = str(model_dir("llama", "micro"))
    with LLM(path, dtype="float32", tensor_parallel_size=2, num_kv_blocks=16) as llm:
        assert llm.executor.ranks.shm is None
        gloo = llm.generate(["def f(x):"], params)[0].outputs[0].token_ids
    monkeypatch.delenv("PAGEDSERVE_DISABLE_SHM_ALLREDUCE")
    with LLM(path, dtype="float32", tensor_parallel_size=2, num_kv_blocks=16) as llm:
        assert gloo == llm.generate(["def f(x):"], params)[0].outputs[0].token_ids
