"""The executor: takes a StepPlan, computes it, returns a StepResult.

One step:
  1. check the whole plan against the held state (nothing changes if it is invalid);
  2. forget the plan's forget_request_ids first, then take in new requests and continuing diffs;
  3. one forward over every scheduled token, flat (prompt chunks and decode tokens together);
  4. the requests whose computed tokens reach the end of their held tokens sample one token, which
     the executor appends to its own copy of the output (it is computed at the request's next step).
A request whose scheduled tokens stop short of the end (a prompt chunk) produces no output. One
scheduled with speculative drafts after its held tokens samples a token at each of them and keeps
the drafts its samples confirm, then one token more (executor/draft_rows.py); the drafts come with
the plan, or from the executor's draft model before step 3 (executor/draft_model.py).
"""

from __future__ import annotations

import time

import structlog
import torch

from pagedserve.executor.batch_invariance import make_batch_invariant
from pagedserve.executor.config import DEFAULT_CPU_KV_CACHE_BYTES, ExecutorConfig
from pagedserve.executor.draft_model import DraftModel
from pagedserve.executor.draft_rows import SampleRows, num_accepted, sample_rows
from pagedserve.executor.host_memory import keep_freed_memory
from pagedserve.executor.input_batch import InputBatch, StepInputs
from pagedserve.executor.kv_cache import KVCache, resolve_kv_dtype
from pagedserve.executor.kv_scales import read_kv_scales
from pagedserve.executor.layers.attention import PagedAttention
from pagedserve.executor.loader import check_pipeline_parallel, check_tensor_parallel, load_model
from pagedserve.executor.models.pipeline_stage import StageLayers
from pagedserve.executor.pipeline_parallel import PipelineStage
from pagedserve.executor.rank_devices import rank_device
from pagedserve.executor.request_state import RequestState
from pagedserve.executor.sampler import HostSamplerOutput, Sampler, requested_logprobs, upload
from pagedserve.executor.structured import StructuredOutputs, check_structured
from pagedserve.executor.tensor_parallel import RankGroup, weight_bytes
from pagedserve.protos import executor_pb2
from pagedserve.protos.request_checks import (
    RequestRefused,
    check_sampling_params,
    check_token_ids,
)

log = structlog.get_logger("pagedserve.executor")
CUDA_KV_CACHE_FRACTION = 0.9  # of the memory free after loading weights, when no budget is given


class Executor:
    def __init__(self, config: ExecutorConfig, *, rank: int = 0, own_gpu: bool = False):
        """rank: this process's of config.world_size (stage * tensor_parallel_size + tensor-
        parallel rank: executor/pipeline_parallel.py); rank 0 (the executor the scheduler talks
        to) starts the others (executor/tensor_parallel.py), which build theirs with their rank.
        own_gpu: this process sees only its own GPU (a Ray actor; executor/rank_devices.py)."""
        tp = config.tensor_parallel_size
        self.config, self.rank, self.ranks, self.own_gpu = config, rank, None, own_gpu
        self.tp_rank, self.pp_rank = rank % tp, rank // tp
        if config.world_size > 1 and rank == 0:
            self._check_ranks(config)
            self.ranks = RankGroup(config)  # they load while this rank does
        try:
            self._build(config)
            if self.ranks is not None:
                self.ranks.join(weight_bytes(self.model))
                self._agree_kv_blocks(self.ranks.rank_kv_blocks)
                if self.pipeline is not None:  # a dead rank of any stage fails the wait
                    self.pipeline.watch = self.ranks.failure
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _check_ranks(config: ExecutorConfig) -> None:
        """What the model's config shows several ranks cannot run, before any rank starts."""
        kw = {"model_impl": config.model_impl, "trust_remote_code": config.trust_remote_code,
              "quantization": config.quantization}
        if config.tensor_parallel_size > 1:
            check_tensor_parallel(config.model, config.tensor_parallel_size, **kw)
        if config.pipeline_parallel_size > 1:
            check_pipeline_parallel(config.model, config.pipeline_parallel_size, **kw)

    def _build(self, config: ExecutorConfig) -> None:
        self.device = torch.device(rank_device(config.device, self.rank, config.world_size,
                                               own_gpu=self.own_gpu))
        if self.device.type == "cpu":
            keep_freed_memory()
        elif config.world_size > 1:  # NCCL and the Triton launches use the current device
            torch.cuda.set_device(self.device)
        self.model, self.model_config = load_model(
            config.model, dtype=config.dtype, device=self.device, model_impl=config.model_impl,
            trust_remote_code=config.trust_remote_code, quantization=config.quantization,
            tp_rank=self.tp_rank, tp_size=config.tensor_parallel_size, pp_rank=self.pp_rank,
            pp_size=config.pipeline_parallel_size)
        mc = self.model_config
        # this rank's pipeline stage: its layers' KV cache only (all layers with one stage)
        self.stage = StageLayers.of(mc.num_layers, self.pp_rank, config.pipeline_parallel_size)
        # this rank's KV heads: a 1/N share, or one replicated head when fewer heads than ranks
        self.num_kv_heads = mc.num_kv_heads // min(config.tensor_parallel_size, mc.num_kv_heads)
        self.dtype = next(self.model.parameters()).dtype
        if config.batch_invariant:
            make_batch_invariant(self.model, getattr(self.model, "backend", None), self.dtype)
        # speculative decoding's draft model (executor/draft_model.py), before the pool is sized
        self.draft = (DraftModel(config.draft_model, config.model, mc, self.dtype, self.device)
                      if config.draft_model else None)
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len: {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {mc.max_position_embeddings}")
        # auto: K/V in the model's dtype (they come out of the model in it, so a wider cache would
        # hold no more information); a narrower one (--kv-cache-dtype) holds more tokens per byte.
        self.kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, self.dtype)
        self.num_kv_blocks = self._num_kv_blocks()
        self.max_model_len = self._fit_max_model_len()
        scales = read_kv_scales(config.model, mc.num_layers) if self.kv_dtype.itemsize == 1 else None
        own = slice(self.stage.start, self.stage.end)
        self.kv_cache = KVCache(len(self.stage.layers), self.num_kv_blocks, config.block_size,
                                self.num_kv_heads, mc.head_dim, self.kv_dtype, self.device,
                                *((scales[0][own], scales[1][own]) if scales else (None, None)))
        self._give_layers_kv_scales()
        if self.draft is not None:
            self.draft.check_max_model_len(self.max_model_len)
            self.draft.allocate(self.num_kv_blocks, config.block_size)
        self.batch = InputBatch(max_num_seqs=config.max_num_seqs,
                                max_num_batched_tokens=config.max_num_batched_tokens,
                                max_model_len=self.max_model_len, block_size=config.block_size,
                                device=self.device)
        self.sampler = Sampler(config.seed)
        self.pipeline = (PipelineStage(self.stage, self.rank, config.tensor_parallel_size,
                                       config.pipeline_parallel_size, mc.hidden_size, self.dtype,
                                       self.device)
                         if config.pipeline_parallel_size > 1 else None)
        self.requests: dict[str, RequestState] = {}
        # grammar matchers of the constrained requests (executor/structured.py)
        self.structured = StructuredOutputs(config.model, mc.vocab_size, mc.eos_token_ids,
                                            self.device)
        self._compile_attention_kernels()

    def _give_layers_kv_scales(self) -> None:
        """Native models' attention layers, one per KV layer in order, read their cache's
        scales (the transformers fallback takes them from the cache at each call)."""
        layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        if not layers:
            return
        assert len(layers) == len(self.kv_cache.k), "one attention layer per KV cache layer"
        for i, layer in enumerate(layers):
            layer.k_scale, layer.v_scale = self.kv_cache.k_scale[i], self.kv_cache.v_scale[i]

    def _compile_attention_kernels(self) -> None:
        """On CUDA, every Triton attention variant the steps can launch compiles now, not in a
        step (kernels/triton/precompile.py); the elementwise kernels compile at the first step."""
        warmup = getattr(getattr(self.model, "backend", None), "warmup", None)
        layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        if self.device.type != "cuda" or warmup is None or not layers:
            return
        warmup(self.kv_cache.k[0], self.kv_cache.v[0], num_q_heads=layers[0].num_heads,
               dtype=self.dtype,
               max_num_seqs=self.config.max_num_seqs, softcap=layers[0].softcap,
               sliding_windows={layer.sliding_window for layer in layers})

    def _fit_max_model_len(self) -> int:
        """One request of max_model_len tokens must fit the pool alone (the scheduler refuses
        less, every time it starts): a max_model_len left to the model's default is cut to the
        pool; one given explicitly that does not fit is an error naming both."""
        capacity = self.num_kv_blocks * self.config.block_size
        if self.max_model_len <= capacity:
            return self.max_model_len
        if self.config.max_model_len is not None:
            raise ValueError(
                f"max_model_len: {self.max_model_len} tokens do not fit the KV cache "
                f"({self.num_kv_blocks} blocks of {self.config.block_size} = {capacity} tokens); "
                "give more num_kv_blocks / kv_cache_memory_bytes or a smaller max_model_len")
        log.info("max_model_len cut to what the KV cache holds", max_model_len=capacity,
                 model_max=self.max_model_len)
        return capacity

    def _num_kv_blocks(self) -> int:
        mc, config = self.model_config, self.config
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        budget = config.kv_cache_memory_bytes
        if budget is None:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # blocks torch holds but no tensor uses count as free
                budget = int(torch.cuda.mem_get_info(self.device)[0] * CUDA_KV_CACHE_FRACTION)
                # each tensor-parallel rank has a GPU of its own: this one's share, times the ranks
                budget *= config.tensor_parallel_size
            else:
                budget = DEFAULT_CPU_KV_CACHE_BYTES
        per_block = KVCache.bytes_per_block(mc.num_layers, config.block_size, self.num_kv_heads,
                                            mc.head_dim, self.kv_dtype)
        if self.draft is not None:  # the draft's pools hold the same blocks
            per_block += self.draft.bytes_per_block(config.block_size)
        # The budget is for all tensor-parallel ranks together (on the CPU they share the
        # machine's memory): every rank holds the same blocks, each with its own heads. Pipeline
        # stages hold the same blocks too, each for its own layers: so one block costs all
        # layers' bytes per tensor-parallel rank, and every stage finds the same count.
        per_block *= config.tensor_parallel_size
        if budget < per_block:
            raise ValueError(f"kv_cache_memory_bytes: {budget} is less than one block ({per_block} bytes)")
        return budget // per_block

    def _agree_kv_blocks(self, others: list[int]) -> None:
        """Rank 0 plans with the fewest blocks any rank holds: on CUDA each rank sized its pool
        from its own GPU's free memory (on the CPU every rank finds the same count)."""
        fewest = min([self.num_kv_blocks, *others])
        if fewest < self.num_kv_blocks:
            log.info("KV blocks cut to the smallest rank's pool", num_kv_blocks=fewest,
                     own=self.num_kv_blocks)
            self.num_kv_blocks = fewest
            self.max_model_len = self._fit_max_model_len()

    def describe(self) -> executor_pb2.DescribeResponse:
        mc = self.model_config
        return executor_pb2.DescribeResponse(
            model=self.config.model, architecture=mc.architecture,
            dtype=str(self.dtype).removeprefix("torch."), vocab_size=mc.vocab_size,
            max_model_len=self.max_model_len, eos_token_ids=list(mc.eos_token_ids),
            block_size=self.config.block_size, num_kv_blocks=self.num_kv_blocks,
            num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
            device=str(self.device), draft_model=self.config.draft_model or "",
        )

    def weight_bytes_per_rank(self) -> list[int]:
        """Bytes of weights each tensor-parallel rank holds (rank 0 first; one entry at size 1)."""
        if self.ranks is not None:
            return list(self.ranks.rank_weight_bytes)
        return [weight_bytes(self.model)]

    def rank_failure(self) -> str | None:
        """Why the tensor-parallel group can no longer step (a rank died), or None."""
        return self.ranks.failure() if self.ranks is not None else None

    def close(self) -> None:
        """Stops the other tensor-parallel ranks (nothing to do at size 1); idempotent."""
        ranks, self.ranks = getattr(self, "ranks", None), None
        if ranks is not None:
            ranks.close()

    # ---- one step -----------------------------------------------------------------------------

    def execute(self, plan: executor_pb2.StepPlan) -> executor_pb2.StepResult:
        if self.ranks is None:
            if self.config.world_size > 1 and self.rank == 0:
                raise RuntimeError("the tensor-parallel executor is closed (its ranks stopped)")
            return self.execute_local(plan)
        # A plan refused here never reaches the other ranks; one that passes runs on every rank.
        self.ranks.check_alive()
        self._check_plan(plan)
        try:
            self.ranks.broadcast_plan(plan.SerializeToString())
            return self.execute_local(plan, checked=True)
        except RuntimeError as e:
            if self.ranks.collective_failed(e):
                raise self.ranks.dead_rank_error(e) from e
            raise

    @torch.inference_mode()
    def execute_local(self, plan: executor_pb2.StepPlan, *,
                      checked: bool = False) -> executor_pb2.StepResult:
        """The step on this rank alone (every rank runs it on the same plan); checked: the plan
        was checked already."""
        start = time.perf_counter()  # the result's execute_seconds: this whole method
        if not checked:
            self._check_plan(plan)
        for request_id in plan.forget_request_ids:  # unknown ids: nothing to forget
            state = self.requests.pop(request_id, None)
            if state is not None:
                self.batch.remove(state)
                self.structured.forget(request_id)
                if self.draft is not None:
                    self.draft.forget(request_id)
        scheduled: list[tuple[RequestState, int]] = []
        drafts: dict[str, list[int]] = {}
        wanted: dict[str, int] = {}  # drafts the draft model proposes, per request
        for new in plan.new_requests:
            state = RequestState.from_proto(new)
            self.batch.add(state)
            self.requests[state.request_id] = state
            self.structured.add(state.request_id, state.sampling, state.output_token_ids)
            if self.draft is not None:
                self.draft.add(state)
            scheduled.append((state, new.num_scheduled_tokens))
        for cont in plan.continuing_requests:
            state = self.requests[cont.request_id]
            self.batch.append_blocks(state, cont.new_block_ids)
            if cont.draft_token_ids:
                drafts[cont.request_id] = list(cont.draft_token_ids)
                self.batch.write_drafts(state, cont.draft_token_ids)
            if cont.num_speculative_tokens:
                wanted[cont.request_id] = cont.num_speculative_tokens
            scheduled.append((state, cont.num_scheduled_tokens))
        result = executor_pb2.StepResult(step_id=plan.step_id)
        if scheduled:
            self._draft_model_proposes(scheduled, drafts, wanted)
            result.outputs.extend(self._run(scheduled, drafts))
            if self.draft is not None:
                self.draft.settle([s for s, _ in scheduled])
        result.execute_seconds = time.perf_counter() - start
        return result

    def _draft_model_proposes(self, scheduled: list[tuple[RequestState, int]],
                              drafts: dict[str, list[int]], wanted: dict[str, int]) -> None:
        """The draft model computes what the target will (its KV stays in step) and proposes
        the drafts `wanted` asks for, which the target then verifies like any others."""
        if self.draft is None:
            return
        for rid, proposal in self.draft.propose(self.batch, scheduled, wanted).items():
            drafts[rid] = proposal
            self.batch.write_drafts(self.requests[rid], proposal)

    def _run(self, scheduled: list[tuple[RequestState, int]],
             drafts: dict[str, list[int]]) -> list[executor_pb2.RequestOutput]:
        states = [s for s, _ in scheduled]
        inputs = self.batch.prepare(states, [n for _, n in scheduled])
        rows = sample_rows(scheduled, [
            i for i, (s, n) in enumerate(scheduled)
            if s.num_computed_tokens + n == s.num_tokens + len(drafts.get(s.request_id, ()))
        ], drafts)
        samples_here = self.pipeline is None or self.stage.last  # else: the last stage's
        # constrained rows' token masks, computed on a thread while the forward pass runs
        masks = self.structured.start(rows.request_ids) if samples_here else None
        hidden = self._forward(inputs, scheduled)
        for state, n in scheduled:
            state.num_computed_tokens += n
        if not rows.states:
            return []
        if not samples_here:  # a pipeline stage before the last: the samples come from there
            num_logprobs = requested_logprobs(rows.views)
            return self._take_tokens(rows, self.pipeline.share_samples(None, num_logprobs),
                                     num_logprobs)
        logits = self.model.compute_logits(hidden[self._sampled_rows(inputs, scheduled, rows)])
        self.structured.apply(logits, masks)  # before every sampling rule and penalty
        views = rows.views
        md = self.sampler.metadata(
            views, vocab_size=self.model_config.vocab_size,
            eos_token_ids=self.model_config.eos_token_ids,
            token_ids=lambda: self.batch.token_table(views), device=logits.device,
        )
        sampled = self.sampler(logits, md)
        out = (sampled.to_host() if self.pipeline is None  # the step's one read of the device
               else self.pipeline.share_samples(sampled, md.num_logprobs))  # to every stage
        return self._take_tokens(rows, out, md.num_logprobs)

    def _forward(self, inputs: StepInputs,
                 scheduled: list[tuple[RequestState, int]]) -> torch.Tensor | None:
        """The step's final-norm hidden states; with pipeline stages, this stage's part of the
        step (executor/pipeline_parallel.py), and None before the last stage."""
        if self.pipeline is None:
            return self.model(inputs.input_ids, inputs.positions, inputs.attn, self.kv_cache)
        return self.pipeline.forward(self.model, inputs, scheduled, self.kv_cache)

    def _take_tokens(self, rows: SampleRows, out: HostSamplerOutput,
                     num_logprobs: list[int]) -> list[executor_pb2.RequestOutput]:
        """Each sampling request's output: its row's token, or its accepted drafts and one more
        (the KV of the rejected ones is left in slots that the next tokens overwrite)."""
        outputs, row = [], 0
        for state, ds in zip(rows.states, rows.drafts):
            kept = num_accepted(ds, out.token_ids[row : row + len(ds)]) + 1
            state.num_computed_tokens -= len(ds) + 1 - kept
            outputs.append(_request_output(state.request_id, out, range(row, row + kept),
                                           num_logprobs[row]))
            for token in out.token_ids[row : row + kept]:
                self.batch.append_token(state, token)
                self.structured.advance(state.request_id, token)
            row += len(ds) + 1
        return outputs

    def _sampled_rows(self, inputs: StepInputs, scheduled: list[tuple[RequestState, int]],
                      rows: SampleRows) -> torch.Tensor:
        """The flat-batch rows of the sampling rows. When every request samples one token, they
        are the last tokens; otherwise (a prompt chunk, drafts) they are worked out on the host,
        where the scheduled counts are, and sent with a non-blocking copy: indexing a device
        tensor with a Python list would copy the list with a blocking one."""
        if len(rows.views) == len(scheduled):
            return inputs.last_token_indices
        return upload(rows.flat_rows, torch.int64, self.device)

    # ---- plan validation ----------------------------------------------------------------------

    def _check_plan(self, plan: executor_pb2.StepPlan) -> None:
        """ValueError naming the request and field of the first thing the executor cannot run."""
        held = set(self.requests) - set(plan.forget_request_ids)
        seen: set[str] = set()
        total = 0
        for new in plan.new_requests:
            rid = new.request_id
            if rid in held or rid in seen:
                raise ValueError(f"request {rid!r}: request_id is already held by the executor")
            seen.add(rid)
            try:
                self._check_new(new)
            except RequestRefused:
                raise
            except ValueError as e:  # all of it is about this request: refuse it alone
                raise RequestRefused(rid, str(e)) from None
            total += new.num_scheduled_tokens
        for cont in plan.continuing_requests:
            rid = cont.request_id
            if rid not in held:
                raise ValueError(f"request {rid!r}: request_id is not held by the executor "
                                 "(never sent as a new request, or forgotten)")
            if rid in seen:
                raise ValueError(f"request {rid!r}: request_id is scheduled twice in one plan")
            seen.add(rid)
            state = self.requests[rid]
            self._check_blocks(rid, "new_block_ids", cont.new_block_ids)
            if cont.draft_token_ids or cont.num_speculative_tokens:
                self._check_drafts(state, cont)
            self._check_span(rid, state.num_tokens + _num_drafts(cont),
                             state.num_computed_tokens, cont.num_scheduled_tokens,
                             len(state.block_ids) + len(cont.new_block_ids))
            total += cont.num_scheduled_tokens
        if total > self.config.max_num_batched_tokens:
            raise ValueError(f"plan {plan.step_id}: num_scheduled_tokens total {total} exceeds "
                             f"max_num_batched_tokens {self.config.max_num_batched_tokens}")
        if len(held) + len(plan.new_requests) > self.config.max_num_seqs:
            raise ValueError(f"plan {plan.step_id}: new_requests would make "
                             f"{len(held) + len(plan.new_requests)} held requests, more than "
                             f"max_num_seqs {self.config.max_num_seqs}")

    def _check_new(self, new: executor_pb2.NewRequest) -> None:
        rid, vocab = new.request_id, self.model_config.vocab_size
        if not rid:
            raise ValueError("new request: request_id is empty")
        if not new.prompt_token_ids:
            raise ValueError(f"request {rid!r}: prompt_token_ids is empty")
        for field in ("prompt_token_ids", "output_token_ids"):
            check_token_ids(rid, field, getattr(new, field), vocab)
        check_sampling_params(rid, new.sampling, vocab)
        check_structured(rid, new.sampling, self.config.model)
        self._check_blocks(rid, "block_ids", new.block_ids)
        if new.num_computed_tokens < 0:
            raise ValueError(f"request {rid!r}: num_computed_tokens must be >= 0")
        held = len(new.prompt_token_ids) + len(new.output_token_ids)
        self._check_span(rid, held, new.num_computed_tokens, new.num_scheduled_tokens, len(new.block_ids))

    def _check_drafts(self, state: RequestState, cont: executor_pb2.ContinuingRequest) -> None:
        """Drafts follow the held tokens, all computed this step, in the vocabulary, within
        max_model_len, and never for a constrained request (its grammar would need them)."""
        rid, drafts, vocab = state.request_id, cont.draft_token_ids, self.model_config.vocab_size
        self._check_draft_model_request(rid, cont)
        if any(not 0 <= t < vocab for t in drafts):
            raise ValueError(f"request {rid!r}: draft_token_ids holds an id outside [0, {vocab})")
        num = _num_drafts(cont)
        if state.num_computed_tokens + cont.num_scheduled_tokens != state.num_tokens + num:
            raise ValueError(f"request {rid!r}: num_scheduled_tokens {cont.num_scheduled_tokens} "
                             f"must reach exactly past its {num} drafts")
        if state.num_tokens + num > self.max_model_len:
            raise ValueError(f"request {rid!r}: draft_token_ids reach past max_model_len "
                             f"{self.max_model_len}")
        if state.sampling.structured.grammar:
            raise ValueError(f"request {rid!r}: draft_token_ids for a constrained request")

    def _check_draft_model_request(self, rid: str, cont: executor_pb2.ContinuingRequest) -> None:
        """num_speculative_tokens asks the draft model: it must exist, and be asked alone."""
        k = cont.num_speculative_tokens
        if k < 0:
            raise ValueError(f"request {rid!r}: num_speculative_tokens must be >= 0, got {k}")
        if k and self.draft is None:
            raise ValueError(f"request {rid!r}: num_speculative_tokens {k}, but the executor "
                             "has no draft model (speculative_config.method draft_model)")
        if k and cont.draft_token_ids:
            raise ValueError(f"request {rid!r}: draft_token_ids and num_speculative_tokens "
                             "are both set")

    def _check_blocks(self, rid: str, field: str, block_ids) -> None:
        if any(not 0 <= b < self.num_kv_blocks for b in block_ids):
            raise ValueError(f"request {rid!r}: {field} holds a block id outside [0, {self.num_kv_blocks})")

    def _check_span(self, rid: str, held: int, computed: int, scheduled: int, num_blocks: int) -> None:
        """Tokens [computed, computed + scheduled) must exist, fit max_model_len and the blocks."""
        end = computed + scheduled
        if scheduled < 1:
            raise ValueError(f"request {rid!r}: num_scheduled_tokens must be >= 1, got {scheduled}")
        if end > held:
            raise ValueError(f"request {rid!r}: num_scheduled_tokens {scheduled} after {computed} "
                             f"computed reaches token {end}, but the request holds {held}")
        if held > self.max_model_len:
            raise ValueError(f"request {rid!r}: prompt_token_ids + output_token_ids hold {held} "
                             f"tokens, more than max_model_len {self.max_model_len}")
        if num_blocks * self.config.block_size < end:
            raise ValueError(f"request {rid!r}: block_ids: {num_blocks} blocks of "
                             f"{self.config.block_size} cannot hold the {end} computed tokens")
        if num_blocks > self.batch.max_blocks_per_seq:
            raise ValueError(f"request {rid!r}: block_ids: {num_blocks} blocks, more than "
                             f"max_model_len needs ({self.batch.max_blocks_per_seq})")


def _num_drafts(cont: executor_pb2.ContinuingRequest) -> int:
    """The drafts a continuing request verifies: sent, or proposed by the draft model."""
    return len(cont.draft_token_ids) or cont.num_speculative_tokens


def _request_output(request_id: str, out: HostSamplerOutput, rows: range,
                    k: int) -> executor_pb2.RequestOutput:
    """One request's tokens from these sampler rows, with logprobs when asked (k >= 0)."""
    o = executor_pb2.RequestOutput(request_id=request_id,
                                   token_ids=[out.token_ids[i] for i in rows])
    for i in rows:
        if k >= 0:
            o.logprobs.append(out.logprobs[i])
        if k > 0:
            o.top_logprobs.add(token_ids=out.top_token_ids[i][:k], logprobs=out.top_logprobs[i][:k])
    return o
