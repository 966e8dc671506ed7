"""transformers' `generate` with static batches: the baseline every figure is compared with.

Requests run in arrival order in fixed-size batches, left-padded; a batch generates until its longest
requested output (that is what static batching costs). Only the tokens each request asked for count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pagedserve.bench.workload import BenchRequest


@dataclass(frozen=True)
class HFResult:
    dtype: str
    batch_size: int
    elapsed_s: float
    num_requests: int
    output_tokens: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s


def load_hf_model(model_dir: str, dtype: str, device: str = "cpu"):
    """transformers' model of an HF directory, or of a GGUF file (its own GGUF loader: needs the
    gguf and accelerate packages, dequantizes like pagedserve's)."""
    from transformers import AutoModelForCausalLM

    from pagedserve.executor.gguf_loader import find_gguf

    gguf_file = find_gguf(model_dir)
    where, extra = (model_dir, {}) if gguf_file is None else (
        str(gguf_file.parent), {"gguf_file": gguf_file.name})
    model = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype), **extra)
    return model.to(device).eval()


def _left_padded(batch: list[BenchRequest], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):
        ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
        mask[row, width - len(r.prompt_token_ids):] = 1
    return ids, mask


@torch.inference_mode()
def run_static_batches(model, requests: list[BenchRequest], batch_size: int) -> float:
    """Seconds to serve all requests in static batches of batch_size."""
    pad_id = model.config.pad_token_id or 0
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        ids, mask = _left_padded(batch, pad_id)
        new = max(r.output_len for r in batch)
        model.generate(
            input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=pad_id,
        )
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_static_config(model_dir: str, tune: list[BenchRequest], dtypes: list[str],
                       batch_sizes: list[int],
                       device: str = "cpu") -> tuple[str, int, list[HFResult]]:
    """Try each (dtype, batch size) on a tuning slice; return the fastest and every trial."""
    trials = []
    for dtype in dtypes:
        model = load_hf_model(model_dir, dtype, device)
        for bs in batch_sizes:
            elapsed = run_static_batches(model, tune, bs)
            out = sum(r.output_len for r in tune)
            trials.append(HFResult(dtype, bs, elapsed, len(tune), out))
        del model
    best = max(trials, key=lambda t: t.output_tokens_per_s)
    return best.dtype, best.batch_size, trials


def run_hf(model_dir: str, requests: list[BenchRequest], dtype: str, batch_size: int,
           device: str = "cpu") -> HFResult:
    model = load_hf_model(model_dir, dtype, device)
    elapsed = run_static_batches(model, requests, batch_size)
    return HFResult(dtype, batch_size, elapsed, len(requests), sum(r.output_len for r in requests))
