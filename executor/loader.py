"""Loading an HF-format model directory: config.json plus safetensors weights, either one
model.safetensors or shards listed by model.safetensors.index.json; or a GGUF file (or a directory
holding one), which gguf_loader.py turns into the same config and HF-named tensors.

Weights are only ever read with safetensors (never torch.load / pickle). The model is built directly
in its final dtype and device, then each checkpoint tensor is handed to its parameter's
weight_loader, which checks the shape and copies (casting if the checkpoint dtype differs).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog
import torch
from safetensors import safe_open
from torch import nn

from pagedserve.executor.backend import select_backend
from pagedserve.executor.gguf_loader import GGUFCheckpoint, find_gguf
from pagedserve.executor.layers.cpu_gemm import pack_for_cpu
from pagedserve.executor.layers.quant_weights import finish_quantized
from pagedserve.executor.model_config import ModelConfig
from pagedserve.executor.models import get_model_class
from pagedserve.executor.models.impl import choose_model_impl, config_dtype, read_config
from pagedserve.executor.models.pipeline_stage import StageLayers
from pagedserve.executor.models.transformers_loader import load_transformers_model
from pagedserve.executor.models.transformers_probe import UnsupportedModel
from pagedserve.executor.parallel_state import pipeline_parallel, tensor_parallel
from pagedserve.executor.quantization import QuantSpec, quantized_reader, read_quantization
from pagedserve.executor.quantization.config import DEQUANTIZE, method_name
from pagedserve.executor.tensor_parallel import check_model
from pagedserve.kernels.quantized import QuantizedWeight

log = structlog.get_logger("pagedserve.executor.loader")

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bf16 GEMMs natively (oneDNN's check: AVX-512 / AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _to_dtype(value: str | torch.dtype, what: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ValueError(
                f"{what}: unsupported dtype {value}; choose from bfloat16, float16, float32"
            )
        return value
    name = value.removeprefix("torch.").lower()
    if name not in DTYPES:
        raise ValueError(
            f"{what}: unsupported dtype {value!r}; choose from auto, bfloat16, float16, float32"
        )
    return DTYPES[name]


def resolve_dtype(
    config_dtype: str | None, override: str | torch.dtype | None, device: torch.device | str
) -> torch.dtype:
    """The dtype weights and activations run in.

    An explicit override ("bfloat16", "float16", "float32" or a torch dtype) always wins. None or
    "auto" means the checkpoint's dtype (float32 when config.json names none), adjusted to the
    device:
      - CPU: bf16 where the CPU has native bf16 (its matrix units run bf16 about 3x faster than
        float32), else float32, whatever the checkpoint's dtype. fp16 is never chosen on the CPU:
        its GEMMs are emulated and slow there. Pass dtype="float32" for exact float32 results.
      - CUDA, bf16 checkpoint on a GPU without bf16 (before Ampere): float16.
    """
    device = torch.device(device)
    if override is not None and override != "auto":
        return _to_dtype(override, "dtype")
    dtype = _to_dtype(config_dtype or "float32", "config.json torch_dtype")
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return torch.float16
    return dtype


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files to read, all checked to exist before any weight is loaded."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index}: no `weight_map` entries")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"shard {file.name!r} named in {index} does not exist")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    hint = (
        " (pytorch .bin weights are not loaded: convert them to safetensors)"
        if any(model_dir.glob("*.bin"))
        else ""
    )
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}{hint}")


class _CheckpointReader:
    """Yields (name, tensor) from each file in turn, remembering which file the last came from so
    an error raised while loading it can name the file."""

    def __init__(self, files: list[Path], device: torch.device):
        self.files = files
        if device.type == "cuda" and device.index is None:  # name the current device explicitly
            device = torch.device("cuda", torch.cuda.current_device())
        self.device_name = str(device)
        self.current: Path | None = None
        # which tensors to read (a pipeline stage's own): the others are never read from disk
        self.keep: Callable[[str], bool] = lambda name: True

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for file in self.files:
            self.current = file
            with safe_open(file, framework="pt", device=self.device_name) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if self.keep(name):
                        yield name, f.get_tensor(name)
        self.current = None


def _open_checkpoint(model_dir: Path, gguf_file: Path | None, device: torch.device,
                     spec: QuantSpec | None, quantization: str | None = None) -> tuple:
    """(weights reader, ModelConfig, the file it came from, weight files)."""
    if gguf_file is not None:  # llama.cpp's format: config and weights from one file
        reader = GGUFCheckpoint(gguf_file, quantized=method_name(quantization) != DEQUANTIZE)
        return reader, reader.config, gguf_file, [gguf_file]
    files = checkpoint_files(model_dir)
    reader = _CheckpointReader(files, device)
    if spec is not None:  # a quantized format's parts gathered per layer
        try:
            reader = quantized_reader(spec, reader)
        except ValueError as e:  # a quantization_config field this engine does not read
            raise ValueError(f"{model_dir / 'config.json'}: {e}") from None
    return reader, ModelConfig.from_dir(model_dir), model_dir / "config.json", files


def check_tensor_parallel(model_dir: str | Path, tp_size: int, *, model_impl: str = "auto",
                          trust_remote_code: bool = False, quantization: str | None = None) -> None:
    """ValueError naming tensor_parallel_size for a model that cannot run sharded, read from its
    config alone, so rank 0 refuses it before starting the other ranks. A GGUF file's shapes are
    checked by load_model (its header takes seconds to read)."""
    config = _dense_native_config(Path(model_dir), "tensor_parallel_size", tp_size, model_impl,
                                  trust_remote_code, quantization)
    if config is not None:
        _check_shardable(get_model_class(config.architecture), config, tp_size)


def check_pipeline_parallel(model_dir: str | Path, pp_size: int, *, model_impl: str = "auto",
                            trust_remote_code: bool = False,
                            quantization: str | None = None) -> None:
    """ValueError naming pipeline_parallel_size for a model that cannot be cut into pp_size
    stages (executor/pipeline_parallel.py), from its config alone, before any rank starts."""
    config = _dense_native_config(Path(model_dir), "pipeline_parallel_size", pp_size, model_impl,
                                  trust_remote_code, quantization)
    if config is not None:
        StageLayers.of(config.num_layers, 0, pp_size)  # every stage needs a layer


def _dense_native_config(model_dir: Path, field: str, size: int, model_impl: str,
                         trust_remote_code: bool, quantization: str | None) -> ModelConfig | None:
    """The config of a dense checkpoint that runs natively (None for a GGUF file to be loaded
    dense), else ValueError naming `field`: what several ranks need."""
    if find_gguf(model_dir) is not None:
        if method_name(quantization) != DEQUANTIZE:
            raise ValueError(f"{field}: {size} runs dense weights only: a GGUF "
                             "file loads dense with quantization='dequantize'")
        return None
    raw = read_config(model_dir)
    spec = read_quantization(model_dir, raw, quantization)
    if spec is not None:
        raise ValueError(f"{field}: {size} with a quantized checkpoint "
                         f"({spec.method}) is not supported (dense weights only)")
    if choose_model_impl(raw, model_impl, trust_remote_code) == "transformers":
        raise ValueError(f"{field}: {size}: the transformers implementation "
                         "runs on one rank only (several ranks need a native model)")
    return ModelConfig.from_dir(model_dir)


def _check_shardable(model_cls: type, config: ModelConfig, tp_size: int) -> None:
    if not getattr(model_cls, "tensor_parallel", False):
        raise ValueError(f"tensor_parallel_size: {tp_size}: {config.architecture}'s experts are "
                         "not sharded yet; it runs with tensor_parallel_size 1 only")
    check_model(config.architecture, config.num_heads, config.num_kv_heads,
                config.intermediate_size, tp_size)


def _dense_only(reader, field: str, size: int):
    """The reader's tensors, refusing a quantized one (several ranks run dense weights)."""
    for name, tensor in reader:
        if isinstance(tensor, QuantizedWeight):
            raise ValueError(f"{field}: {size} with quantized weights is not "
                             f"supported (tensor {name!r} is quantized)")
        yield name, tensor


def _ranks_reader(reader, model: nn.Module, config: ModelConfig, tp_size: int, pp_size: int):
    """What a rank of several reads: dense tensors only, and a pipeline stage only its own
    (the model's loader skips the others too; a safetensors reader never reads them)."""
    if pp_size > 1 and isinstance(reader, _CheckpointReader):
        stage, tied = model.stage, config.tie_word_embeddings
        reader.keep = lambda name: stage.holds(name, tied)
    if tp_size > 1:
        return _dense_only(reader, "tensor_parallel_size", tp_size)
    if pp_size > 1:
        return _dense_only(reader, "pipeline_parallel_size", pp_size)
    return reader


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Parameters are created directly in the target dtype (no float32 copy first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(
    model_dir: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    model_impl: str = "auto",
    trust_remote_code: bool = False,
    quantization: str | None = None,
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
) -> tuple[nn.Module, ModelConfig]:
    """Build the model a directory (or a GGUF file) describes and fill its weights: (model in
    eval mode, config). model_impl: auto, native or transformers (executor/models/impl.py);
    quantization: None/auto (the checkpoint's own format) or the format it must be in
    (executor/quantization/config.py); tp_rank of tp_size: this rank's shard of every layer,
    each checkpoint tensor sliced as it is read (executor/tensor_parallel.py); pp_rank of
    pp_size: the pipeline stage whose layers alone are built and read
    (executor/models/pipeline_stage.py)."""
    model_dir, device = Path(model_dir), torch.device(device)
    if tp_size > 1:
        check_tensor_parallel(model_dir, tp_size, model_impl=model_impl,
                              trust_remote_code=trust_remote_code, quantization=quantization)
    if pp_size > 1:
        check_pipeline_parallel(model_dir, pp_size, model_impl=model_impl,
                                trust_remote_code=trust_remote_code, quantization=quantization)
    gguf_file, spec = find_gguf(model_dir), None
    if gguf_file is None:  # native or transformers' code: executor/models/impl.py
        raw = read_config(model_dir)
        spec = read_quantization(model_dir, raw, quantization)
        try:
            if choose_model_impl(raw, model_impl, trust_remote_code) == "transformers":
                if spec is not None:
                    raise UnsupportedModel(f"a quantized checkpoint ({spec.method}) runs on the "
                                           "native implementation only, and this architecture "
                                           "has none")
                return load_transformers_model(
                    model_dir, resolve_dtype(config_dtype(raw), dtype, device), device,
                    select_backend(device), trust_remote_code=trust_remote_code)
        except UnsupportedModel as e:
            raise UnsupportedModel(f"{model_dir / 'config.json'}: {e}") from None
    elif model_impl == "transformers":
        raise ValueError(f"{gguf_file}: a GGUF file runs on the native implementation only")
    elif method_name(quantization) not in ("auto", DEQUANTIZE):
        raise ValueError(f"{gguf_file}: quantization {quantization!r}: a GGUF file's tensor "
                         "types say how it is quantized")
    reader, config, config_file, files = _open_checkpoint(model_dir, gguf_file, device, spec,
                                                          quantization)
    try:
        model_cls = get_model_class(config.architecture)
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from None
    if tp_size > 1:  # a GGUF file's config is known only now
        _check_shardable(model_cls, config, tp_size)
    torch_dtype = resolve_dtype(config.torch_dtype, dtype, device)
    try:
        backend = select_backend(device)
        with torch.device(device), _default_dtype(torch_dtype), \
                tensor_parallel(tp_rank, tp_size), pipeline_parallel(pp_rank, pp_size):
            model = model_cls(config, backend)
    except ValueError as e:  # a config value the model cannot run (rope type, activation, ...)
        raise ValueError(f"{config_file}: {e}") from None
    try:
        model.load_weights(_ranks_reader(reader, model, config, tp_size, pp_size))
    except ValueError as e:
        where = reader.current or ", ".join(str(f) for f in files)
        raise ValueError(f"{e} (in {where})") from None
    packed = finish_quantized(model, backend)  # quantized layers pack their codes for the kernels
    if device.type == "cpu":
        pack_for_cpu(model)
        if packed:
            _log_cpu_quantized(packed, torch_dtype)
    return model.eval(), config


def _log_cpu_quantized(layers: int, dtype: torch.dtype) -> None:
    """Which activation path the quantized GEMMs take in this process (it depends on the CPU:
    kernels/cpu/quant_linear.default_act), so a log says what the figures were measured with."""
    import importlib

    ql = importlib.import_module("pagedserve.kernels.cpu.quant_linear")  # not the function
    log.info("quantized layers on the CPU", layers=layers, activations=ql.act(dtype),
             tiles=ql.path(dtype), chosen_by=ql.ENV_ACT if ql.ACT else "this CPU")
