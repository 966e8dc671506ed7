"""bench.serve's lean streaming client (bench/sse_client.py) against what is known without it: the
server's non-streamed answer to the same greedy request, and hand-made byte streams whose events
are known by construction (split across chunks, CRLF line ends, comments, multi-line data, a
stream that ends mid-event)."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from pagedserve.bench.serve import RequestResult, run_event_loop, send_request
from pagedserve.bench.sse_client import HTTPStatusError, stream_events
from tests.e2e.conftest import Serve

T = TypeVar("T")
GREEDY = {"model": "", "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0,
          "ignore_eos": True}


async def _collect(url: str, payload: dict) -> list[str]:
    return [event async for event in stream_events(url, payload)]


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def test_streamed_completion_is_the_whole_response_in_pieces(serve: Serve) -> None:
    """The events this client reads, against the server's non-streamed answer to the same greedy
    request: their texts join to its text, the one usage chunk is its usage, [DONE] comes last;
    send_request's completion_tokens is that usage's."""
    url = f"{serve.base_url}/v1/completions"
    whole = _post(url, GREEDY)
    streamed = {**GREEDY, "stream": True, "stream_options": {"include_usage": True}}
    events = run_event_loop(_collect(url, streamed))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["text"] for chunk in chunks for c in chunk["choices"])
    assert text == whole["choices"][0]["text"] and text
    assert [chunk.get("usage") for chunk in chunks] == [None] * (len(chunks) - 1) + [whole["usage"]]
    assert whole["usage"]["completion_tokens"] == GREEDY["max_tokens"]
    result = run_event_loop(send_request(url, streamed, RequestResult(prompt_len=4, output_len=12)))
    assert result.ok and result.completion_tokens == GREEDY["max_tokens"]


def test_an_error_status_raises_with_the_body(serve: Serve) -> None:
    payload = {"model": "no-such-model", "prompt": "x", "max_tokens": 2, "stream": True}
    with pytest.raises(HTTPStatusError, match=r"HTTP 404: .*no-such-model"):
        run_event_loop(_collect(f"{serve.base_url}/v1/completions", payload))


def _chunked(pieces: list[bytes]) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n")


async def _against(response: bytes, client: Callable[[str], Awaitable[T]]) -> T:
    """client(url) against a server that answers any request with `response`, byte for byte."""
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readline() not in (b"\r\n", b""):  # the request head
            pass
        writer.write(response)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(reply, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        return await client(f"http://127.0.0.1:{port}/x")


@pytest.mark.parametrize("response, events", [
    (_chunked([b"data: {\"a\"", b": 1}\n\nda", b"ta: two\r\n\r\n: a comment\n\n",
               b"event: x\ndata: line1\ndata:line2\n\ndata: [DONE]\n\n"]),
     ['{"a": 1}', "two", "line1\nline2", "[DONE]"]),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 21\r\n\r\ndata: one\n\ndata: tail", ["one"]),
])
def test_events_are_split_as_the_sse_format_says(response: bytes, events: list[str]) -> None:
    assert run_event_loop(_against(response, lambda url: _collect(url, {}))) == events


TEXTS = ["The", "", " quick", " brown", "", " fox"]  # four chunks with text


def _completion_stream(completion_tokens: int | None, done: bool = True) -> bytes:
    """A streamed completion of TEXTS (empty texts: chunks that carry no text), then the usage
    chunk (unless None), then [DONE] if `done`; cut into 7-byte HTTP chunks, so events straddle
    them."""
    events = [{"choices": [{"index": 0, "text": t}]} for t in TEXTS]
    if completion_tokens is not None:
        events.append({"choices": [], "usage": {"completion_tokens": completion_tokens}})
    body = b"".join(b"data: %s\n\n" % json.dumps(e).encode() for e in events)
    body += b"data: [DONE]\n\n" if done else b""
    return _chunked([body[i:i + 7] for i in range(0, len(body), 7)])


def _send(response: bytes) -> RequestResult:
    return run_event_loop(_against(response, lambda url: send_request(
        url, {}, RequestResult(prompt_len=3, output_len=9))))


@pytest.mark.parametrize("done", [True, False])
def test_send_request_counts_what_the_stream_holds(done: bool) -> None:
    """completion_tokens is the usage chunk's (not a count of chunks); the first chunk with text
    gives ttft and each later one an inter-token latency."""
    result = _send(_completion_stream(9, done))
    assert result.ok and not result.error and result.completion_tokens == 9
    assert len(result.itl_s) == sum(1 for t in TEXTS if t) - 1
    assert 0 < result.ttft_s <= result.ttft_s + sum(result.itl_s) <= result.e2e_s


def test_send_request_without_usage_fails() -> None:
    result = _send(_completion_stream(None))
    assert not result.ok and result.error == "no usage chunk" and result.completion_tokens == 0
    assert len(result.itl_s) == sum(1 for t in TEXTS if t) - 1


@pytest.fixture(scope="module")
def bench_out(serve: Serve, llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bench.step_overhead on a small window and bench.serve's two-rate sweep with the offline
    comparison, each run once against the running server; their JSON in one folder."""
    from pagedserve.bench import serve as bench_serve
    from pagedserve.bench import step_overhead

    out = tmp_path_factory.mktemp("bench")
    assert step_overhead.main([
        "--base-url", serve.base_url, "--model", str(llama_dir), "--served-model-name", "",
        "--num-running", "3", "--window-steps", "3", "--skip-steps", "1", "--max-tokens", "1000",
        "--finish-margin", "600", "--prompt-len", "8,16", "--timeout", "60",
        "--out", str(out / "step_overhead.json")]) == 0
    assert bench_serve.main([
        "--base-url", serve.base_url, "--model", str(llama_dir), "--num-requests", "4",
        "--request-rate", "20,inf", "--compare-offline", "--rounds", "3",
        "--out", str(out / "serve.json")]) == 0
    return out


def test_step_overhead_measures_a_window_of_the_running_server(bench_out: Path) -> None:
    """bench.step_overhead end to end on a small window (its request path is bench.serve's)."""
    report = json.loads((bench_out / "step_overhead.json").read_text())["per_step"]
    assert report["clean"] and report["mean_batch"] == 3
    assert report["steps"] >= 1 and report["execute_ms"] > 0
    assert 0 <= report["overhead_share"] < 1


def test_bench_serve_sweeps_rates_and_compares_with_offline(bench_out: Path) -> None:
    """bench.serve end to end on a small workload: a two-rate sweep against the running server,
    then the saturated run's requests through the offline LLM."""
    results = json.loads((bench_out / "serve.json").read_text())
    assert [r["request_rate"] for r in results["runs"]] == [20.0, "inf"]
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


def test_bench_targets_reads_the_three_benchmarks(bench_out: Path, llama_dir: Path,
                                                  tmp_path: Path) -> None:
    """bench.targets' figures are the ones its benchmarks wrote (the verdicts at the bounds:
    tests/test_bench_targets.py)."""
    from pagedserve.bench import targets, throughput

    for name in ("serve.json", "step_overhead.json"):
        shutil.copy(bench_out / name, tmp_path / name)
    assert throughput.main(["--model", str(llama_dir), "--num-requests", "2", "--dtype", "float32",
                            "--hf-batch-sizes", "2", "--hf-dtypes", "float32",
                            "--out", str(tmp_path / "throughput.json")]) == 0
    offline = json.loads((tmp_path / "throughput.json").read_text())
    served = json.loads((tmp_path / "serve.json").read_text())["comparison"]
    step = json.loads((tmp_path / "step_overhead.json").read_text())["per_step"]
    ps, hf = offline["pagedserve"], offline["transformers"]
    assert [t.measured for t in targets.targets(tmp_path)] == pytest.approx([
        ps["output_tokens_per_s"] / hf["output_tokens_per_s"],
        ps["computed_tokens_per_s"] / offline["roofline"]["ceiling_tokens_per_s"],
        served["serve_share_of_offline"], step["overhead_share"]])


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
