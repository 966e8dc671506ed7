"""Several ranks on CUDA (executor/rank_devices.py): which rank runs on which device, which
torch.distributed backend carries what, the refusal when there are too few GPUs, and the
launchers' share; all decided without a GPU. The last test runs TP=2 / PP=2 on two GPUs when the
machine has them (scripts/gpu_check.sh)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.executor import parallel_state, pipeline_parallel, rank_launch
from pagedserve.executor import tensor_parallel as tp_module
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.executor import Executor
from pagedserve.executor.rank_devices import (
    check_gpu_count,
    model_backend,
    physical_gpu,
    rank_device,
)
from tests.conftest import model_dir
from tests.executor.same_outputs import assert_same_outputs

# ---- the decisions -------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "rank", "world", "own_gpu", "want"), [
    ("cpu", 3, 4, False, "cpu"),
    ("cuda", 0, 1, False, "cuda"),  # one rank: the device as given, as before
    ("cuda:1", 0, 1, False, "cuda:1"),
    ("cuda", 0, 2, False, "cuda:0"),
    ("cuda", 1, 2, False, "cuda:1"),
    ("cuda:2", 0, 4, False, "cuda:2"),
    ("cuda:2", 3, 4, False, "cuda:5"),
    ("cuda:1", 2, 4, True, "cuda:0"),  # a Ray actor sees its own GPU only
])
def test_each_rank_gets_its_own_gpu_from_the_base_index(device, rank, world, own_gpu, want):
    assert rank_device(device, rank, world, own_gpu=own_gpu) == want


def test_model_collectives_are_nccl_on_cuda_only():
    assert model_backend("cpu") == "gloo"
    assert model_backend("cuda") == model_backend("cuda:3") == "nccl"


@pytest.mark.parametrize(("device", "tp", "pp", "count", "ok"), [
    ("cuda", 2, 1, 2, True),
    ("cuda", 2, 1, 1, False),
    ("cuda", 1, 2, 1, False),
    ("cuda", 2, 2, 3, False),
    ("cuda:1", 2, 1, 2, False),  # cuda:1 and cuda:2
    ("cuda:1", 2, 1, 3, True),
    ("cuda", 1, 1, 0, True),  # one rank: torch itself says whether the GPU is there
    ("cpu", 4, 1, 0, True),
])
def test_too_few_gpus_are_refused_naming_both_sizes(device, tp, pp, count, ok):
    if ok:
        check_gpu_count(device, tp, pp, count)
        return
    with pytest.raises(ValueError, match=rf"tensor_parallel_size {tp} x pipeline_parallel_size "
                                         rf"{pp}.*device_count\(\) is {count}"):
        check_gpu_count(device, tp, pp, count)


@pytest.mark.parametrize("field", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_the_config_checks_this_machines_gpus_under_mp(monkeypatch, field):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=f"{field} 2.*one GPU each"):
        ExecutorConfig(model="m", device="cuda", **{field: 2})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ExecutorConfig(model="m", device="cuda", **{field: 2}).world_size == 2
    # under ray the placement group finds the GPUs, on other nodes too
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    ExecutorConfig(model="m", device="cuda", distributed_executor_backend="ray", **{field: 2})


def test_what_cannot_run_on_several_ranks_is_still_refused_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="batch_invariant: supported on the CPU only"):
        ExecutorConfig(model="m", device="cuda", tensor_parallel_size=2, batch_invariant=True)
    with pytest.raises(ValueError, match="tensor_parallel_size: 2 with a draft model"):
        ExecutorConfig(model="m", device="cuda", tensor_parallel_size=2, draft_model="d")


# ---- which group carries what --------------------------------------------------------------------


@pytest.fixture
def new_groups(monkeypatch) -> list[tuple[list[int], str]]:
    """dist.new_group recorded: each call's (ranks, backend); the group returned is that tuple."""
    calls: list[tuple[list[int], str]] = []

    def new_group(ranks, backend=None):
        calls.append((list(ranks), backend))
        return calls[-1]

    monkeypatch.setattr(pipeline_parallel.dist, "new_group", new_group)
    yield calls
    parallel_state.use_tp_group(None)
    parallel_state.use_stage_links(None, None)


def test_cpu_tensor_parallel_uses_the_default_gloo_group(new_groups):
    pipeline_parallel.join_stage_groups(2, 1, 1, model_backend("cpu"))
    assert new_groups == [] and parallel_state._tp_group is None


def test_cuda_tensor_parallel_all_reduces_over_an_nccl_group_of_every_rank(new_groups):
    pipeline_parallel.join_stage_groups(2, 1, 1, model_backend("cuda"))
    assert new_groups == [([0, 1], "nccl")]
    assert parallel_state._tp_group == ([0, 1], "nccl")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_stage_hand_offs_and_stage_groups_take_the_devices_backend(new_groups, device):
    backend = model_backend(device)
    pipeline_parallel.join_stage_groups(2, 2, 3, backend)  # rank 3: stage 1, tp rank 1
    assert new_groups == [([0, 2], backend), ([1, 3], backend),  # hand-offs
                          ([0, 1], backend), ([2, 3], backend)]  # each stage's tp group
    assert parallel_state.stage_links() == (([1, 3], backend), None)
    assert parallel_state._tp_group == ([2, 3], backend)


def test_the_samples_broadcast_is_a_host_tensor_on_the_default_group(monkeypatch):
    """On CUDA the last stage's samples leave the GPU before gloo carries them."""
    sent = []

    class Work:
        def is_completed(self) -> bool:
            return True

        def wait(self) -> None:
            pass

    def broadcast(t, src, group=None, async_op=False):
        sent.append((t.device.type, src, group))
        if t is not packed:  # a receiving rank's buffer (torch.empty): filled as gloo would
            t.copy_(packed)
        return Work()

    monkeypatch.setattr(pipeline_parallel.dist, "broadcast", broadcast)
    stage = pipeline_parallel.PipelineStage(SimpleNamespace(), 2, 1, 3, 8, torch.float32, "cpu")
    packed = torch.tensor([[5.0]], dtype=torch.float64)
    sampled = SimpleNamespace(packed=lambda: packed)
    assert stage.share_samples(sampled, [-1]).token_ids == [5]
    assert stage.share_samples(None, [-1]).token_ids == [5]
    assert sent == [("cpu", 2, None), ("cpu", 2, None)]


def test_plan_messages_go_over_the_default_group(monkeypatch):
    groups = []
    monkeypatch.setattr(tp_module.dist, "broadcast",
                        lambda t, src, **kw: groups.append(kw.get("group")))
    tp_module.send_message(torch.zeros(tp_module.HEADER_BYTES, dtype=torch.uint8), b"plan")
    assert groups == [None]


@pytest.mark.parametrize(("device", "segment"), [("cpu", True), ("cuda", False)])
def test_the_shared_memory_all_reduce_is_for_cpu_tensors_only(monkeypatch, tmp_path, device,
                                                              segment):
    made = []
    monkeypatch.setattr(tp_module.shm_allreduce, "supported", lambda: True)
    monkeypatch.setattr(tp_module.shm_allreduce, "create_segment",
                        lambda size: made.append(size) or str(tmp_path / "seg"))
    monkeypatch.setattr(tp_module, "ShmCommunicator", lambda *a: "shm")
    monkeypatch.delenv(tp_module.ENV_DISABLE_SHM, raising=False)
    stored = {}
    group = object.__new__(tp_module.RankGroup)
    group.config = SimpleNamespace(device=device, pipeline_parallel_size=1)
    group.launcher = SimpleNamespace(all_on_this_node=lambda: True)
    group.store = SimpleNamespace(set=stored.__setitem__)
    group.size, group.shm, group._segment = 2, None, None
    group._open_segment()
    assert bool(made) == segment and bool(stored[tp_module.SEGMENT_KEY]) == segment


def test_rank_0_plans_with_the_smallest_pool(monkeypatch):
    """On CUDA each rank sizes its KV pool from its own GPU's free memory."""
    ex = object.__new__(Executor)
    ex.config = SimpleNamespace(block_size=16, max_model_len=None)
    ex.num_kv_blocks, ex.max_model_len = 100, 1600
    ex._agree_kv_blocks([120, 90])
    assert (ex.num_kv_blocks, ex.max_model_len) == (90, 1440)
    ex._agree_kv_blocks([])
    assert ex.num_kv_blocks == 90


# ---- the launchers -------------------------------------------------------------------------------


def test_mp_ranks_see_every_gpu(monkeypatch):
    """No per-rank CUDA_VISIBLE_DEVICES: rank r takes cuda:(base + r) of the same GPUs."""
    envs = []

    class Popen:
        def __init__(self, cmd, pass_fds, env, stdin):
            envs.append(env)

    monkeypatch.setattr(rank_launch.subprocess, "Popen", Popen)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    launcher = rank_launch.MpLauncher()
    launcher.start(ExecutorConfig(model="m", device="cuda", tensor_parallel_size=2), 2, 1, 1)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2,3"]
    launcher.procs = []
    launcher.stop(graceful=False)


def test_a_ray_rank_holds_one_gpu_and_may_not_share_rank_0s(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cfg = ExecutorConfig(model="m", device="cuda", tensor_parallel_size=2,
                         distributed_executor_backend="ray")
    assert rank_launch._bundle(cfg, 4) == {"GPU": 1.0, "CPU": 1.0}
    assert physical_gpu(1, None) == "1" and physical_gpu(1, "4, 6") == "6"
    here = {"node_id": "a", "gpu_ids": ["0"]}
    with pytest.raises(RuntimeError, match="rank 1: Ray gave it GPU 0"):
        rank_launch.check_gpu_clash(1, here, "a", "0")
    rank_launch.check_gpu_clash(1, here, "a", "1")  # another GPU of this node
    rank_launch.check_gpu_clash(1, here, "b", "0")  # GPU 0 of another node
    rank_launch.check_gpu_clash(1, here, "a", None)  # the CPU


# ---- on two GPUs ---------------------------------------------------------------------------------

PROMPTS = ["def hello(x):", "import os\nimport sys\n", "class Foo:\n    def __init__(self"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, logprobs=3)
GPU_LOGPROB_TOL = 1e-3  # float32 (TF32 off by default in matmuls); the all-reduce's order differs


def _generate(**kw) -> list:
    with LLM(str(model_dir("llama", "tiny")), dtype="float32", device="cuda", num_kv_blocks=128,
             **kw) as llm:
        return [o.outputs[0] for o in llm.generate(PROMPTS, [GREEDY] * len(PROMPTS))]


@pytest.mark.cuda
@pytest.mark.timeout(300)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("kw", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}],
                         ids=["tp2", "pp2"])
def test_two_gpus_give_the_greedy_tokens_of_one(kw):
    assert_same_outputs(_generate(), _generate(**kw), GPU_LOGPROB_TOL)
