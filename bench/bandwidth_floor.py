"""The memory-bandwidth floor of one user's decode: the weight bytes a step reads over the machine's
measured read bandwidth. No engine can emit a token faster, since every weight is read once a
token; issue 18 asks the served single stream to stay within 2x of it.

    python -m pagedserve.bench.bandwidth_floor [GGUF] [--dense-bytes 2]

Read bandwidth: the best of `repeats` sums of a 1 GiB float32 buffer (far past any cache) on
torch's threads, a pure read as a decode step's weight stream is (a copy also writes, and
reported about half of this on the 2-core Zen 5 we measured). Weight bytes per token, from a GGUF
file: every tensor a step multiplies by, in the form it runs in: the file's own bytes for an
engine that runs it quantized, or elements times `dense_bytes` for one that expands it (bf16:
2). The token embedding counts only when it is also the LM head (tied: no `output.weight`); a
lookup reads one row of it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

EMBEDDING = "token_embd.weight"
LM_HEAD = "output.weight"


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second that torch's threads read from memory: the fastest of `repeats` sums."""
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass faults the pages in
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def weight_bytes_per_token(gguf_path: str | Path, dense_bytes: int | None = None) -> int:
    """The bytes of every weight one decode step reads: quantized as the file stores them when
    dense_bytes is None, else expanded to dense_bytes an element."""
    import gguf

    tensors = gguf.GGUFReader(str(gguf_path)).tensors
    tied = not any(t.name == LM_HEAD for t in tensors)
    read = [t for t in tensors if t.name != EMBEDDING or tied]
    if dense_bytes is None:
        return sum(int(t.n_bytes) for t in read)
    return sum(int(t.n_elements) * dense_bytes for t in read)


@dataclass
class Floor:
    weight_bytes: int
    read_bytes_per_s: float

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.weight_bytes / self.read_bytes_per_s

    def times(self, ms_per_token: float) -> float:
        """How many floors a measured time per token is."""
        return ms_per_token / self.ms_per_token


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", nargs="?", default=None, help="default: SmolLM2-135M-Instruct Q4_1")
    p.add_argument("--dense-bytes", type=int, default=None,
                   help="count weights expanded to this many bytes each (bf16: 2)")
    args = p.parse_args(argv)
    if args.gguf is None:
        from pagedserve.real_model import real_model_path

        args.gguf = real_model_path()
    floor = Floor(weight_bytes_per_token(args.gguf, args.dense_bytes), read_bandwidth())
    print(json.dumps({**asdict(floor), "ms_per_token": floor.ms_per_token,
                      "threads": torch.get_num_threads()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
