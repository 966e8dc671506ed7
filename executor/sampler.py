"""The sampler: per-request logits processing and the token choice, vectorised over the batch.

One step's rows, each a request that reached the end of its tokens, go through (vLLM V1's order):

    raw logits ──log_softmax──> logprobs returned to the client (raw: before any processing)
        │
        ├─ min_tokens: stop_token_ids, and EOS unless ignore_eos, set to -inf while outputs < min_tokens
        ├─ logit_bias: added
        ├─ penalties: repetition (prompt + output tokens: positive logits divided, negative
        │  multiplied), frequency (minus f * count in the output), presence (minus p if in the output)
        ├──> greedy rows (temperature 0): argmax
        └──> random rows: / temperature -> min-p -> top-k -> top-p -> inverse CDF at one uniform

The uniform is counter-based: a fixed integer hash of (seed, output position). A seeded request
therefore draws the same tokens alone or batched, at any batch row, after preemption or an executor
restart (a token could only flip where rounding moves a probability boundary across the uniform).
Unseeded requests get a fresh 64-bit seed from the executor's generator at every step. One uniform
per row, rather than Gumbel noise over the whole vocabulary, keeps the draw a few passes over the
row (softmax, cumsum, search): hashing V values per row cost more than the forward pass of a small
model on the CPU.

Why EOS is masked under min_tokens only when not ignore_eos: with ignore_eos the scheduler does not
stop on EOS, so EOS is an ordinary token there and min_tokens need not keep it out.

On CUDA every read of a device value by the host (item, tolist, nonzero, bool() of a tensor) and
every blocking copy to the device waits for all queued work. So a step makes exactly one: which rows
are greedy, and which of the others apply top-k / top-p / min-p / penalties, is decided on the host
from the parameters; the step's parameters travel in one buffer per dtype (pinned, one non-blocking
copy each); the results come back in one read (SamplerOutput.to_host).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.executor.request_state import RequestState
from pagedserve.protos import executor_pb2

GREEDY_EPS = 1e-5  # temperatures below this are greedy
# The same bound in float32, where the parameters live (proto floats): the host compares as the
# device would.
_GREEDY_EPS32 = float(np.float32(GREEDY_EPS))
_MASK32 = 0xFFFFFFFF


@dataclass
class RowSet:
    """Some of a batch's rows, chosen on the host from the parameters (no device read chooses them)."""

    rows: list[int]
    index: torch.Tensor | None  # the rows on the device, for gathers; None when they are every row

    @classmethod
    def of(cls, rows: list[int], num_rows: int, device: torch.device) -> RowSet:
        """With its own index (a blocking copy on CUDA; the sampler's come inside its one upload)."""
        every = len(rows) == num_rows
        return cls(rows, None if every else torch.tensor(rows, dtype=torch.int64, device=device))

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.index is None else t[self.index]

    def put(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """x with these rows replaced by values (written into x unless they are every row)."""
        if self.index is None:
            return values
        x[self.index] = values
        return x


@dataclass
class SamplingMetadata:
    """One step's sampling parameters on the device, and the choices the host made from them.

    Row i of the batch is the i-th request that samples this step (S rows). Rows drawn at random
    are `random` (R of them); the others take the argmax and need no parameters. The [R] fields
    hold the random rows' values in that order; tensors are None where nothing reads them.
    """

    random: RowSet  # rows with temperature >= GREEDY_EPS
    temperature: torch.Tensor | None  # [R] float32
    top_k: torch.Tensor | None  # [R] int64; vocab_size when disabled
    top_p: torch.Tensor | None  # [R] float32; 1 when disabled
    min_p: torch.Tensor | None  # [R] float32; 0 when disabled
    seeds: torch.Tensor | None  # [R, 2] int64: low and high 32 bits of the seed
    output_positions: torch.Tensor | None  # [R] int64: outputs so far = index of the token sampled now
    top_k_rows: RowSet  # positions among the random rows whose top_k < vocab_size
    max_top_k: int  # the largest top_k among them
    top_p_rows: RowSet  # positions among the random rows whose top_p < 1
    use_min_p: bool  # some random row has min_p > 0
    unseeded: list[int]  # positions among the random rows whose seed the sampler still draws
    num_logprobs: list[int]  # per row: -1 none, else the number of top logprobs wanted
    # Penalties read the tokens: row i holds prompt then output, valid up to num_tokens[i]. All
    # five are None when no row has a penalty.
    presence_penalty: torch.Tensor | None  # [S] float32
    frequency_penalty: torch.Tensor | None  # [S] float32
    repetition_penalty: torch.Tensor | None  # [S] float32; 1 when disabled
    token_ids: torch.Tensor | None  # [S, L] int64
    prompt_lens: torch.Tensor | None  # [S] int64
    num_tokens: torch.Tensor | None  # [S] int64
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, token ids, values)
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) set to -inf


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [S] int64
    logprobs: torch.Tensor | None  # [S] float32: raw logprob of each sampled token
    top_token_ids: torch.Tensor | None  # [S, K] int64, K = the largest num_logprobs of the step
    top_logprobs: torch.Tensor | None  # [S, K] float32

    def to_host(self) -> HostSamplerOutput:
        """The same as Python lists, read back in one transfer (the step's one sync on CUDA)."""
        if self.logprobs is None:
            return HostSamplerOutput(self.token_ids.tolist(), None, None, None)
        k = 0 if self.top_token_ids is None else self.top_token_ids.shape[1]
        return HostSamplerOutput.from_packed(self.packed().tolist(), k)

    def packed(self) -> torch.Tensor:
        """[S, C] float64, per row: the token, then (when asked) its logprob and the top K ids
        and logprobs. float64 holds every token id (< 2**53) and float32 logprob exactly: one
        tensor, one read (or one message: executor/pipeline_parallel.py)."""
        cols = [self.token_ids[:, None]]
        if self.logprobs is not None:
            cols.append(self.logprobs[:, None])
        if self.top_token_ids is not None:
            cols += [self.top_token_ids, self.top_logprobs]
        return torch.cat([c.double() for c in cols], dim=1)


@dataclass
class HostSamplerOutput:
    """SamplerOutput read back: per row, its token, and the logprobs when some row asked."""

    token_ids: list[int]
    logprobs: list[float] | None
    top_token_ids: list[list[int]] | None  # K per row
    top_logprobs: list[list[float]] | None

    @classmethod
    def from_packed(cls, rows: list[list[float]], k: int) -> HostSamplerOutput:
        """SamplerOutput.packed's rows read back; k: the step's largest num_logprobs (-1: none
        asked, 0: only the sampled token's)."""
        out = cls([int(r[0]) for r in rows], [r[1] for r in rows] if k >= 0 else None, None, None)
        if k > 0:
            out.top_token_ids = [[int(t) for t in r[2 : 2 + k]] for r in rows]
            out.top_logprobs = [r[2 + k :] for r in rows]
        return out


def upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on the device with no blocking copy: from pinned memory, non-blocking, on CUDA."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


class _HostPack:
    """Host values of one dtype laid end to end and sent to the device in one non-blocking copy
    (from pinned memory on CUDA), instead of one blocking copy per parameter. The caching host
    allocator keeps a pinned buffer from reuse until the copy that reads it has run."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.values: list = []
        self.slots: list[tuple[str, tuple[int, ...], int | torch.Tensor]] = []  # name, shape, source

    def add(self, name: str, values: list, shape: tuple[int, ...] | None = None) -> None:
        self.slots.append((name, shape or (len(values),), len(self.values)))
        self.values += values

    def add_rows(self, name: str, rows: list[int], num_rows: int) -> None:
        """A RowSet's index, needed only when the rows are some but not all."""
        if 0 < len(rows) < num_rows:
            self.add(name, rows)

    def add_table(self, name: str, table: torch.Tensor) -> None:
        self.slots.append((name, tuple(table.shape), table))

    def upload(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every slot by name, as a view of the one device copy (on the CPU: the host tensors)."""
        tables = [src for _, _, src in self.slots if isinstance(src, torch.Tensor)]
        if not self.values and not tables:
            return {}
        on_host, pin = device.type == "cpu", device.type == "cuda"
        host = torch.tensor(self.values, dtype=self.dtype, pin_memory=pin and not tables)
        if tables and not on_host:
            parts = [host, *(t.reshape(-1).to(self.dtype) for t in tables)]
            total = sum(t.numel() for t in parts)
            host = torch.cat(parts, out=torch.empty(total, dtype=self.dtype, pin_memory=pin))
        dev = host.to(device, non_blocking=True)
        out, offset = {}, len(self.values)
        for name, shape, src in self.slots:
            if isinstance(src, int):
                out[name] = dev[src : src + math.prod(shape)].view(shape)
            elif on_host:
                out[name] = src.to(self.dtype)
            else:
                out[name] = dev[offset : offset + src.numel()].view(shape)
                offset += src.numel()
        return out


def requested_logprobs(requests: Sequence[RequestState]) -> list[int]:
    """Per row: -1 when no logprobs are asked, else the number of top logprobs wanted."""
    return [r.sampling.logprobs if r.sampling.HasField("logprobs") else -1 for r in requests]


def build_sampling_metadata(
    requests: Sequence[RequestState],
    *,
    vocab_size: int,
    eos_token_ids: Sequence[int],
    token_ids: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> SamplingMetadata:
    """The requests' parameters on the device (one buffer per dtype, one non-blocking copy each)
    and the choices the host makes from them: which rows are greedy, which apply top-k / top-p /
    min-p, whether any has a penalty.

    token_ids, when given, is a [S, >= max num_tokens] table whose row i holds request i's prompt
    then output, or a function returning it (the executor passes one that slices its persistent
    table); without it the table is built from the requests' lists. Either way it is only read
    when some row has a penalty. With a generator (the sampler's: Sampler.metadata) unseeded rows
    get their seeds here, on the host, so they travel with the rest; without one the sampler
    draws them when it runs, from the same generator in the same order.
    """
    device = torch.device(device)
    ps = [r.sampling for r in requests]
    ints, floats = _HostPack(torch.int64), _HostPack(torch.float32)
    random = [i for i, p in enumerate(ps) if p.temperature >= _GREEDY_EPS32]
    ints.add_rows("random", random, len(ps))
    choices = _add_random_rows(ints, floats, [requests[i] for i in random], vocab_size, generator)
    _add_penalties(ints, floats, requests, token_ids)
    _add_bias(ints, floats, ps)
    _add_min_tokens_ban(ints, requests, eos_token_ids)
    t = {**ints.upload(device), **floats.upload(device)}
    k_rows, p_rows, max_top_k, unseeded = choices
    return SamplingMetadata(
        random=RowSet(random, t.get("random")),
        temperature=t.get("temperature"), top_k=t.get("top_k"), top_p=t.get("top_p"),
        min_p=t.get("min_p"), seeds=t.get("seeds"), output_positions=t.get("output_positions"),
        top_k_rows=RowSet(k_rows, t.get("top_k_rows")), max_top_k=max_top_k,
        top_p_rows=RowSet(p_rows, t.get("top_p_rows")),
        use_min_p=any(ps[i].min_p > 0 for i in random), unseeded=unseeded,
        num_logprobs=requested_logprobs(requests),
        presence_penalty=t.get("presence_penalty"), frequency_penalty=t.get("frequency_penalty"),
        repetition_penalty=t.get("repetition_penalty"),
        token_ids=t.get("token_ids"),
        prompt_lens=t.get("prompt_lens"), num_tokens=t.get("num_tokens"),
        bias=(t["bias_rows"], t["bias_ids"], t["bias_values"]) if "bias_rows" in t else None,
        banned=(t["ban_rows"], t["ban_ids"]) if "ban_rows" in t else None,
    )


def _add_random_rows(ints: _HostPack, floats: _HostPack, requests: list[RequestState],
                     vocab_size: int, generator: torch.Generator | None):
    """Pack the random rows' parameters; returns the host's choices: the rows (positions among
    the random ones) that apply top-k and top-p, the largest top_k, the rows still unseeded."""
    if not requests:
        return [], [], 0, []
    ps = [r.sampling for r in requests]
    top_k = [p.top_k if p.top_k > 0 else vocab_size for p in ps]
    top_p = [p.top_p if 0 < p.top_p < 1 else 1.0 for p in ps]
    k_rows = [j for j, k in enumerate(top_k) if k < vocab_size]
    p_rows = [j for j, q in enumerate(top_p) if q < 1]
    ints.add_rows("top_k_rows", k_rows, len(ps))
    ints.add_rows("top_p_rows", p_rows, len(ps))
    floats.add("temperature", [p.temperature for p in ps])
    floats.add("top_p", top_p)
    floats.add("min_p", [p.min_p for p in ps])
    ints.add("top_k", top_k)
    ints.add("output_positions", [r.num_output_tokens for r in requests])
    seeds = [[p.seed & _MASK32, p.seed >> 32] for p in ps]
    unseeded = [j for j, p in enumerate(ps) if not p.HasField("seed")]
    if unseeded and generator is not None:
        # The same draw the sampler would make: one (n, 2) randint, rows in batch order.
        drawn = torch.randint(0, 1 << 32, (len(unseeded), 2), generator=generator, dtype=torch.int64)
        for j, pair in zip(unseeded, drawn.numpy().tolist()):  # a host tensor: no device read
            seeds[j] = pair
        unseeded = []
    ints.add("seeds", [x for pair in seeds for x in pair], (len(ps), 2))
    return k_rows, p_rows, max((top_k[j] for j in k_rows), default=0), unseeded


def _add_penalties(ints: _HostPack, floats: _HostPack, requests: Sequence[RequestState],
                   token_ids: torch.Tensor | Callable[[], torch.Tensor] | None) -> None:
    """Pack the penalties and the token table, when some row has a penalty."""
    ps = [r.sampling for r in requests]
    rep = [p.repetition_penalty or 1.0 for p in ps]
    pres = [p.presence_penalty for p in ps]
    freq = [p.frequency_penalty for p in ps]
    if not (any(x != 1.0 for x in rep) or any(pres) or any(freq)):
        return
    floats.add("presence_penalty", pres)
    floats.add("frequency_penalty", freq)
    floats.add("repetition_penalty", rep)
    ints.add("prompt_lens", [r.num_prompt_tokens for r in requests])
    ints.add("num_tokens", [r.num_tokens for r in requests])
    if token_ids is None:
        token_ids = _pad_tokens(requests)
    elif callable(token_ids):
        token_ids = token_ids()
    ints.add_table("token_ids", token_ids)


def _pad_tokens(requests: Sequence[RequestState]) -> torch.Tensor:
    width = max(r.num_tokens for r in requests)
    return torch.tensor([r.prompt_token_ids + r.output_token_ids + [0] * (width - r.num_tokens)
                         for r in requests], dtype=torch.int64)


def _add_bias(ints: _HostPack, floats: _HostPack, ps: Sequence[executor_pb2.SamplingParams]) -> None:
    rows, ids, values = [], [], []
    for i, p in enumerate(ps):
        for tok, val in p.logit_bias.items():
            rows.append(i)
            ids.append(tok)
            values.append(val)
    if rows:
        ints.add("bias_rows", rows)
        ints.add("bias_ids", ids)
        floats.add("bias_values", values)


def _add_min_tokens_ban(ints: _HostPack, requests: Sequence[RequestState],
                        eos_token_ids: Sequence[int]) -> None:
    rows, ids = [], []
    for i, r in enumerate(requests):
        p = r.sampling
        if r.num_output_tokens >= p.min_tokens:
            continue
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        rows += [i] * len(stops)
        ids += sorted(stops)
    if rows:
        ints.add("ban_rows", rows)
        ints.add("ban_ids", ids)


# ---- counter-based randomness -----------------------------------------------------------------
# 32-bit values carried in int64 tensors; products are split so that nothing overflows int64.


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One uniform in (0, 1) per row, [R] float32, a pure function of (seed, position).

    seeds [R, 2] int64 (low, high 32 bits), positions [R] int64.
    """
    bits = _mix32(_mix32(_mix32(seeds[:, 0] ^ 0x5BD1E995) ^ seeds[:, 1]) ^ (positions & _MASK32))
    bits = _mix32(bits ^ 0x9E3779B9)
    # 23 bits, centred: (k + 0.5) / 2**23 is exact in float32 and never 0 or 1.
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def inverse_cdf(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token of each row whose probability interval (in vocabulary order) holds u.

    x [R, V] logits (-inf where masked), u [R] in (0, 1). A token of probability 0 is never chosen:
    the first index whose cumulative probability reaches u * total always adds mass.
    """
    cdf = x.softmax(dim=-1).cumsum(dim=-1)
    target = (u * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target).squeeze(1).clamp(max=x.shape[-1] - 1)


# ---- the sampler -------------------------------------------------------------------------------


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def metadata(self, requests: Sequence[RequestState], **kwargs) -> SamplingMetadata:
        """build_sampling_metadata with this sampler's generator: unseeded rows get their seeds on
        the host, inside the one upload, rather than in a copy of their own when sampling."""
        return build_sampling_metadata(requests, generator=self.generator, **kwargs)

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        """logits [S, V] (raw model output) -> the sampled token of each row and its logprobs."""
        logits = logits.float()
        x, warped = sampling_logits(logits, md)
        random = md.random
        if warped is None:
            token_ids = x.argmax(dim=-1)
        else:
            drawn = inverse_cdf(warped, counter_uniform(self._seeds(md), md.output_positions))
            if random.index is None:  # every row draws: no argmax, no scatter
                token_ids = drawn
            else:
                token_ids = x.argmax(dim=-1)
                token_ids[random.index] = drawn
        return _with_logprobs(logits, token_ids, md.num_logprobs)

    def _seeds(self, md: SamplingMetadata) -> torch.Tensor:
        if not md.unseeded:
            return md.seeds
        # Metadata built without this generator (build_sampling_metadata called directly): the
        # same draw Sampler.metadata makes, here (on CUDA a copy of its own; the executor's
        # metadata comes with the seeds already drawn).
        n = len(md.unseeded)
        drawn = torch.randint(0, 1 << 32, (n, 2), generator=self.generator, dtype=torch.int64)
        seeds = md.seeds.clone()
        seeds[torch.tensor(md.unseeded, device=seeds.device)] = drawn.to(seeds.device)
        return seeds


def sampling_logits(logits: torch.Tensor, md: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [S, V] float32 -> (processed [S, V], warped [R, V] or None when no row draws).

    The sampler's whole path from logits to what it draws from, written once: Sampler.__call__
    takes greedy rows' argmax of `processed` (after the min_tokens ban, logit bias and
    penalties) and draws the random rows from softmax(`warped`) (their processed logits divided
    by temperature, -inf outside min-p, top-k and top-p). Pure, so tests can hold the kept set
    and probabilities against an independent reference (tests/executor/test_sampling_rules.py).
    """
    # Only the ban and the bias write in place; the penalties make a new tensor.
    in_place = md.banned is not None or md.bias is not None
    x = apply_penalties_and_bias(logits.clone() if in_place else logits, md)
    if not md.random.rows:
        return x, None
    return x, warp_logits(md.random.take(x), md)


def warp_logits(x: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """x [R, V]: the random rows' processed logits -> / temperature -> min-p -> top-k -> top-p
    (vLLM V1's order; min-p reads the probabilities after temperature)."""
    x = x / md.temperature[:, None]
    if md.use_min_p:
        x = apply_min_p(x, md.min_p)
    return _top_k_top_p(x, md.top_k, md.top_p, md.top_k_rows, md.top_p_rows, md.max_top_k)


def apply_penalties_and_bias(x: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """min_tokens ban, logit bias (both in place), then repetition / frequency / presence
    penalties (into a new tensor, returned)."""
    if md.banned is not None:
        x[md.banned] = float("-inf")
    if md.bias is not None:
        # Each (row, id) pair is there once, so a plain add suffices; index_put_ with
        # accumulate=True range-checks its indices with a read back on CUDA.
        rows, ids, vals = md.bias
        x[rows, ids] = x[rows, ids] + vals
    if md.token_ids is None:
        return x
    num_rows, vocab = x.shape
    col = torch.arange(md.token_ids.shape[1], device=x.device)
    held = col[None, :] < md.num_tokens[:, None]
    is_output = held & (col[None, :] >= md.prompt_lens[:, None])
    # Invalid cells scatter into an extra column `vocab` that is dropped.
    counts = torch.zeros(num_rows, vocab + 1, device=x.device)
    counts.scatter_add_(1, torch.where(is_output, md.token_ids, vocab), is_output.float())
    counts = counts[:, :vocab]
    seen = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=x.device)
    seen.scatter_(1, torch.where(held, md.token_ids, vocab), True)
    seen = seen[:, :vocab]
    rep = md.repetition_penalty[:, None]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x -= md.frequency_penalty[:, None] * counts
    x -= md.presence_penalty[:, None] * (counts > 0).float()
    return x


def apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top one's (in the logit domain).
    A row with min_p 0 keeps everything (its floor is -inf); the sampler skips the call when no
    row has min_p, which it knows on the host."""
    floor = x.max(dim=-1, keepdim=True).values + torch.log(min_p)[:, None]
    return x.masked_fill(x < floor, float("-inf"))


def apply_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k highest logits (ties with the k-th kept), then the smallest prefix,
    by probability, whose mass reaches top_p. Only the rows that ask are touched.

    This entry point reads top_k and top_p back to find those rows (a sync on CUDA); the sampler
    passes the rows it chose on the host from the parameters.
    """
    vocab, num_rows = x.shape[-1], x.shape[0]
    ks, ps = top_k.tolist(), top_p.tolist()
    k_rows = [i for i, k in enumerate(ks) if k < vocab]
    p_rows = [i for i, p in enumerate(ps) if p < 1]
    return _top_k_top_p(x, top_k, top_p, RowSet.of(k_rows, num_rows, x.device),
                        RowSet.of(p_rows, num_rows, x.device), max((ks[i] for i in k_rows), default=0))


def _top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, k_rows: RowSet,
                 p_rows: RowSet, max_top_k: int) -> torch.Tensor:
    """apply_top_k_top_p with its rows and the largest top_k of k_rows given by the host."""
    if k_rows.rows:
        xk, k = k_rows.take(x), k_rows.take(top_k)
        kth = xk.topk(max_top_k, dim=-1).values.gather(1, (k - 1)[:, None])
        x = k_rows.put(x, xk.masked_fill_(xk < kth, float("-inf")))
    if p_rows.rows:
        x = p_rows.put(x, _top_p(p_rows.take(x), p_rows.take(top_p)))
    return x


TOP_P_CANDIDATES = 1024  # top-p first looks among this many best tokens on the CPU


def _top_p(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """x [R, V] logits -> a copy with everything past each row's top-p prefix set to -inf.

    On the CPU the prefix is looked for among each row's TOP_P_CANDIDATES best tokens (a partial
    sort, much cheaper there than sorting 100k-token rows); rows whose candidates hold less than
    top_p of the mass are sorted whole. Finding those rows is a read of the device, so on a GPU,
    where a full sort is cheap next to a sync, every row is sorted whole.
    """
    vocab = x.shape[-1]
    lse = x.logsumexp(dim=-1, keepdim=True)
    if x.device.type != "cpu" and vocab > TOP_P_CANDIDATES:
        vals, idx = x.sort(dim=-1, descending=True)
        return _keep_mass(x, vals, idx, lse, top_p)
    vals, idx = x.topk(min(vocab, TOP_P_CANDIDATES), dim=-1)
    out = _keep_mass(x, vals, idx, lse, top_p)
    if vocab <= TOP_P_CANDIDATES:
        return out
    short = torch.exp(vals - lse).sum(dim=-1) < top_p
    if bool(short.any()):  # a host read: the CPU's own memory, no sync
        xs = x[short]
        vals_s, idx_s = xs.sort(dim=-1, descending=True)
        out[short] = _keep_mass(xs, vals_s, idx_s, lse[short], top_p[short])
    return out


def _keep_mass(x: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, lse: torch.Tensor,
               top_p: torch.Tensor) -> torch.Tensor:
    """vals/idx: each row's best logits, descending; keeps the shortest prefix holding top_p of
    the row's probability (lse: the row's logsumexp), -inf elsewhere."""
    probs = torch.exp(vals - lse)
    drop = probs.cumsum(dim=-1) - probs >= top_p[:, None]  # the mass before it already suffices
    drop[:, 0] = False  # the top token always stays
    return torch.full_like(x, float("-inf")).scatter_(-1, idx, vals.masked_fill(drop, float("-inf")))


def _with_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: list[int]) -> SamplerOutput:
    k = max(num_logprobs, default=-1)
    if k < 0:
        return SamplerOutput(token_ids, None, None, None)
    logprobs = torch.log_softmax(logits, dim=-1)
    sampled = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    if k == 0:
        return SamplerOutput(token_ids, sampled, None, None)
    top = logprobs.topk(k, dim=-1)
    return SamplerOutput(token_ids, sampled, top.indices, top.values)
