"""The scheduler: request queues, continuous batching under a token budget, and the step loop.

Requests that share a prompt (n > 1 siblings, or separate requests with one long system prompt) share
its full blocks through the prefix cache: a waiting request whose next uncached full block is being
computed by a running request waits, keeping its place in the queue, until that block is in the
cache, instead of computing the same KV twice. See `_waits_for_shared_blocks`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from pagedserve.protos import executor_pb2
from pagedserve.protos.choice_seed import choice_seed
from pagedserve.scheduler.block_pool import BlockHash
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.kv_cache_manager import KVCacheManager, blocks_for
from pagedserve.scheduler.outputs import RequestOutputDelta, SchedulerStats
from pagedserve.scheduler.request import Request, RequestStatus, StopParams
from pagedserve.scheduler.request_spec import RequestSpec
from pagedserve.scheduler.speculation import EXECUTOR_DRAFT, SpecCounters, Speculator
from pagedserve.scheduler.stop import check_stop


@dataclass
class _InFlight:
    """The plan handed out by schedule() and not yet answered by apply_result()."""

    step_id: int
    # request id -> (request, whether this step computes its last held token, so it samples,
    # the drafts it verifies: scheduler/speculation.py)
    scheduled: dict[str, tuple[Request, bool, list[int]]] = field(default_factory=dict)


class Scheduler:
    """Plans steps and consumes their results; it never calls an executor. A driver runs
    schedule() -> an executor's execute() -> apply_result(): scheduler/driver.py in one process
    (the offline LLM, tests), scheduler/step_loop.py over gRPC."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.kv = KVCacheManager(config)
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the newest is last
        self._forget: list[str] = []  # ids for the next plan's forget_request_ids
        self._deltas: list[RequestOutputDelta] = []  # aborts, reported by the next apply_result
        # plans handed out by schedule() / schedule_ahead() and not yet answered, oldest first
        self._in_flight: deque[_InFlight] = deque()
        self._next_step_id = 0
        self._num_arrivals = 0
        self.num_preemptions = 0
        spec = config.speculative
        self.speculator = (Speculator(spec, config.block_size, config.max_model_len)
                           if spec is not None else None)

    # ---- requests in and out -------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    sampling: executor_pb2.SamplingParams, *, max_tokens: int,
                    min_tokens: int = 0, stop_token_ids: Sequence[int] = (),
                    ignore_eos: bool = False, cache_salt: str = "", n: int = 1) -> list[str]:
        """Checks and queues a request (see RequestSpec); returns the ids it was queued under."""
        return self.add(RequestSpec.create(
            self.config, request_id, prompt_token_ids, sampling, max_tokens=max_tokens,
            min_tokens=min_tokens, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
            cache_salt=cache_salt, n=n))

    def add(self, spec: RequestSpec) -> list[str]:
        """Queues a checked request; returns the ids it was queued under.

        n == 1 queues it as its request_id. n > 1 queues n children f"{request_id}-{i}", each with
        its own outputs (a seeded child i draws with seed + i, so siblings differ yet stay
        reproducible); they share the prompt's full blocks through the prefix cache.
        """
        n, rid0 = spec.n, spec.request_id
        ids = [rid0] if n == 1 else [f"{rid0}-{i}" for i in range(n)]
        for rid in ids:
            if rid in self.requests:
                raise ValueError(f"request_id {rid!r} is already in use")
        for i, rid in enumerate(ids):
            req = Request(rid, list(spec.prompt_token_ids),
                          _executor_sampling(spec.sampling, spec.stop, i, n), spec.stop,
                          self._num_arrivals, spec.cache_salt,
                          output_token_ids=list(spec.output_token_ids))
            self._num_arrivals += 1
            self.requests[rid] = req
            self.waiting.append(req)
        return ids

    def abort(self, request_id: str) -> bool:
        """Drops a request at any time; False when it is unknown or already finished.

        Its blocks are freed now; the executor forgets it in the next plan; the next
        apply_result reports it finished with reason 'abort'.
        """
        req = self.requests.get(request_id)
        if req is None:
            return False
        if req.status is RequestStatus.RUNNING:
            self._retire(req, RequestStatus.FINISHED_ABORTED)
        else:
            self.waiting.remove(req)
            del self.requests[request_id]
            req.status = RequestStatus.FINISHED_ABORTED
        self._deltas.append(_delta(req, [], None, None))
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> SchedulerStats:
        kv = self.kv.stats()
        queries, hits = kv.prefix_cache_query_tokens, kv.prefix_cache_hit_tokens
        spec = self.speculator.counters if self.speculator is not None else SpecCounters()
        return SchedulerStats(
            num_waiting=len(self.waiting), num_running=len(self.running),
            num_preemptions=self.num_preemptions, blocks_total=kv.blocks_total,
            blocks_free=kv.blocks_free, blocks_in_use=kv.blocks_total - kv.blocks_free,
            blocks_cached=kv.blocks_cached, prefix_cache_queries=queries,
            prefix_cache_hits=hits, prefix_cache_hit_rate=hits / queries if queries else 0.0,
            spec_draft_tokens=spec.draft_tokens, spec_accepted_tokens=spec.accepted_tokens,
            spec_verifications=spec.verifications)

    def reset_executor_state(self) -> None:
        """After an executor restart: requeue every running request for recompute, lose none.

        Running requests go back to the front of the waiting queue in admission order, keeping their
        outputs; the prefix cache is dropped, because the new executor's KV cache is empty.
        """
        for req in reversed(self.running):
            self.kv.free(req)
            req.status = RequestStatus.PREEMPTED
            req.num_computed_tokens = 0
            self.waiting.appendleft(req)
        self.running.clear()
        self._forget.clear()
        self._in_flight.clear()
        self.kv.clear_prefix_cache()

    # ---- one step --------------------------------------------------------------------------------

    def schedule(self) -> executor_pb2.StepPlan:
        # The policy. There is no prefill phase or decode phase: each request holds tokens (prompt
        # plus outputs) and has some of them computed (their KV is in its blocks). Each step gives
        # tokens to RUNNING requests first, in admission order, then to WAITING ones in arrival
        # order (preempted ones at the front), within max_num_batched_tokens and max_num_seqs, so
        # that computed catches up with held. A long prompt is chunked to the budget left; a new
        # request starts at its longest cached prefix. A running request takes no more tokens than
        # its blocks plus the free ones hold; when not even one fits, the NEWEST running request
        # (maybe itself) is preempted: its blocks are freed (full
        # computed ones stay in the prefix cache), it goes to the front of the waiting queue, the
        # executor forgets it, and it is later recomputed from its prompt and outputs so far.
        # Waiting requests are admitted only if their blocks can be allocated; they never preempt
        # running ones, and none are admitted in a step that preempted.
        if self._in_flight:
            raise RuntimeError("schedule() called twice without apply_result()")
        plan = self._new_plan()
        budget = self.config.max_num_batched_tokens
        preemptions_before = self.num_preemptions
        budget = self._schedule_running(plan, budget)
        if self.num_preemptions == preemptions_before:
            self._schedule_waiting(plan, budget)
        plan.forget_request_ids.extend(self._forget)
        self._forget.clear()
        return plan

    def _new_plan(self) -> executor_pb2.StepPlan:
        self._in_flight.append(_InFlight(self._next_step_id))
        self._next_step_id += 1
        return executor_pb2.StepPlan(step_id=self._next_step_id - 1)

    def schedule_ahead(self) -> executor_pb2.StepPlan | None:
        """The step after the one in flight, planned before its result (async scheduling, so the
        executor finds its next plan waiting): each running request computes the token the step in
        flight samples for it, which the executor holds (a plan carries no ids of held tokens).

        None, planning nothing, unless that is all a plan made after the result would do: exactly
        one plan in flight, in which every running request samples (no prompt chunks, no drafts);
        no request waits for a seat; the pool grows them all without preemption. A request that
        the step in flight ends by length is left out; one it ends with a stop token has this
        step's token computed in vain, and apply_result drops it."""
        if len(self._in_flight) != 1 or self.speculator is not None or (
                self.waiting and len(self.running) < self.config.max_num_seqs):
            return None
        last = self._in_flight[-1].scheduled
        if not all(r.request_id in last and last[r.request_id][0] is r and last[r.request_id][1]
                   and not last[r.request_id][2] for r in self.running):
            return None
        going_on = [r for r in self.running if not self._ends_by_length_next(r)]
        needed = sum(blocks_for(r.num_computed_tokens + 1, self.config.block_size)
                     - len(r.block_ids) for r in going_on)
        if (not going_on or len(going_on) > self.config.max_num_batched_tokens
                or needed > self.kv.num_free_blocks):
            return None
        plan = self._new_plan()
        for req in going_on:
            self.kv.grow(req, 1)
            plan.continuing_requests.add(request_id=req.request_id, num_scheduled_tokens=1,
                                         new_block_ids=self.kv.take_new_block_ids(req))
            req.num_computed_tokens += 1  # one past the held tokens until the result appends
            self._in_flight[-1].scheduled[req.request_id] = (req, True, [])
        plan.forget_request_ids.extend(self._forget)
        self._forget.clear()
        return plan

    def _ends_by_length_next(self, req: Request) -> bool:
        """Whether the token being sampled for it ends the request by max_tokens or length."""
        return (req.num_output_tokens + 1 >= req.stop.max_tokens
                or req.num_tokens + 1 >= self.config.max_model_len)

    def _schedule_running(self, plan: executor_pb2.StepPlan, budget: int) -> int:
        """Gives tokens to running requests in order, preempting the newest when blocks run out."""
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = self._num_new_tokens(req, budget)
            while num_new == 0:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    return budget
                num_new = self._num_new_tokens(req, budget)
            drafts = self._drafts(req, num_new, budget, i)
            self.kv.grow(req, num_new + len(drafts))
            by_executor = drafts[:1] == [EXECUTOR_DRAFT]  # a draft model proposes them
            plan.continuing_requests.add(request_id=req.request_id,
                                         new_block_ids=self.kv.take_new_block_ids(req),
                                         num_scheduled_tokens=num_new + len(drafts),
                                         draft_token_ids=[] if by_executor else drafts,
                                         num_speculative_tokens=len(drafts) if by_executor else 0)
            self._mark_scheduled(req, num_new, drafts)
            budget -= num_new + len(drafts)
            i += 1
        return budget

    def _drafts(self, req: Request, num_new: int, budget: int, index: int) -> list[int]:
        """The proposal for running request `index` (none without speculation); it may use free
        blocks beyond one each for the running requests after it."""
        if self.speculator is None:
            return []
        spare = self.kv.num_free_blocks - (len(self.running) - index - 1)
        return self.speculator.drafts(req, num_new, budget, spare, len(self.running))

    def _num_new_tokens(self, req: Request, budget: int) -> int:
        """How many tokens a running request computes this step: 0 means it needs a free block.

        block_size 4; 11 tokens held (prompt + outputs), 5 computed, 4 of budget left:

            position      0  1  2  3 | 4  5  6  7 | 8  9  10
            computed      =  =  =  =   =
            scheduled                     +  +  +    +
            held, later                                 .  .
            block table   [    b0    | [    b1    | [  b2, new  ]

            num_new = min(held - computed, budget, (blocks held + free blocks) * 4 - computed)
                    = min(11 - 5, 4, ...) = 4
            blocks after = ceil((computed + num_new) / 4) = ceil(9 / 4) = 3: grow() appends b2

        The executor samples when computed + num_new == held (position 10 here, a later step).
        The token sampled last step is held but not computed: computing it is a 1-token step.
        """
        held_left = req.num_tokens - req.num_computed_tokens
        assert held_left > 0, f"{req.request_id} is running with nothing to compute"
        return max(0, min(held_left, budget, self.kv.max_new_tokens(req)))

    def _schedule_waiting(self, plan: executor_pb2.StepPlan, budget: int) -> None:
        """Admits waiting requests in order while budget, seats and blocks last."""
        pending = {h for r in self.running for h in self.kv.pending_hashes(r)}
        deferred: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hit = self.kv.cached_prefix(req)
            if self._waits_for_shared_blocks(req, len(hit), pending):
                deferred.append(self.waiting.popleft())
                continue
            num_new = min(req.num_tokens - len(hit) * self.config.block_size, budget)
            num_hit_tokens = self.kv.admit(req, hit, num_new)
            if num_hit_tokens is None:
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_hit_tokens
            self._admit(plan, req, num_new)
            pending.update(self.kv.pending_hashes(req))
            budget -= num_new
        self.waiting.extendleft(reversed(deferred))

    def _waits_for_shared_blocks(self, req: Request, num_hit_blocks: int,
                                 pending: set[BlockHash]) -> bool:
        """True when the next full block the request could take from the cache is being computed.

        A running request holding the same prefix will register that block once computed; the
        waiting one stays in place (later arrivals may pass it meanwhile) and finds it cached in a
        later step. If that running request is preempted or finishes first, the block stops being
        pending, so no request waits forever.
        """
        max_hit_blocks = (req.num_tokens - 1) // self.config.block_size
        return (bool(pending) and num_hit_blocks < max_hit_blocks
                and req.block_hashes[num_hit_blocks] in pending)

    def _admit(self, plan: executor_pb2.StepPlan, req: Request, num_new: int) -> None:
        """Moves a request that just got its blocks to running, sending its full data."""
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = req.num_computed_tokens
        plan.new_requests.add(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                              output_token_ids=req.output_token_ids, sampling=req.sampling,
                              block_ids=self.kv.take_new_block_ids(req),
                              num_computed_tokens=req.num_computed_tokens,
                              num_scheduled_tokens=num_new)
        self._mark_scheduled(req, num_new)

    def _mark_scheduled(self, req: Request, num_new: int, drafts: list[int] | None = None) -> None:
        """Counts num_new held tokens computed; drafts count once accepted (apply_result)."""
        assert self._in_flight and num_new > 0
        req.num_computed_tokens += num_new
        assert req.num_computed_tokens <= min(req.num_tokens, self.config.max_model_len)
        assert len(req.block_ids) * self.config.block_size \
            >= req.num_computed_tokens + len(drafts or ())
        samples = req.num_computed_tokens == req.num_tokens
        self._in_flight[-1].scheduled[req.request_id] = (req, samples, drafts or [])

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        self.waiting.appendleft(req)
        self._forget.append(req.request_id)
        self.num_preemptions += 1

    def _retire(self, req: Request, status: RequestStatus) -> None:
        """Ends a running request: frees its blocks, and the executor forgets it next step."""
        self.running.remove(req)
        self.kv.free(req)
        self._forget.append(req.request_id)
        del self.requests[req.request_id]
        req.status = status

    # ---- results ---------------------------------------------------------------------------------

    def apply_result(self, result: executor_pb2.StepResult) -> list[RequestOutputDelta]:
        """Appends sampled tokens, applies stop rules, registers newly computed full blocks."""
        if not self._in_flight:
            raise RuntimeError("apply_result() without a scheduled step")
        in_flight = self._in_flight[0]
        if result.step_id != in_flight.step_id:
            raise RuntimeError(f"result for step {result.step_id}, expected {in_flight.step_id}")
        self._in_flight.popleft()
        live = {rid: entry for rid, entry in in_flight.scheduled.items()
                if self.requests.get(rid) is entry[0]}
        for req, _, _ in live.values():
            self.kv.cache_computed_blocks(req)
        deltas, self._deltas = self._deltas, []
        outputs = {out.request_id: out for out in result.outputs}
        for rid, (req, samples, drafts) in live.items():
            out = outputs.pop(rid, None)
            if samples != (out is not None):
                raise RuntimeError(f"executor {'omitted' if samples else 'sent'} a token for "
                                   f"{rid!r} in step {result.step_id}")
            if out is not None:
                deltas.append(self._apply_output(req, out, drafts))
        unknown = [rid for rid in outputs if rid not in in_flight.scheduled]
        if unknown:
            raise RuntimeError(f"executor sent tokens for unscheduled requests {unknown}")
        return deltas

    def _apply_output(self, req: Request, out: executor_pb2.RequestOutput,
                      drafts: list[int]) -> RequestOutputDelta:
        """Appends one request's tokens up to the first that stops it; accepted drafts (all the
        tokens but the last) were computed this step."""
        if not out.token_ids:
            raise RuntimeError(f"executor sent no token ids for {req.request_id!r}")
        if len(out.token_ids) > 1 or drafts:
            if self.speculator is None:
                raise RuntimeError(f"executor sent {len(out.token_ids)} tokens for "
                                   f"{req.request_id!r}, which had no drafts")
            req.num_computed_tokens += self.speculator.accepted(req, drafts, list(out.token_ids))
        status = None
        taken = 0
        for token_id in out.token_ids:
            req.append_output(token_id)
            taken += 1
            status = check_stop(req, self.config.eos_token_ids, self.config.max_model_len)
            if status is not None:
                break
        if status is not None:
            self._retire(req, status)
        logprobs = list(out.logprobs[:taken]) if out.logprobs else None
        top = list(out.top_logprobs[:taken]) if out.top_logprobs else None
        return _delta(req, list(out.token_ids[:taken]), logprobs, top)


def _executor_sampling(sampling: executor_pb2.SamplingParams, stop: StopParams, child: int,
                       n: int) -> executor_pb2.SamplingParams:
    """The executor's sampling params: a copy of the caller's with the stop rules written in
    (the sampler masks stop tokens under min_tokens), and child i's seed (protos/choice_seed.py)."""
    out = executor_pb2.SamplingParams()
    out.CopyFrom(sampling)
    out.min_tokens = stop.min_tokens
    out.stop_token_ids[:] = sorted(stop.stop_token_ids)
    out.ignore_eos = stop.ignore_eos
    if n > 1 and sampling.HasField("seed"):
        out.seed = choice_seed(sampling.seed, child)
    return out


def _delta(req: Request, token_ids: list[int], logprobs: list[float] | None,
           top: list[executor_pb2.TopLogprobs] | None) -> RequestOutputDelta:
    return RequestOutputDelta(
        request_id=req.request_id, new_token_ids=token_ids, new_logprobs=logprobs,
        new_top_logprobs=top, finished=req.status.is_finished,
        finish_reason=req.status.finish_reason, num_prompt_tokens=req.num_prompt_tokens,
        num_cached_tokens=max(0, req.num_cached_tokens))
