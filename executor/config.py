"""The executor's configuration: one frozen object, validated once, ValueError naming the field."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pagedserve.executor.quantization.config import method_name
from pagedserve.executor.rank_devices import check_gpu_count, is_cuda

DTYPE_NAMES = ("auto", "float32", "fp32", "float", "bfloat16", "bf16", "float16", "fp16", "half")
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
MODEL_IMPLS = ("auto", "native", "transformers")  # executor/models/impl.py says what each means
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8")  # executor/kv_cache.py says what each stores
DISTRIBUTED_EXECUTOR_BACKENDS = ("mp", "ray")  # executor/rank_launch.py says what each does
_KV_DTYPE_ALIASES = {"bf16": "bfloat16", "fp8_e4m3": "fp8", "float8_e4m3fn": "fp8"}
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ExecutorConfig:
    model: str  # an HF-format model directory
    dtype: str | None = "auto"  # None or "auto": the checkpoint's, adjusted to the device
    device: str = "cpu"  # cpu, cuda or cuda:N
    block_size: int = 16  # tokens per KV block: a power of two in [8, 128]
    num_kv_blocks: int | None = None  # an explicit count overrides kv_cache_memory_bytes
    # KV cache budget. None: 1 GiB on the CPU; on CUDA 90% of the memory free after loading weights
    # (not yet a measured activation profile). With tensor_parallel_size N: all N ranks' together.
    kv_cache_memory_bytes: int | None = None
    # auto: the model's dtype; bfloat16 (a float32 model on a CPU without native bf16: half the
    # bytes) or fp8 (e4m3 with per-layer scales: a quarter of float32's); executor/kv_cache.py
    kv_cache_dtype: str = "auto"
    max_num_batched_tokens: int = 2048  # tokens computed in one step, at most
    max_num_seqs: int = 256  # requests held at once (and so scheduled in one step), at most
    max_model_len: int | None = None  # prompt + output, at most; None: max_position_embeddings
    seed: int = 0  # for unseeded requests' randomness
    # auto: the native class when the architecture has one, else transformers' modeling code on
    # pagedserve's attention; native or transformers force one (executor/models/impl.py).
    model_impl: str = "auto"
    trust_remote_code: bool = False  # run modeling code shipped with the checkpoint (auto_map)
    # auto: the checkpoint's own quantized format (config.json's quantization_config), if any;
    # awq, gptq, compressed-tensors or fp8: the format it must be in (executor/quantization/)
    quantization: str = "auto"
    # speculative decoding's draft model (speculative_config.model of method draft_model): a
    # model directory or GGUF file with the target's vocabulary (executor/draft_model.py)
    draft_model: str | None = None
    # every token's logits independent of what shares its step and how its prompt was chunked,
    # so a recomputed request ends as the undisturbed one did (executor/batch_invariance.py)
    batch_invariant: bool = False
    # ranks the model is split over (executor/tensor_parallel.py): heads, MLP and vocabulary
    # sharded, one process per rank; on CUDA one GPU each (executor/rank_devices.py)
    tensor_parallel_size: int = 1
    # stages the layers are cut into (executor/pipeline_parallel.py), each tensor_parallel_size
    # ranks: world size tp x pp, rank = stage * tensor_parallel_size + tensor-parallel rank
    pipeline_parallel_size: int = 1
    # how ranks 1..N-1 start (executor/rank_launch.py): mp, child processes on this machine; ray,
    # Ray actors in a placement group on the existing cluster at ray_address ("auto": RAY_ADDRESS,
    # else the local one, as ray.init finds it)
    distributed_executor_backend: str = "mp"
    ray_address: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.model, Path):
            object.__setattr__(self, "model", str(self.model))
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model: must be a non-empty path, got {self.model!r}")
        if self.dtype is not None and (not isinstance(self.dtype, str)
                                       or self.dtype.removeprefix("torch.").lower() not in DTYPE_NAMES):
            raise ValueError(f"dtype: must be one of {DTYPE_NAMES} or None, got {self.dtype!r}")
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise ValueError(f"device: must be cpu, cuda or cuda:N, got {self.device!r}")
        bs = self.block_size
        if not _is_int(bs) or not (8 <= bs <= 128 and bs & (bs - 1) == 0):
            raise ValueError(f"block_size: must be a power of two in [8, 128], got {bs!r}")
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            _check_positive(name, getattr(self, name))
        for name in ("num_kv_blocks", "kv_cache_memory_bytes", "max_model_len"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        object.__setattr__(self, "kv_cache_dtype", kv_cache_dtype_name(self.kv_cache_dtype))
        if self.model_impl not in MODEL_IMPLS:
            raise ValueError(f"model_impl: must be one of {MODEL_IMPLS}, got {self.model_impl!r}")
        object.__setattr__(self, "quantization", method_name(self.quantization))
        if not isinstance(self.trust_remote_code, bool):
            raise ValueError(f"trust_remote_code: must be a bool, got {self.trust_remote_code!r}")
        if isinstance(self.draft_model, Path):
            object.__setattr__(self, "draft_model", str(self.draft_model))
        if self.draft_model is not None and (not isinstance(self.draft_model, str)
                                             or not self.draft_model):
            raise ValueError(f"draft_model: must be a non-empty path or None, "
                             f"got {self.draft_model!r}")
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"batch_invariant: must be a bool, got {self.batch_invariant!r}")
        if self.batch_invariant and not self.device.startswith("cpu"):
            raise ValueError(f"batch_invariant: supported on the CPU only, not {self.device!r}")
        _check_positive("tensor_parallel_size", self.tensor_parallel_size)
        if self.tensor_parallel_size > 1:
            self._check_ranks("tensor_parallel_size", self.tensor_parallel_size)
        _check_positive("pipeline_parallel_size", self.pipeline_parallel_size)
        if self.pipeline_parallel_size > 1:
            self._check_ranks("pipeline_parallel_size", self.pipeline_parallel_size)
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed: must be a non-negative integer, got {self.seed!r}")
        if self.distributed_executor_backend not in DISTRIBUTED_EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend: must be one of "
                             f"{DISTRIBUTED_EXECUTOR_BACKENDS}, got "
                             f"{self.distributed_executor_backend!r}")
        if not isinstance(self.ray_address, str) or not self.ray_address:
            raise ValueError(f"ray_address: must be 'auto' or host:port, got {self.ray_address!r}")
        self._check_gpus()

    @property
    def world_size(self) -> int:
        """Executor ranks in all: tensor_parallel_size x pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def _check_ranks(self, field: str, size: int) -> None:
        """What several ranks (tensor_parallel_size or pipeline_parallel_size) cannot run."""
        if self.draft_model is not None:
            raise ValueError(f"{field}: {size} with a draft model is not supported "
                             f"(speculative_config.method draft_model needs {field} 1)")
        if self.batch_invariant:
            raise ValueError(f"{field}: {size} with batch_invariant is not supported")
        if self.quantization not in ("auto", "dequantize"):
            raise ValueError(f"{field}: {size} with quantization "
                             f"{self.quantization!r} is not supported (dense weights only)")

    def _check_gpus(self) -> None:
        """Under mp every rank runs on this machine, one GPU each: enough must be here. Under ray
        the placement group finds them (on this node or others)."""
        if self.world_size > 1 and is_cuda(self.device) and self.distributed_executor_backend == "mp":
            import torch  # here: the config module itself loads without torch

            check_gpu_count(self.device, self.tensor_parallel_size, self.pipeline_parallel_size,
                            torch.cuda.device_count())


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive(name: str, value: object) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def kv_cache_dtype_name(name: object) -> str:
    """The canonical --kv-cache-dtype name (aliases bf16, fp8_e4m3); ValueError otherwise."""
    canonical = _KV_DTYPE_ALIASES.get(name, name) if isinstance(name, str) else None
    if canonical not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: must be one of {KV_CACHE_DTYPES}, got {name!r}")
    return canonical
