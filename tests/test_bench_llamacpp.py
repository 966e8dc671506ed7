"""bench.llamacpp without llama.cpp: arguments, workloads, the median/ratio summary and the table
(fake rounds; the benchmark itself needs llama-server, built by scripts/build_llamacpp.sh)."""

from __future__ import annotations

import pytest

from pagedserve.bench.llamacpp import (
    concurrent_workload,
    format_table,
    llama_server_argv,
    parse_args,
    single_workload,
    summarize,
)


def _round(engine: str, r: int, concurrent: float, single: float) -> dict:
    return {"engine": engine, "round": r,
            "concurrent": {"output_throughput": concurrent, "tpot_ms": {"median": 50.0}},
            "single": {"output_throughput": single, "tpot_ms": {"median": 10.0}}}


def test_parse_args_defaults_and_cases() -> None:
    args = parse_args([])
    assert (args.num_requests, args.rounds, args.dtype) == (64, 3, "bfloat16")
    assert args.cases == ["concurrent", "single"]
    assert parse_args(["--cases", "single"]).cases == ["single"]
    with pytest.raises(SystemExit):
        parse_args(["--cases", "nope"])


def test_llama_server_gets_the_slots_context_and_threads() -> None:
    from pathlib import Path

    args = parse_args(["--parallel", "8", "--ctx-per-slot", "512", "--threads", "3"])
    argv = llama_server_argv(Path("/x/llama-server"), Path("m.gguf"), 1234, args)
    assert argv[argv.index("-np") + 1] == "8" and argv[argv.index("-c") + 1] == "4096"
    assert argv[argv.index("-t") + 1] == "3" and argv[argv.index("--port") + 1] == "1234"


def test_workloads_respect_the_length_bounds() -> None:
    reqs = concurrent_workload(64, 1000, max_prompt=512, max_output=256)
    assert len(reqs) == 64
    assert all(4 <= len(r.prompt_token_ids) <= 512 and 4 <= r.output_len <= 256 for r in reqs)
    single = single_workload(reqs, 3, 64, 128)
    assert [(len(r.prompt_token_ids), r.output_len) for r in single] == [(64, 128)] * 3


def test_summary_takes_medians_and_the_table_shows_ratios() -> None:
    rounds = [_round("pagedserve", 0, 600, 80), _round("llama.cpp", 0, 200, 120),
              _round("pagedserve", 1, 500, 70), _round("llama.cpp", 1, 250, 100),
              _round("pagedserve", 2, 700, 90), _round("llama.cpp", 2, 210, 110)]
    rows = {(r["engine"], r["case"]): r for r in summarize(rounds)}
    assert rows["pagedserve", "concurrent"]["output_tok_s"] == 600
    assert rows["pagedserve", "concurrent"]["ratio"] == pytest.approx(600 / 210)
    assert rows["llama.cpp", "single"]["ratio"] == 1.0
    table = format_table(summarize(rounds))
    assert "| pagedserve | 64 concurrent streams | 600.0 | 600.0, 500.0, 700.0 |" in table
    assert "**2.86x**" in table and "| llama.cpp | 1 stream, 128 output tokens | 110.0 |" in table


def test_the_single_stream_row_shows_its_time_over_the_rounds_bandwidth_floor() -> None:
    rounds = [_round("pagedserve", 0, 600, 80), _round("llama.cpp", 0, 200, 120),
              _round("pagedserve", 1, 500, 70), _round("llama.cpp", 1, 250, 100)]
    for r, read in zip(rounds, (1e9, 2e9, 4e9, 1e9)):  # bytes/s; 10 ms a token in every round
        r["single"]["read_bytes_per_s"] = read
    rows = {(r["engine"], r["case"]): r
            for r in summarize(rounds, {"pagedserve": 2_000_000, "llama.cpp": 1_000_000})}
    # floors: pagedserve 2 ms, 0.5 ms -> 5x, 20x; llama.cpp 0.5 ms, 1 ms -> 20x, 10x
    assert rows["pagedserve", "single"]["times_floor"] == pytest.approx(12.5)
    assert rows["llama.cpp", "single"]["times_floor"] == pytest.approx(15.0)
    assert "times_floor" not in rows["pagedserve", "concurrent"]
    assert "| 12.50x |" in format_table(list(rows.values()))

