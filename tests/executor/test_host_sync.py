"""Host synchronisation per step: the sampler and the executor's step read the device once.

On CUDA the host waits for all queued GPU work whenever it reads a device value (item, tolist,
cpu, nonzero, bool() / int() of a tensor, boolean-mask indexing) or copies to the device from
pageable memory (torch.tensor(..., device=cuda), indexing a device tensor with a Python list).
On the CPU nothing waits, but the same calls can be counted: a TorchFunctionMode records every
call that would sync on CUDA, and a step may make one, the read of its packed results.

The CUDA-only test counts the real thing with torch.cuda.set_sync_debug_mode.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pagedserve.executor import sampler as sampler_module
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.executor import Executor
from pagedserve.executor.request_state import RequestState
from pagedserve.executor.sampler import Sampler
from pagedserve.protos import executor_pb2
from tests.conftest import model_dir
from tests.executor.harness import Harness

READS = {"item", "tolist", "cpu", "cuda", "__bool__", "__int__", "__float__", "__index__",
         "is_nonzero", "equal", "allclose", "nonzero", "argwhere", "masked_select", "unique",
         "unique_consecutive"}
# .numpy() is left out on purpose: on a CUDA tensor it raises rather than syncs, so it only ever
# reads host memory (the sampler uses it on its CPU generator's draws).


class SyncPoints(TorchFunctionMode):
    """Records the calls that would make the host wait for the device on CUDA.

    syncs: the names of those calls, in order. host_tensors: tensors made from Python data
    (torch.tensor / as_tensor), each one a host-to-device copy when the target is a GPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.host_tensors = 0
        self._paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused, was = True, self._paused
        try:
            yield
        finally:
            self._paused = was

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._paused:
            self._record(getattr(func, "__name__", ""), args, kwargs)
        return func(*args, **kwargs)

    def _record(self, name: str, args: tuple, kwargs: dict) -> None:
        if name in READS:
            self.syncs.append(name)
        elif name in ("tensor", "as_tensor"):
            self.host_tensors += 1
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and _syncing_index(args[1]):
            self.syncs.append(f"{name} with a mask or list")
        elif name == "to" and _blocking_copy(args, kwargs):
            self.syncs.append(f"{name}(device) blocking")


def _syncing_index(index) -> bool:
    """A boolean mask (its nonzero is a read) or a Python list (copied to the device, blocking)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, list) or (isinstance(p, torch.Tensor) and p.dtype == torch.bool)
               for p in parts)


def _blocking_copy(args: tuple, kwargs: dict) -> bool:
    """.to(device) without non_blocking: on CUDA a sync in either direction (from pageable host
    memory to the device as well)."""
    if kwargs.get("non_blocking") or any(a is True for a in args[1:]):
        return False
    return any(isinstance(t, (str, torch.device)) for t in (*args[1:], kwargs.get("device")))


# ---- the sampler alone --------------------------------------------------------------------------

V = 256
EOS = (1, 3)


def req(output=(), **sampling) -> RequestState:
    return RequestState("r", [5, 6, 7], list(output), executor_pb2.SamplingParams(**sampling), [], 0)


def count_step(requests: list[RequestState], seed: int = 0) -> SyncPoints:
    """Metadata, sampling and the read of the results, as the executor does them, counted."""
    sampler = Sampler(seed)
    logits = torch.randn(len(requests), V, generator=torch.Generator().manual_seed(seed))
    width = max(r.num_tokens for r in requests)
    table = torch.zeros(len(requests), width, dtype=torch.int64)  # the executor's token table
    for i, r in enumerate(requests):
        table[i, : r.num_tokens] = torch.tensor(r.prompt_token_ids + r.output_token_ids)
    with SyncPoints() as points:
        md = sampler.metadata(requests, vocab_size=V, eos_token_ids=EOS, device="cpu",
                              token_ids=lambda: table)
        sampler(logits, md).to_host()
    return points


def test_a_greedy_batch_reads_the_device_once_and_uploads_nothing():
    points = count_step([req(), req(temperature=0.0, output=[4]), req(top_k=5), req(top_p=0.5)])
    assert points.syncs == ["tolist"]
    assert points.host_tensors == 0  # greedy rows need no parameters on the device


MIXED = [
    dict(),  # greedy
    dict(temperature=0.8, seed=7),
    dict(temperature=1.0),  # unseeded: its seed comes from the sampler's generator
    dict(temperature=0.7, top_k=5, min_p=0.05),
    dict(temperature=1.2, top_p=0.6, seed=2**63 + 1),
    dict(temperature=0.9, top_k=20, top_p=0.9, logprobs=3),
    dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2, logprobs=0),
    dict(temperature=1.0, logit_bias={9: 2.0, 10: -1.0}, min_tokens=4, stop_token_ids=[11]),
]


def test_a_mixed_batch_reads_the_device_once_and_uploads_once_per_dtype():
    requests = [req(output=[4, 8, 4][: i % 4], **p) for i, p in enumerate(MIXED)]
    points = count_step(requests)
    assert points.syncs == ["tolist"]
    assert points.host_tensors <= 2  # the int64 pack and the float32 pack


def test_every_row_random_reads_once():
    points = count_step([req(temperature=1.0, top_k=3), req(temperature=0.5, top_p=0.8, seed=1)])
    assert points.syncs == ["tolist"]


# ---- the executor's step ------------------------------------------------------------------------


class _ForwardUncounted:
    """The model with its forward left out of the count: on the CPU the attention kernels take
    sequence lengths as host ints by design; on CUDA the Triton kernels read them on the device
    (the CUDA test below counts the whole step)."""

    def __init__(self, model: torch.nn.Module):
        self._model = model
        self.points = SyncPoints()

    def __call__(self, *args, **kwargs):
        with self.points.paused():
            return self._model(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def _requests(harness: Harness, *, chunked: bool) -> None:
    prompts = [[(7 * i + j) % 200 + 2 for j in range(9 + 5 * i)] for i in range(len(MIXED))]
    for i, (prompt, p) in enumerate(zip(prompts, MIXED)):
        harness.add(f"mixed{i}", prompt, executor_pb2.SamplingParams(**p), max_tokens=4,
                    chunk_sizes=6 if chunked and i % 3 == 0 else None)
    for i in range(3):
        harness.add(f"greedy{i}", prompts[i], executor_pb2.SamplingParams(), max_tokens=4)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole-prompts", "prompt-chunks"])
def test_each_executor_step_reads_the_device_once(tiny_llama, monkeypatch, chunked):
    """Prefill, decode and (chunked) steps where only some requests sample: one read per step
    that samples, none for a step that does not."""
    # Top-p's shortcut on the CPU (look among the best tokens, then ask which rows fell short)
    # reads host memory there; on a GPU every row is sorted whole, as here where the candidates
    # cover the vocabulary.
    monkeypatch.setattr(sampler_module, "TOP_P_CANDIDATES", 1 << 30)
    ex = Executor(ExecutorConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=64))
    harness = Harness(ex)
    _requests(harness, chunked=chunked)
    model = _ForwardUncounted(ex.model)
    monkeypatch.setattr(ex, "model", model)
    steps = []
    while harness.requests:
        with SyncPoints() as model.points:
            result = harness.step()
        steps.append((len(result.outputs), model.points.syncs, model.points.host_tensors))
    assert any(0 < n < len(MIXED) + 3 for n, _, _ in steps) == chunked  # some rows sample, not all
    for n, syncs, host_tensors in steps:
        assert syncs == (["tolist"] if n else []), steps
        assert host_tensors <= 3, steps  # two packs, and the sampling rows' index when partial


# ---- on a GPU -----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_each_step_syncs_once_on_cuda():
    """The real count: torch's sync debug mode warns at every synchronising CUDA call."""
    ex = Executor(ExecutorConfig(model=str(model_dir("llama")), dtype="float32", device="cuda",
                                 num_kv_blocks=64))
    harness = Harness(ex)
    _requests(harness, chunked=True)
    for _ in range(2):  # compiles, first pinned allocations
        harness.step()
    counts = []
    while harness.requests:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = harness.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        where = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
        counts.append((len(result.outputs), len(where), where))
    assert len(counts) >= 3
    for n, syncs, _ in counts:
        assert syncs == (1 if n else 0), counts
