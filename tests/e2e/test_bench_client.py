"""bench.serve's lean streaming client (bench/sse_client.py) reads what the official `openai`
client reads: against the real server, and against a hand-made chunked stream that splits events
across chunks, uses CRLF line ends, comments and multi-line data, or ends mid-event."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from pagedserve.bench.serve import RequestResult, run_event_loop, send_request
from pagedserve.bench.sse_client import HTTPStatusError, stream_events
from tests.e2e.conftest import Serve


async def _collect(url: str, payload: dict) -> list[str]:
    return [event async for event in stream_events(url, payload)]


def test_streamed_completion_matches_the_openai_client(serve: Serve) -> None:
    payload = {"model": "", "prompt": "The quick brown fox", "max_tokens": 12,
               "temperature": 0, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}}
    events = run_event_loop(_collect(f"{serve.base_url}/v1/completions", payload))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    ours = "".join(c["text"] for chunk in chunks for c in chunk["choices"])
    client = openai.OpenAI(base_url=f"{serve.base_url}/v1", api_key="x", max_retries=0)
    body = {k: v for k, v in payload.items() if k not in ("model", "prompt", "ignore_eos")}
    theirs = client.completions.create(model=payload["model"], prompt=payload["prompt"],
                                       extra_body={"ignore_eos": True}, **body)
    texts, usage = [], None
    for chunk in theirs:
        usage = chunk.usage or usage
        texts += [c.text for c in chunk.choices]
    assert ours == "".join(texts) and ours
    assert chunks[-1]["usage"]["completion_tokens"] == usage.completion_tokens == 12

    result = run_event_loop(send_request(f"{serve.base_url}/v1/completions", payload,
                                         RequestResult(prompt_len=4, output_len=12)))
    assert result.ok and result.completion_tokens == 12 and result.ttft_s > 0
    assert len(result.itl_s) == sum(1 for c in chunks if any(x["text"] for x in c["choices"])) - 1


def test_an_error_status_raises_with_the_body(serve: Serve) -> None:
    payload = {"model": "no-such-model", "prompt": "x", "max_tokens": 2, "stream": True}
    with pytest.raises(HTTPStatusError, match=r"HTTP 404: .*no-such-model"):
        run_event_loop(_collect(f"{serve.base_url}/v1/completions", payload))


def _chunked(pieces: list[bytes]) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n")


@pytest.mark.parametrize("response, events", [
    (_chunked([b"data: {\"a\"", b": 1}\n\nda", b"ta: two\r\n\r\n: a comment\n\n",
               b"event: x\ndata: line1\ndata:line2\n\ndata: [DONE]\n\n"]),
     ['{"a": 1}', "two", "line1\nline2", "[DONE]"]),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 21\r\n\r\ndata: one\n\ndata: tail", ["one"]),
])
def test_events_are_split_as_the_sse_format_says(response: bytes, events: list[str]) -> None:
    async def scenario() -> list[str]:
        async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.readline() not in (b"\r\n", b""):  # the request head
                pass
            writer.write(response)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(reply, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await _collect(f"http://127.0.0.1:{port}/x", {})

    assert run_event_loop(scenario()) == events


def test_step_overhead_measures_a_window_of_the_running_server(serve: Serve, llama_dir,
                                                                tmp_path) -> None:
    """bench.step_overhead end to end on a small window (its request path is bench.serve's)."""
    from pagedserve.bench import step_overhead

    out = tmp_path / "step_overhead.json"
    code = step_overhead.main([
        "--base-url", serve.base_url, "--model", str(llama_dir), "--served-model-name", "",
        "--num-running", "3", "--window-steps", "3", "--skip-steps", "1", "--max-tokens", "1000",
        "--finish-margin", "600", "--prompt-len", "8,16", "--timeout", "60", "--out", str(out)])
    report = json.loads(out.read_text())["per_step"]
    assert code == 0 and report["clean"] and report["mean_batch"] == 3
    assert report["steps"] >= 1 and report["execute_ms"] > 0
    assert 0 <= report["overhead_share"] < 1


def test_bench_serve_sweeps_rates_and_compares_with_offline(serve: Serve, llama_dir,
                                                           tmp_path) -> None:
    """bench.serve end to end on a small workload: a two-rate sweep against the running server,
    then the saturated run's requests through the offline LLM."""
    from pagedserve.bench import serve as bench_serve

    out = tmp_path / "serve.json"
    code = bench_serve.main([
        "--base-url", serve.base_url, "--model", str(llama_dir), "--num-requests", "4",
        "--request-rate", "20,inf", "--compare-offline", "--rounds", "3", "--out", str(out)])
    results = json.loads(out.read_text())
    assert code == 0 and [r["request_rate"] for r in results["runs"]] == [20.0, "inf"]
    shares = results["comparison"]["round_shares"]  # three rounds, the median one reported
    assert len(shares) == 3 and results["comparison"]["serve_share_of_offline"] == sorted(shares)[1]
    variants = [r["prompt_variant"] for r in results["runs"]]  # round r's prompts: 2r and 2r + 1
    assert variants[0] % 2 == 0 and variants[1] == variants[0] + 1
    for run in results["runs"]:
        assert run["completed"] == 4 and run["failed"] == 0
        assert run["output_tokens"] == run["asked_output_tokens"] > 0
        assert run["ttft_ms"]["p99"] >= run["ttft_ms"]["median"] > 0
    comparison = results["comparison"]
    assert comparison["offline"]["output_tokens_per_s"] > 0
    assert comparison["serve_share_of_offline"] > 0


def test_bench_targets_reads_the_three_benchmarks(serve: Serve, llama_dir, tmp_path) -> None:
    """bench.targets' table from small runs of the benchmarks it runs: each figure is the one its
    benchmark wrote, and the verdicts follow the issue's bounds."""
    from pagedserve.bench import serve as bench_serve
    from pagedserve.bench import step_overhead, targets, throughput

    common = ["--model", str(llama_dir)]
    assert throughput.main([*common, "--num-requests", "4", "--hf-batch-sizes", "2",
                            "--hf-dtypes", "float32", "--out", str(tmp_path / "throughput.json")]) == 0
    assert bench_serve.main([*common, "--base-url", serve.base_url, "--num-requests", "4",
                             "--compare-offline", "--out", str(tmp_path / "serve.json")]) == 0
    assert step_overhead.main([
        *common, "--base-url", serve.base_url, "--served-model-name", "", "--num-running", "3",
        "--window-steps", "3", "--skip-steps", "1", "--max-tokens", "1000", "--finish-margin",
        "600", "--prompt-len", "8,16", "--timeout", "60",
        "--out", str(tmp_path / "step_overhead.json")]) == 0
    rows = targets.targets(tmp_path)
    offline = json.loads((tmp_path / "throughput.json").read_text())
    served = json.loads((tmp_path / "serve.json").read_text())["runs"][-1]["output_throughput"]
    step = json.loads((tmp_path / "step_overhead.json").read_text())["per_step"]
    ps, hf = offline["pagedserve"], offline["transformers"]
    assert [t.measured for t in rows] == pytest.approx([
        ps["output_tokens_per_s"] / hf["output_tokens_per_s"],
        ps["computed_tokens_per_s"] / offline["roofline"]["ceiling_tokens_per_s"],
        served / json.loads((tmp_path / "serve.json").read_text())["comparison"]["offline"][
            "output_tokens_per_s"],
        step["overhead_share"]])
    assert [t.met for t in rows] == [rows[0].measured >= 4, rows[1].measured >= 0.5,
                                     rows[2].measured >= 0.85, rows[3].measured <= 0.1]
    targets.print_table(rows)


def test_bench_connections_holds_them_all_and_counts_each_outcome(serve: Serve) -> None:
    """bench.connections against the running server: every connection streams exactly the
    tokens it asked for (the server's queue limit is far above 40), and the server's processes
    are found and their descriptors and threads read before and after."""
    from pagedserve.bench import connections

    args = connections.parse_args(["--base-url", serve.base_url, "--connections", "40",
                                   "--max-tokens", "6"])
    result = connections.run(serve.base_url, args)
    assert result["outcomes"] == {"completed": 40}
    assert result["open_peak"] == 40 and result["retry_after_missing"] == 0
    names = {name.split(":")[0] for name in result["resources_after"]}
    assert names == {"serve", "executor", "scheduler", "router"}
    assert result["resources_after"].keys() == result["resources_before"].keys()
