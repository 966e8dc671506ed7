"""All-reduce (and all-gather) for tensor-parallel ranks on one machine, over one shared-memory file.

Over loopback gloo a decode step's all-reduce costs about 1.4 ms on a 2-core machine (TCP round
trips and wake-ups), far more than its bytes. Here every rank maps one file in /dev/shm:

    [ magic | size | slot bytes ]  [ rank 0: round, pid ] ... [ rank N-1: round, pid ]  (64 B lines)
    bank 0: slot 0 | slot 1 | ... | slot N-1      bank 1: slot 0 | ... | slot N-1

Each call is one round k (every rank makes the same calls in the same order, so all agree on k):
rank r copies its tensor into slot r of bank k % 2, publishes round[r] = k, waits until every rank
has published k, then reads all slots. Two banks let a rank write round k+1 while a slower one still
reads round k; it cannot reach round k+2 (the same bank) before that one published k+1, i.e.
finished reading k. A rank waiting on round k sees a peer's counter at k-1 (not there yet), k or
k+1, so "arrived" is "not k-1": the counters may wrap (2**64) without harm. A tensor larger than a
slot goes in slot-sized chunks, one round each.

The sum reads slots 0, 1, ..., N-1 in that order on every rank, so every rank gets the same bytes.
float32 sums in float32, as gloo's; bfloat16 / float16 parts are summed in float32 and rounded once
(gloo rounds after each addition; at 2 ranks the two agree bit for bit).

The counters' atomics, the wait's spin and the sums are a small C kernel
(kernels/cpu/shm_collective.c, acquire / release ordering, so this is right on any CPU; the GIL is
dropped while it runs); without a C compiler the ranks use gloo (`supported()`). A wait spins in C
for a moment (a peer a little behind), then yields the CPU, then sleeps in short slices (two ranks
on two cores shared with other work must not starve each other), checking that the ranks it waits
for are alive: one that died raises RankDied naming it, one that never arrives raises
CollectiveError after the timeout. Rank 0 creates the file, every rank maps it, and rank 0 unlinks
it as soon as all have, so no file is left behind however the ranks end.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import mmap
import os
import secrets
import tempfile
import time
from functools import cache

import torch

from pagedserve.kernels.cpu.build import load

MAGIC = 0x70616765_64736D31  # "pagedsm1"
LINE = 64  # one rank's counter on its own cache line
SLOT_BYTES = 1 << 20  # per rank and bank: a decode step's [batch, hidden] fits many times over
MASK = (1 << 64) - 1
SPIN_NS = 50_000  # waits shorter than this (a peer a little behind) never leave the CPU
YIELD_S = 2e-3  # then sched_yield: a peer on the same core runs at once
SLEEP_S = 50e-6  # then short sleeps, free for other processes
CHECK_S = 0.05  # how often a long wait checks that its peers are alive
SUMS = {torch.float32: "shm_sum_f32", torch.bfloat16: "shm_sum_bf16"}  # others: torch ops


class CollectiveError(RuntimeError):
    """A shared-memory collective could not complete (a peer never arrived)."""


class RankDied(CollectiveError):
    pass


@cache
def _native() -> ctypes.CDLL | None:
    lib, _ = load("shm_collective")
    if lib is None:
        return None
    ptr, i64, u64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64
    lib.shm_put.argtypes = [ptr, ptr, i64, ptr, u64]
    lib.shm_put.restype = None
    lib.shm_wait.argtypes = [ptr, i64, ctypes.c_int, u64, i64]
    lib.shm_wait.restype = ctypes.c_int
    for name in SUMS.values():
        getattr(lib, name).argtypes = [ptr, i64, ctypes.c_int, ptr, i64]
        getattr(lib, name).restype = None
    return lib


def supported() -> bool:
    """Whether the C half builds here (else the ranks use gloo)."""
    return _native() is not None


@dataclasses.dataclass(frozen=True)
class Layout:
    size: int
    slot_bytes: int = SLOT_BYTES

    @property
    def header_bytes(self) -> int:
        return LINE * (1 + self.size)

    @property
    def total_bytes(self) -> int:
        return self.header_bytes + 2 * self.size * self.slot_bytes

    def slot_offset(self, bank: int, rank: int) -> int:
        return self.header_bytes + (bank * self.size + rank) * self.slot_bytes

    def word(self, rank: int, field: int) -> int:
        """Index (in u64 words) of field 0 (round) or 1 (pid) of rank's line."""
        return (LINE * (1 + rank)) // 8 + field


def create_segment(size: int, slot_bytes: int = SLOT_BYTES, first_round: int = 1) -> str:
    """Rank 0: a new file for `size` ranks, its pages reserved (a full /dev/shm fails here with
    OSError, not with SIGBUS mid-step); returns its path. first_round: the first call's round
    number (tests start near 2**64 to wrap the counters)."""
    layout = Layout(size, slot_bytes)
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(folder, f"pagedserve-tp-{os.getpid()}-{secrets.token_hex(6)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, layout.total_bytes)
        with mmap.mmap(fd, layout.header_bytes) as mm:
            words = memoryview(mm).cast("Q")
            words[0], words[1], words[2] = MAGIC, size, slot_bytes
            for rank in range(size):
                words[layout.word(rank, 0)] = (first_round - 1) & MASK
            words.release()
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


def unlink_segment(path: str) -> None:
    """Removes the file (mappings stay valid); nothing if it is gone already."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def pid_alive(pid: int) -> bool:
    """False for a process that exited, reaped or not (a zombie has finished)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


class ShmCommunicator:
    """One rank's end of the segment at `path`: all_reduce and all_gather over `size` ranks."""

    def __init__(self, path: str, rank: int, size: int, timeout_s: float = 600.0) -> None:
        lib = _native()
        if lib is None:
            raise RuntimeError("the shared-memory collectives need kernels/cpu/shm_collective.c "
                               "built (no C compiler?)")
        fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self._words = memoryview(self._mm)[: LINE * (1 + size)].cast("Q")
        if self._words[0] != MAGIC or self._words[1] != size:
            self.close()
            raise ValueError(f"{path} is not a shared-memory segment for {size} ranks")
        self.layout = layout = Layout(size, self._words[2])
        self.rank, self.size, self.timeout_s, self._lib = rank, size, timeout_s, lib
        self._round = self._words[layout.word(rank, 0)]  # the last round published
        self._words[layout.word(rank, 1)] = os.getpid()
        self._segment = torch.frombuffer(self._mm, dtype=torch.uint8)
        base = self._segment.data_ptr()
        self._rounds = base + 8 * layout.word(0, 0)  # rank r's round: LINE // 8 words further
        self._my_round = base + 8 * layout.word(rank, 0)
        self._banks = [base + layout.slot_offset(bank, 0) for bank in (0, 1)]
        self._sums = {dtype: getattr(lib, name) for dtype, name in SUMS.items()}

    def peers_attached(self) -> bool:
        """Whether every rank has mapped the segment (each writes its pid when it does)."""
        return all(self._words[self.layout.word(r, 1)] for r in range(self.size))

    # ---- the collectives ----------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """tensor (on every rank, same shape and dtype) becomes the sum over ranks, in place."""
        copied = not tensor.is_contiguous()  # a view: reduced through a contiguous copy
        flat = tensor.contiguous().view(-1)
        step = self.layout.slot_bytes // flat.element_size()
        native = self._sums.get(flat.dtype)
        for start in range(0, flat.numel(), step):
            chunk = flat if flat.numel() <= step else flat[start : start + step]
            bank = self._exchange(chunk)
            if native is not None:
                native(self._banks[bank], self.layout.slot_bytes, self.size, chunk.data_ptr(),
                       chunk.numel())
            else:
                _sum_in_order(self._parts(bank, chunk), chunk)
        if copied:
            tensor.copy_(flat.view(tensor.shape))

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor (same shape and dtype on all), in rank order, as new tensors."""
        flat = tensor.reshape(-1)
        out = [torch.empty_like(flat) for _ in range(self.size)]
        step = self.layout.slot_bytes // flat.element_size()
        for start in range(0, flat.numel(), step):
            chunk = flat[start : start + step]
            bank = self._exchange(chunk)
            for dst, part in zip(out, self._parts(bank, chunk)):
                dst[start : start + part.numel()].copy_(part)
        return [o.view(tensor.shape) for o in out]

    def _exchange(self, chunk: torch.Tensor) -> int:
        """One round: publishes `chunk` (at most a slot; contiguous), waits for every rank's;
        returns the bank that holds them."""
        k = (self._round + 1) & MASK
        bank = k & 1
        self._lib.shm_put(self._banks[bank] + self.rank * self.layout.slot_bytes,
                          chunk.data_ptr(), chunk.numel() * chunk.element_size(),
                          self._my_round, k)
        self._round = k
        self._wait(k)
        return bank

    def _parts(self, bank: int, chunk: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's part of this round, as views of its slot shaped like `chunk`."""
        nbytes = chunk.numel() * chunk.element_size()
        first = self.layout.slot_offset(bank, 0)
        return [self._segment[first + r * self.layout.slot_bytes :][:nbytes].view(chunk.dtype)
                for r in range(self.size)]

    # ---- waiting ------------------------------------------------------------------------------

    def _still_missing(self, k: int, spin_ns: int) -> int:
        return self._lib.shm_wait(self._rounds, LINE // 8, self.size, (k - 1) & MASK, spin_ns)

    def _wait(self, k: int) -> None:
        """Until every rank published round k: spin (in C), then yield, then sleep, checking
        now and then that the ranks waited for are alive."""
        if not self._still_missing(k, SPIN_NS):
            return
        start = time.perf_counter()
        next_check = start + CHECK_S
        while self._still_missing(k, 0):
            now = time.perf_counter()
            if now - start < YIELD_S:
                os.sched_yield()
            else:
                time.sleep(SLEEP_S)
            if now > next_check:
                self._check_peers(k, now - start)
                next_check = now + CHECK_S

    def _check_peers(self, k: int, waited_s: float) -> None:
        before = (k - 1) & MASK
        missing = [r for r in range(self.size) if self._words[self.layout.word(r, 0)] == before]
        for r in missing:
            pid = self._words[self.layout.word(r, 1)]
            if pid and not pid_alive(pid):
                raise RankDied(f"tensor-parallel rank {r} died (pid {pid}) during a "
                               "shared-memory collective")
        if waited_s > self.timeout_s:
            raise CollectiveError(f"tensor-parallel rank(s) {missing} did not reach the "
                                  f"shared-memory collective in {self.timeout_s:.0f} s")

    def close(self) -> None:
        """Unmaps the segment (the file itself was unlinked by rank 0)."""
        self._segment = torch.empty(0, dtype=torch.uint8)
        self._words.release()
        with contextlib.suppress(BufferError):  # a caller holds a view: it keeps the mapping
            self._mm.close()


def _sum_in_order(parts: list[torch.Tensor], out: torch.Tensor) -> None:
    """out = parts[0] + parts[1] + ... in that order; 16-bit floats in float32, rounded once.
    (The dtypes without a C sum: float16, float64, integers.)"""
    acc = parts[0].float() if out.dtype in (torch.float16, torch.bfloat16) else parts[0].clone()
    for p in parts[1:]:
        acc.add_(p)
    out.copy_(acc)
