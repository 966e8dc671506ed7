"""executor/host_memory.py does what it says, measured in a fresh process (both settings are
process-wide, and the test process may have made them already: the Executor does):

- zeros_on_huge_pages: a zeroed tensor on a 2 MiB boundary whose whole 2 MiB pages the kernel was
  asked (madvise) to back with huge pages, as the mapping's flags in /proc/self/smaps say;
- keep_freed_memory: a step's temporaries, allocated and freed again every step (a tensor, and a
  plain malloc() whose buffer goes back to the top of the heap, which glibc would trim), come from
  pages the process already holds once it has warmed up, where glibc's default maps them afresh
  and faults on every 4 KiB page, every step.

Warming up takes a few rounds, not one: torch allocates 64-byte aligned (posix_memalign), whose
trimmed-off tails sit in glibc's per-thread cache between the freed buffers and keep them from
merging until that cache is full (7 entries), so the heap grows by a buffer for about 8 rounds
before a freed one is reused. WARM_UP allows twice that.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc, /proc")

HUGE_PAGE = 2 << 20
SHAPE = (3, 1000, 1000)  # 12 MB of float32: six whole 2 MiB pages and a tail
BUFFER = 40 << 20  # above glibc's largest dynamic mmap threshold (32 MiB): mmap()ed by default
PAGES = BUFFER // 4096
WARM_UP, MEASURED = 16, 4  # rounds of one step's temporary: allocated, written, freed

MEASURE = """
import ctypes, json, re, resource, torch
from pagedserve.executor.host_memory import keep_freed_memory, zeros_on_huge_pages

def mapping(address):
    for block in re.split(r"\\n(?=[0-9a-f]+-[0-9a-f]+ )", open("/proc/self/smaps").read()):
        start, end = (int(x, 16) for x in block.split(None, 1)[0].split("-"))
        if start <= address < end:
            return {"start": start, "end": end, "flags": re.search(r"VmFlags:(.*)", block)[1].split()}

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]

def one_round(nbytes):  # each buffer allocated, written, freed
    torch.empty(nbytes, dtype=torch.uint8).fill_(1)  # posix_memalign: its tail stays behind it
    buffer = libc.malloc(nbytes)  # plain malloc: freed, it goes back to the top of the heap
    ctypes.memset(buffer, 1, nbytes)
    libc.free(buffer)

def faults_per_round(nbytes, warm_up, rounds):
    for _ in range(warm_up):
        one_round(nbytes)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        one_round(nbytes)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds

t = zeros_on_huge_pages(%(shape)r, torch.float32)
out = {"ptr": t.data_ptr(), "shape": list(t.shape), "contiguous": t.is_contiguous(),
       "zero": not t.any().item(), "mapping": mapping(t.data_ptr())}
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: from here one fault per 4 KiB page
out["default_faults"] = faults_per_round(%(buffer)d, 1, %(measured)d)
out["kept"] = keep_freed_memory()
out["kept_faults"] = faults_per_round(%(buffer)d, %(warm_up)d, %(measured)d)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def measured() -> dict:
    script = MEASURE % {"shape": SHAPE, "buffer": BUFFER, "warm_up": WARM_UP,
                        "measured": MEASURED}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_kv_cache_memory_is_advised_huge_pages(measured: dict) -> None:
    assert measured["shape"] == list(SHAPE) and measured["contiguous"] and measured["zero"]
    ptr, nbytes = measured["ptr"], 3 * 1000 * 1000 * 4
    assert ptr % HUGE_PAGE == 0
    mapping = measured["mapping"]  # the advised range is a mapping of its own
    assert (mapping["start"], mapping["end"]) == (ptr, ptr + nbytes - nbytes % HUGE_PAGE)
    assert "hg" in mapping["flags"], mapping  # MADV_HUGEPAGE


def test_a_warm_process_reuses_freed_memory_without_page_faults(measured: dict) -> None:
    assert measured["kept"], "keep_freed_memory found no mallopt"
    assert measured["default_faults"] > PAGES, measured  # two fresh mappings a round
    assert measured["kept_faults"] < PAGES // 100, measured
