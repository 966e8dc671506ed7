"""pagedserve against llama.cpp's `llama-server`, side by side in one run, on the same weights.

    scripts/build_llamacpp.sh                  # once: llama-server and llama-quantize, ~15 min
    python -m pagedserve.bench.llamacpp        # about 4 minutes on 2 quiet cores

Both engines serve SmolLM2-135M-Instruct in bf16: pagedserve serves the default model file
(`real_model_path()`, the Q4_1 GGUF) with `--dtype bfloat16 --quantization dequantize`, i.e.
expanded to bf16 at load (`--quantization auto` runs it quantized instead);
llama-server serves the file that `llama-quantize --allow-requantize IN OUT BF16` expands it to
(the same values; made once, next to the Q4_1 file). Each engine runs as an OpenAI-compatible
server on a free loopback port and is driven by bench.serve's streaming client with token-id
prompts and max_tokens with ignore_eos, so both produce exactly the same number of tokens:

- concurrent: --num-requests (64) streamed requests sent all at once; bench.workload's
  ShareGPT-like lengths clipped to 4-512 prompt and 4-256 output tokens;
- single: --single-requests (3) streamed requests one at a time, --single-output-len (128)
  output tokens each after a --single-prompt-len (64) token prompt.

Output tok/s is output tokens over the case's wall time (for `single`, time to the first token
included; the JSON also has the median time per output token). For `single` the table also gives
each engine's median time per output token over its bandwidth floor (bench.bandwidth_floor: the
weight bytes a step reads in that engine's format, over the read bandwidth measured just before
the case, since a shared host's bandwidth moves). Only one server is up at a time;
the engines alternate (A, B, A, B, ...) for --rounds rounds, each round a fresh server and
prompts no earlier round used; the table reports the median over the rounds. llama-server
gets --parallel (64) slots of --ctx-per-slot (1024) tokens and as many threads as the machine
has cores. Results go to results/llamacpp.json.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from pagedserve.bench.bandwidth_floor import Floor, read_bandwidth, weight_bytes_per_token
from pagedserve.bench.results import write_results
from pagedserve.bench.serve import (
    ROOT,
    _warm_up,
    free_port,
    launched_server,
    prompt_variant,
    run_event_loop,
    run_rate,
    stop_server,
    wait_healthy,
)
from pagedserve.bench.workload import BenchRequest, sharegpt_like

ENGINES = ("pagedserve", "llama.cpp")
CASES = ("concurrent", "single")
DEFAULT_BIN = Path.home() / ".cache" / "pagedserve" / "llama.cpp" / "bin"


# ---- workloads --------------------------------------------------------------------------------


def concurrent_workload(num_requests: int, vocab_size: int, seed: int = 0,
                        max_prompt: int = 512, max_output: int = 256) -> list[BenchRequest]:
    """bench.workload's requests with prompts cut to max_prompt and outputs to max_output."""
    return [BenchRequest(r.prompt_token_ids[:max_prompt], min(r.output_len, max_output))
            for r in sharegpt_like(num_requests, vocab_size, seed=seed)]


def single_workload(requests: list[BenchRequest], count: int, prompt_len: int,
                    output_len: int) -> list[BenchRequest]:
    """count requests of prompt_len tokens (taken from the workload's longer prompts, repeated
    where one is short) and output_len output tokens each."""
    out = []
    for r in sorted(requests, key=lambda r: -len(r.prompt_token_ids))[:count]:
        ids = r.prompt_token_ids
        out.append(BenchRequest((ids * (prompt_len // len(ids) + 1))[:prompt_len], output_len))
    return out


# ---- the servers ------------------------------------------------------------------------------


def gguf_vocab_size(path: Path) -> int:
    from gguf import GGUFReader

    return len(GGUFReader(str(path)).fields["tokenizer.ggml.tokens"].data)


def find_binary(bin_dir: Path, name: str) -> Path:
    path = bin_dir / name
    if not os.access(path, os.X_OK):
        raise SystemExit(f"{path} is missing: build llama.cpp first with scripts/build_llamacpp.sh "
                         "(or pass --llama-cpp-bin DIR)")
    return path


def bf16_gguf(model: Path, quantize: Path, out: Path | None) -> Path:
    """The model expanded to bf16 by llama-quantize (made once, next to the model)."""
    out = out or model.with_name(model.name.replace(".Q4_1", "").removesuffix(".gguf")
                                 + ".BF16.gguf")
    if not out.exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        print(f"converting {model} to bf16 for llama.cpp: {out}", flush=True)
        subprocess.run([str(quantize), "--allow-requantize", str(model), str(tmp), "BF16"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp.rename(out)
    return out


def llama_server_argv(server: Path, model: Path, port: int, args: argparse.Namespace) -> list[str]:
    return [str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(args.parallel), "-c", str(args.parallel * args.ctx_per_slot),
            "-t", str(args.threads), "-tb", str(args.threads)]


@contextmanager
def launched_llama_server(argv: list[str], timeout: float):
    """llama-server on the port in argv; yields its base URL; SIGTERM on the way out."""
    port = argv[argv.index("--port") + 1]
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            try:
                wait_healthy(base_url, proc, timeout)
            except (RuntimeError, TimeoutError):
                log.seek(0)
                sys.stderr.write(log.read()[-4000:])
                raise
            yield base_url
        finally:
            stop_server(proc, timeout=30)


# ---- one engine, one round ----------------------------------------------------------------------


def _run_cases(base_url: str, model_id: str, concurrent: list[BenchRequest],
               single: list[BenchRequest], cases: list[str]) -> dict:
    _warm_up(base_url, model_id, model_id, concurrent, "ids")
    out = {}
    for case, reqs, limit in (("concurrent", concurrent, None), ("single", single, 1)):
        if case not in cases:
            continue
        # the floor's bandwidth, measured beside the case it bounds (a shared host's moves)
        read = read_bandwidth() if case == "single" else None
        run = run_event_loop(run_rate(base_url, model_id, [r.prompt_token_ids for r in reqs],
                                      reqs, float("inf"), limit, 0))
        run.pop("requests")
        if read is not None:
            run["read_bytes_per_s"] = read
        print(f"  {case}: {run['completed']} ok, {run['failed']} failed in "
              f"{run['duration_s']:.1f} s, {run['output_throughput']:.1f} output tok/s, "
              f"median TPOT {run['tpot_ms']['median']:.1f} ms", flush=True)
        for e in run["errors"]:
            print(f"    error: {e}")
        out[case] = run
    return out


def run_engine(engine: str, round_index: int, model: Path, bf16: Path, server: Path | None,
               concurrent: list[BenchRequest], single: list[BenchRequest],
               vocab_size: int, args: argparse.Namespace) -> dict:
    """A fresh server for `engine`, the round's prompt variant through both cases, server down."""
    concurrent = prompt_variant(concurrent, 2 * round_index, vocab_size)
    single = prompt_variant(single, 2 * round_index + 1, vocab_size)
    print(f"round {round_index + 1}, {engine}", flush=True)
    start = time.perf_counter()
    if engine == "pagedserve":
        with launched_server(str(model), args) as base_url:
            loaded = time.perf_counter()
            cases = _run_cases(base_url, str(model), concurrent, single, args.cases)
    else:
        argv = llama_server_argv(server, bf16, free_port(), args)
        with launched_llama_server(argv, args.startup_timeout) as base_url:
            loaded = time.perf_counter()
            cases = _run_cases(base_url, bf16.name, concurrent, single, args.cases)
    return {"engine": engine, "round": round_index, "startup_s": loaded - start,
            "load_average": os.getloadavg(), **cases}


# ---- the table ----------------------------------------------------------------------------------


def summarize(rounds: list[dict], weight_bytes: dict[str, int] | None = None) -> list[dict]:
    """Per engine and case: every round's output tok/s, the median, and pagedserve's ratio to
    llama.cpp's median (1.0 on llama.cpp's rows); for the single stream, given each engine's
    weight bytes per token, the median over rounds of its time per token over the round's
    bandwidth floor (bench.bandwidth_floor)."""
    rows = []
    for case in CASES:
        medians = {}
        for engine in ENGINES:
            runs = [r[case] for r in rounds if r["engine"] == engine and case in r]
            if runs:
                medians[engine] = statistics.median(run["output_throughput"] for run in runs)
                tpot = statistics.median(run["tpot_ms"]["median"] for run in runs)
                row = {"engine": engine, "case": case,
                       "rounds": [run["output_throughput"] for run in runs],
                       "output_tok_s": medians[engine], "tpot_ms": tpot}
                if weight_bytes and all("read_bytes_per_s" in run for run in runs):
                    row["times_floor"] = statistics.median(
                        Floor(weight_bytes[engine], run["read_bytes_per_s"])
                        .times(run["tpot_ms"]["median"]) for run in runs)
                rows.append(row)
        base = medians.get("llama.cpp")
        for row in rows:
            if row["case"] == case:
                row["ratio"] = row["output_tok_s"] / base if base else None
    return rows


CASE_NAMES = {"concurrent": "{n} concurrent streams", "single": "1 stream, {k} output tokens"}


def format_table(rows: list[dict], num_requests: int = 64, single_output_len: int = 128) -> str:
    """A Markdown table: engine, case, median output tok/s, the rounds, ratio to llama.cpp."""
    lines = ["| engine | case | output tok/s (median) | rounds | ms per output token | "
             "ratio to llama.cpp | x bandwidth floor |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        case = CASE_NAMES[row["case"]].format(n=num_requests, k=single_output_len)
        ratio = "n/a" if row.get("ratio") is None else f"{row['ratio']:.2f}x"
        if row["engine"] == "pagedserve" and row.get("ratio") is not None:
            ratio = f"**{ratio}**"
        rounds = ", ".join(f"{v:.1f}" for v in row["rounds"])
        floor = f"{row['times_floor']:.2f}x" if "times_floor" in row else ""
        lines.append(f"| {row['engine']} | {case} | {row['output_tok_s']:.1f} | {rounds} | "
                     f"{row['tpot_ms']:.1f} | {ratio} | {floor} |")
    return "\n".join(lines)


DENSE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def pagedserve_weight_bytes(model: Path, args: argparse.Namespace) -> int:
    """What one of pagedserve's decode steps reads: the file's quantized bytes when it runs the
    file quantized (--quantization auto), else its weights expanded to --dtype."""
    if args.quantization == "auto":
        return weight_bytes_per_token(model)
    return weight_bytes_per_token(model, DENSE_BYTES.get(args.dtype, 2))


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None,
                   help="GGUF file for pagedserve (default: the SmolLM2 Q4_1 file, real_model_path())")
    p.add_argument("--llama-model", default=None,
                   help="GGUF file for llama-server (default: --model converted to BF16)")
    p.add_argument("--llama-cpp-bin", default=os.environ.get("LLAMACPP_BIN", str(DEFAULT_BIN)),
                   help="folder with llama-server and llama-quantize")
    p.add_argument("--rounds", type=int, default=3, help="rounds per engine (A, B, A, B, ...)")
    p.add_argument("--cases", default=",".join(CASES), help="comma list of: " + ", ".join(CASES))
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-prompt-len", type=int, default=512)
    p.add_argument("--max-output-len", type=int, default=256)
    p.add_argument("--single-requests", type=int, default=3)
    p.add_argument("--single-prompt-len", type=int, default=64)
    p.add_argument("--single-output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", help="pagedserve's --dtype")
    p.add_argument("--quantization", default="dequantize",
                   help="pagedserve's --quantization: dequantize (the default: bf16 weights, as "
                        "llama-server's BF16 file) or auto (the Q4_1 file run quantized; then "
                        "give llama-server the Q4_1 file too with --llama-model)")
    p.add_argument("--serve-args", default="",
                   help="more arguments for pagedserve serve, e.g. --serve-args=--no-async-scheduling")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--parallel", type=int, default=64, help="llama-server slots (-np)")
    p.add_argument("--ctx-per-slot", type=int, default=1024, help="llama-server -c is this x -np")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-server -t and -tb")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", default=str(ROOT / "results" / "llamacpp.json"))
    args = p.parse_args(argv)
    args.extra_serve_args = ["--quantization", args.quantization, *shlex.split(args.serve_args)]
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - set(CASES)
    if unknown:
        p.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    from pagedserve.bench.roofline import cpu_flags, machine_description

    args = parse_args(argv)
    bin_dir = Path(args.llama_cpp_bin)
    server = find_binary(bin_dir, "llama-server")
    if args.model is None:
        from pagedserve.real_model import real_model_path

        model = real_model_path()
    else:
        model = Path(args.model)
    bf16 = (Path(args.llama_model) if args.llama_model
            else bf16_gguf(model, find_binary(bin_dir, "llama-quantize"), None))
    vocab = gguf_vocab_size(model)
    concurrent = concurrent_workload(args.num_requests, vocab, args.seed, args.max_prompt_len,
                                     args.max_output_len)
    single = single_workload(concurrent, args.single_requests, args.single_prompt_len,
                             args.single_output_len)
    start, load_before = time.perf_counter(), os.getloadavg()
    rounds = []
    for r in range(args.rounds):
        for engine in ENGINES:
            result = run_engine(engine, r, model, bf16, server, concurrent, single, vocab, args)
            rounds.append(result)
    weight_bytes = {"pagedserve": pagedserve_weight_bytes(model, args),
                    "llama.cpp": weight_bytes_per_token(bf16)}
    rows = summarize(rounds, weight_bytes)
    table = format_table(rows, args.num_requests, args.single_output_len)
    print(f"\n{machine_description()}; load average before {load_before[0]:.2f}, after "
          f"{os.getloadavg()[0]:.2f}; {time.perf_counter() - start:.0f} s in all\n")
    print(table)
    write_results(args.out, {
        "pagedserve_model": str(model), "llama_cpp_model": str(bf16),
        "machine": machine_description(), "cpu_flags": cpu_flags(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "argv": sys.argv, "llama_server_argv": llama_server_argv(server, bf16, 0, args),
        "num_requests": args.num_requests, "weight_bytes_per_token": weight_bytes,
        "rounds": rounds, "table": rows,
        "table_markdown": table})
    failed = sum(r[c]["failed"] for r in rounds for c in CASES if c in r)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
