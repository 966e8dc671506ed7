"""The processes of a running `pagedserve serve` (the supervisor and its children, found by its
HTTP port) and what /proc says of each: resident memory, open file descriptors, threads. The
load benchmarks (bench.connections, bench.soak) watch them for leaks."""

from __future__ import annotations

from pathlib import Path


def server_processes(base_url: str) -> list[int]:
    """`serve`'s pid first, then its children's (and theirs); [] when none listens there."""
    port = base_url.rsplit(":", 1)[-1].split("/")[0]
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "pagedserve.cli serve" in cmd and f"--port {port}" in cmd:
            return [int(pid_dir.name), *_children(int(pid_dir.name))]
    return []


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        kids += [int(k) for k in task.read_text().split()]
    return kids + [g for k in kids for g in _children(k)]


def process_names(pids: list[int]) -> dict[int, str]:
    """"serve" for the first, else the subcommand each child runs (executor, scheduler, router)."""
    names = {}
    for pid in pids:
        try:
            parts = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        names[pid] = parts[3].decode() if len(parts) > 3 and pid != pids[0] else "serve"
    return names


def process_figures(pid: int) -> dict[str, float] | None:
    """Resident MB, open file descriptors and threads; None once the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kb = next(int(line.split()[1]) for line in status.splitlines()
                      if line.startswith("VmRSS:"))
        return {"rss_mb": rss_kb / 1024, "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
                "threads": len(list(Path(f"/proc/{pid}/task").iterdir()))}
    except (OSError, StopIteration):
        return None
