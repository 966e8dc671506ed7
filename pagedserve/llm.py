"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`.

It wires a scheduler and an executor in one process with no network; plans and results are the
same protobuf messages the services exchange, so this path exercises the real contract.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.router.tools import ToolPlan

PromptType = str | dict[str, Any]


@dataclass
class _Pending:
    """A prompt being served: its n completions fill in as deltas arrive."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: dict[str, CompletionOutput] = field(default_factory=dict)


@dataclass
class KVUsage:
    """Peak KV-cache occupancy seen during the last generate() call."""

    peak_blocks_in_use: int = 0
    tokens_at_peak: int = 0
    block_size: int = 16

    @property
    def utilisation_at_peak(self) -> float:
        slots = self.peak_blocks_in_use * self.block_size
        return self.tokens_at_peak / slots if slots else 0.0


class LLM:
    """An engine in one process. Options mirror vLLM's names."""

    def __init__(self, model: str | Path | None = None, *, dtype: str = "auto",
                 max_model_len: int | None = None, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 enable_prefix_caching: bool = True, kv_cache_memory_bytes: int | None = None,
                 num_kv_blocks: int | None = None, seed: int = 0, device: str = "cpu",
                 model_impl: str = "auto", trust_remote_code: bool = False,
                 speculative_config: str | dict | None = None,
                 kv_cache_dtype: str = "auto", quantization: str = "auto",
                 batch_invariant: bool = False, tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, distributed_executor_backend: str = "mp",
                 ray_address: str = "auto") -> None:
        """model_impl: auto (native class when there is one, else transformers' code on
        pagedserve's attention), native or transformers; trust_remote_code: run modeling code
        that ships with the checkpoint; speculative_config: speculative decoding, as vLLM spells
        it (scheduler/speculative_config.py), e.g. {"method": "ngram",
        "num_speculative_tokens": 4} or {"method": "draft_model", "model": PATH,
        "num_speculative_tokens": 4}; kv_cache_dtype: auto (the model's dtype), bfloat16 or fp8
        (executor/kv_cache.py); quantization: auto (the checkpoint's own quantized format, if
        any) or the format it must be in: awq, gptq, compressed-tensors, fp8, or dequantize (a
        GGUF file's tensors expanded at load) (executor/quantization/); batch_invariant: each
        token's logits independent of the batch and of prompt chunking, CPU only
        (executor/batch_invariance.py); tensor_parallel_size: ranks the model is split over, one
        process each on this machine (this one is rank 0; executor/tensor_parallel.py), on CUDA
        one GPU each (executor/rank_devices.py); pipeline_parallel_size: stages the layers are
        cut into, each of tensor_parallel_size ranks (executor/pipeline_parallel.py); close() (or a with block) stops them;
        distributed_executor_backend: how those ranks start, mp (processes on this machine) or
        ray (actors on the Ray cluster at ray_address, "auto": RAY_ADDRESS or the local one;
        executor/rank_launch.py)."""
        from pagedserve.executor.config import ExecutorConfig
        from pagedserve.executor.executor import Executor
        from pagedserve.scheduler.speculative_config import SpeculativeConfig

        speculative = SpeculativeConfig.parse(speculative_config)  # checked before loading
        model = str(model) if model is not None else str(demo_model_dir())
        batched = max_num_batched_tokens or 2048
        self.executor = Executor(ExecutorConfig(
            model=model, dtype=dtype, device=device, block_size=block_size,
            num_kv_blocks=num_kv_blocks, kv_cache_memory_bytes=kv_cache_memory_bytes,
            kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=batched, max_num_seqs=max_num_seqs,
            max_model_len=max_model_len, seed=seed, model_impl=model_impl,
            trust_remote_code=trust_remote_code, quantization=quantization,
            draft_model=speculative.draft_model if speculative is not None else None,
            batch_invariant=batch_invariant, tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            distributed_executor_backend=distributed_executor_backend, ray_address=ray_address,
        ))
        try:
            self._start(model, max_model_len, max_num_seqs, batched, enable_prefix_caching,
                        speculative)
        except BaseException:
            self.close()
            raise

    def _start(self, model: str, max_model_len: int | None, max_num_seqs: int, batched: int,
               enable_prefix_caching: bool, speculative) -> None:
        from pagedserve.scheduler.config import SchedulerConfig
        from pagedserve.scheduler.driver import StepDriver
        from pagedserve.scheduler.scheduler import Scheduler

        desc = self.executor.describe()
        capacity = desc.num_kv_blocks * desc.block_size
        if max_model_len is None:  # one request must fit the pool alone
            max_model_len = min(desc.max_model_len, capacity)
        self.scheduler = Scheduler(SchedulerConfig.from_describe(
            desc, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=batched, enable_prefix_caching=enable_prefix_caching,
            speculative=speculative,
        ))
        self.driver = StepDriver(self.scheduler, self.executor)
        self.tokenizer = load_tokenizer(model)
        self.max_model_len = max_model_len
        self.kv_usage = KVUsage(block_size=desc.block_size)
        self._ids = itertools.count()
        self._grammars = None  # router/grammar_check.py's checker, at the first constraint

    def close(self) -> None:
        """Stops the executor's other tensor-parallel ranks (if any); idempotent."""
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # at interpreter shutdown close() may fail; the ranks then exit with this process
        with contextlib.suppress(Exception):
            self.close()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Serve every prompt to completion; outputs come back in the prompts' order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = _params_per_prompt(sampling_params, len(prompts))
        pending = [self._add(p, sp) for p, sp in zip(prompts, params)]
        self._run(pending, use_tqdm)
        return [_finish(p, self.tokenizer) for p in pending]

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool | None = None, add_generation_prompt: bool = True,
             chat_template: str | None = None, tools: list[dict[str, Any]] | None = None,
             tool_choice: str | dict[str, Any] | None = None, parallel_tool_calls: bool = True,
             tool_call_parser: str | None = None) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, through the model's chat template.

        tools (OpenAI function tools) are given to the template. tool_choice 'required' or a
        named function constrains the output by the grammar the server builds
        (router/tools.py), so the calls always parse and validate; 'auto' needs a
        tool_call_parser (the server's --tool-call-parser names). Where calls are read, each
        CompletionOutput has content and tool_calls. Tools with neither tool_choice nor a
        parser reach the template only, and the text comes back as written (as in vLLM)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        params = _params_per_prompt(sampling_params, len(conversations))
        plans = [_tool_plan(tools, tool_choice, parallel_tool_calls, tool_call_parser, p)
                 for p in params]
        prompts = [self._chat_prompt(conv, plan.template_tools, add_generation_prompt,
                                     chat_template) for conv, plan in zip(conversations, plans)]
        params = [p if plan.constraint is None else p.constrained_by(plan.constraint)
                  for p, plan in zip(params, plans)]
        outputs = self.generate(prompts, params, use_tqdm)
        for out, plan in zip(outputs, plans):
            if plan.parse is not None:
                self._read_tool_calls(out, plan)
        return outputs

    def _chat_prompt(self, conversation: Sequence[dict], tools: list[dict] | None,
                     add_generation_prompt: bool, chat_template: str | None) -> dict[str, Any]:
        from pagedserve.router.tools import template_message

        text = self.tokenizer.apply_chat_template(
            [template_message(dict(m)) for m in conversation], tools=tools, tokenize=False,
            add_generation_prompt=add_generation_prompt, chat_template=chat_template)
        return {"prompt": text,
                "prompt_token_ids": self.tokenizer(text, add_special_tokens=False).input_ids}

    def _read_tool_calls(self, output: RequestOutput, plan: ToolPlan) -> None:
        """Each completion's text read by the plan's parser, as the server reads a chat's."""
        from pagedserve.router.chat_output import ChatOutput

        eos = set(self.executor.describe().eos_token_ids)
        for c in output.outputs:
            text = c.text
            if plan.keep_special_tokens:  # the parser's markers are special tokens
                ids = c.token_ids[:-1] if c.token_ids and c.token_ids[-1] in eos else c.token_ids
                text = self.tokenizer.decode(ids, skip_special_tokens=False)
            chat = ChatOutput.for_request(plan, None)
            chat.feed(text, final=True)
            message = chat.message()
            c.content, c.tool_calls = message["content"], message.get("tool_calls", [])

    def _tokens_of(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = [int(t) for t in prompt["prompt_token_ids"]]
            return prompt.get("prompt"), ids
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self.tokenizer(prompt["prompt"]).input_ids
        raise ValueError("prompts: each prompt must be a string or a dict with 'prompt_token_ids' "
                         f"or 'prompt', got {type(prompt).__name__}")

    def _add(self, prompt: PromptType, params: SamplingParams) -> _Pending:
        text, ids = self._tokens_of(prompt)
        vocab = self.executor.describe().vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt_token_ids: token ids must be in [0, {vocab})")
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens is longer than max_model_len "
                             f"({self.max_model_len})")
        if params.constraint is not None:
            self._check_constraint(params)
        request_id = str(next(self._ids))
        room = max(1, self.max_model_len - len(ids))  # max_model_len also stops it (scheduler)
        max_tokens = min(params.max_tokens or room, room)
        child_ids = self.scheduler.add_request(
            request_id, ids, params.to_proto(), max_tokens=max_tokens,
            min_tokens=min(params.min_tokens, max_tokens), stop_token_ids=params.stop_token_ids,
            ignore_eos=params.ignore_eos, n=params.n,
        )
        pending = _Pending(request_id, text, ids, params)
        for i, cid in enumerate(child_ids):
            pending.completions[cid] = CompletionOutput(
                index=i, text="", token_ids=[],
                cumulative_logprob=None if params.logprobs is None else 0.0,
                logprobs=None if params.logprobs is None else [],
            )
        return pending

    def _check_constraint(self, params: SamplingParams) -> None:
        """ValueError naming the field when the constraint does not compile for this model."""
        from pagedserve.router.errors import RouterError
        from pagedserve.router.grammar_check import GrammarChecker, make_tokenizer

        if self._grammars is None:  # a GGUF file's tokenizer is router/gguf_tokenizer.py's
            desc = self.executor.describe()
            self._grammars = GrammarChecker(make_tokenizer(
                self.tokenizer.backend_tokenizer.to_str(), desc.vocab_size, desc.eos_token_ids))
        try:
            self._grammars.check(params.constraint)
        except RouterError as e:
            raise ValueError(e.message) from None

    def _run(self, pending: list[_Pending], use_tqdm: bool | None) -> None:
        by_child = {cid: c for p in pending for cid, c in p.completions.items()}
        left = {p.request_id: len(p.completions) for p in pending}
        owner = {cid: p.request_id for p in pending for cid in p.completions}
        bar = _progress_bar(len(pending), use_tqdm)
        self.kv_usage = KVUsage(block_size=self.kv_usage.block_size)
        while self.scheduler.has_unfinished():
            for delta in self.driver.step():
                completion = by_child.get(delta.request_id)
                if completion is None:
                    continue
                _apply_delta(completion, delta)
                if delta.finished:
                    left[owner[delta.request_id]] -= 1
                    if bar is not None and left[owner[delta.request_id]] == 0:
                        bar.update(1)
            self._track_kv_usage()
        if bar is not None:
            bar.close()

    def _track_kv_usage(self) -> None:
        stats = self.scheduler.stats()
        if stats.blocks_in_use > self.kv_usage.peak_blocks_in_use:
            self.kv_usage.peak_blocks_in_use = stats.blocks_in_use
            self.kv_usage.tokens_at_peak = sum(
                r.num_computed_tokens for r in self.scheduler.running
            )


def _apply_delta(completion: CompletionOutput, delta) -> None:
    completion.token_ids.extend(delta.new_token_ids)
    if completion.logprobs is not None and delta.new_logprobs is not None:
        completion.cumulative_logprob += sum(delta.new_logprobs)
        tops = delta.new_top_logprobs or [None] * len(delta.new_token_ids)
        for tok, lp, top in zip(delta.new_token_ids, delta.new_logprobs, tops):
            ranked = dict(zip(top.token_ids, top.logprobs)) if top is not None else {}
            completion.logprobs.append({**ranked, tok: lp})
    if delta.finished:
        completion.finish_reason = delta.finish_reason


def _finish(pending: _Pending, tokenizer) -> RequestOutput:
    outputs = sorted(pending.completions.values(), key=lambda c: c.index)
    for c in outputs:
        c.text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
    return RequestOutput(pending.request_id, pending.prompt, pending.prompt_token_ids, outputs,
                         finished=True)


def _tool_plan(tools: Any, tool_choice: Any, parallel_tool_calls: bool, parser: str | None,
               params: SamplingParams) -> ToolPlan:
    """router/tools.py's plan for these tool fields (one implementation for the server and
    LLM); ValueError naming the field at fault."""
    from pagedserve.router.errors import RouterError
    from pagedserve.router.tool_parsers import PARSERS
    from pagedserve.router.tools import plan_tools, template_only

    if parser is not None and parser not in PARSERS:
        raise ValueError(f"tool_call_parser: must be one of {', '.join(sorted(PARSERS))}, got "
                         f"{parser!r}")
    try:
        if tools is not None and tool_choice is None and parser is None:
            return template_only(tools)
        return plan_tools(tools, tool_choice, parallel_tool_calls, parser, params.constraint)
    except RouterError as e:
        raise ValueError(f"{e.param}: {e.message}") from None


def _params_per_prompt(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"sampling_params: got {len(params)} for {count} prompts; pass one, "
                         "or one per prompt")
    return params


def _progress_bar(total: int, use_tqdm: bool | None):
    if use_tqdm is None:
        use_tqdm = sys.stderr.isatty()
    if not use_tqdm:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)


def demo_model_dir() -> Path:
    """The default model: SmolLM2-135M-Instruct, fetched once into the cache directory."""
    from pagedserve.real_model import real_model_path

    return real_model_path()


def load_tokenizer(model: str):
    """transformers' tokenizer for an HF-format directory. For a GGUF file, the router's tokenizer
    built from its metadata, wrapped for transformers: the same one the server uses (transformers'
    own GGUF tokenizer splits numbers unlike llama.cpp for some files, see router/gguf_tokenizer.py)."""
    from pagedserve.router.gguf_tokenizer import find_gguf_file, load_gguf_tokenizer

    gguf_file = find_gguf_file(model)
    if gguf_file is None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model)
    from transformers import PreTrainedTokenizerFast

    tok, special, template = load_gguf_tokenizer(gguf_file)
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template,
                                   model_max_length=1 << 30, **special)
