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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from pagedserve.executor.request_state import RequestState
from pagedserve.protos import executor_pb2

GREEDY_EPS = 1e-5  # temperatures below this are greedy
_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingMetadata:
    """Per-row sampling parameters as tensors; row i is the i-th request that samples this step."""

    temperature: torch.Tensor  # [S] float32; < GREEDY_EPS means greedy
    top_k: torch.Tensor  # [S] int64; vocab_size when disabled
    top_p: torch.Tensor  # [S] float32; 1 when disabled
    min_p: torch.Tensor  # [S] float32; 0 when disabled
    presence_penalty: torch.Tensor  # [S] float32
    frequency_penalty: torch.Tensor  # [S] float32
    repetition_penalty: torch.Tensor  # [S] float32; 1 when disabled
    seeds: torch.Tensor  # [S, 2] int64: low and high 32 bits of the seed
    seeded: torch.Tensor  # [S] bool; unseeded rows get seeds from the sampler's generator
    output_positions: torch.Tensor  # [S] int64: outputs so far = index of the token sampled now
    num_logprobs: list[int]  # per row: -1 none, else the number of top logprobs wanted
    # Penalties read the tokens: row i holds prompt then output, valid up to num_tokens[i].
    token_ids: torch.Tensor | None  # [S, L] int64, or None when no row has a penalty
    prompt_lens: torch.Tensor | None  # [S] int64
    num_tokens: torch.Tensor | None  # [S] int64
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, token ids, values)
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) set to -inf

    @property
    def greedy(self) -> torch.Tensor:
        return self.temperature < GREEDY_EPS


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [S] int64
    logprobs: torch.Tensor | None  # [S] float32: raw logprob of each sampled token
    top_token_ids: torch.Tensor | None  # [S, K] int64, K = the largest num_logprobs of the step
    top_logprobs: torch.Tensor | None  # [S, K] float32


def check_sampling_params(request_id: str, p: executor_pb2.SamplingParams, vocab_size: int) -> None:
    """ValueError naming the request and the field for parameters the sampler cannot honour."""

    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"request {request_id!r}: sampling.{field} {why}")

    checks = [
        ("temperature", math.isfinite(p.temperature) and p.temperature >= 0, "must be >= 0"),
        ("top_p", 0 <= p.top_p <= 1, "must be in [0, 1] (0 reads as 1)"),
        ("top_k", p.top_k >= -1, "must be -1, 0 (disabled) or positive"),
        ("min_p", 0 <= p.min_p <= 1, "must be in [0, 1]"),
        ("repetition_penalty", math.isfinite(p.repetition_penalty) and p.repetition_penalty >= 0,
         "must be > 0 (0 reads as 1)"),
        ("presence_penalty", math.isfinite(p.presence_penalty), "must be finite"),
        ("frequency_penalty", math.isfinite(p.frequency_penalty), "must be finite"),
        ("min_tokens", p.min_tokens >= 0, "must be >= 0"),
        ("logprobs", not p.HasField("logprobs") or 0 <= p.logprobs <= vocab_size,
         f"must be in [0, {vocab_size}]"),
        ("logit_bias", all(0 <= t < vocab_size for t in p.logit_bias), f"ids must be in [0, {vocab_size})"),
        ("logit_bias", all(not math.isnan(v) for v in p.logit_bias.values()), "values must not be NaN"),
        ("stop_token_ids", all(0 <= t < vocab_size for t in p.stop_token_ids),
         f"must be in [0, {vocab_size})"),
    ]
    for field, ok, why in checks:
        if not ok:
            raise bad(field, why)


def build_sampling_metadata(
    requests: Sequence[RequestState],
    *,
    vocab_size: int,
    eos_token_ids: Sequence[int],
    token_ids: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> SamplingMetadata:
    """Gather the requests' parameters into tensors (one list per parameter, one op each later).

    token_ids, when given, is a [S, >= max num_tokens] table whose row i holds request i's prompt
    then output, or a function returning it (the executor passes one that slices its persistent
    table); without it the table is built from the requests' lists. Either way it is only read
    when some row has a penalty.
    """
    ps = [r.sampling for r in requests]

    def col(values, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    rep = [p.repetition_penalty or 1.0 for p in ps]
    pres = [p.presence_penalty for p in ps]
    freq = [p.frequency_penalty for p in ps]
    any_penalty = any(x != 1.0 for x in rep) or any(pres) or any(freq)
    md = SamplingMetadata(
        temperature=col([p.temperature for p in ps]),
        top_k=col([p.top_k if p.top_k > 0 else vocab_size for p in ps], torch.int64),
        top_p=col([p.top_p if 0 < p.top_p < 1 else 1.0 for p in ps]),
        min_p=col([p.min_p for p in ps]),
        presence_penalty=col(pres),
        frequency_penalty=col(freq),
        repetition_penalty=col(rep),
        seeds=col([[p.seed & _MASK32, p.seed >> 32] for p in ps], torch.int64).reshape(-1, 2),
        seeded=col([p.HasField("seed") for p in ps], torch.bool),
        output_positions=col([r.num_output_tokens for r in requests], torch.int64),
        num_logprobs=[p.logprobs if p.HasField("logprobs") else -1 for p in ps],
        token_ids=None, prompt_lens=None, num_tokens=None,
        bias=_sparse_bias(ps, device),
        banned=_min_tokens_ban(requests, eos_token_ids, device),
    )
    if any_penalty:
        md.prompt_lens = col([r.num_prompt_tokens for r in requests], torch.int64)
        md.num_tokens = col([r.num_tokens for r in requests], torch.int64)
        if token_ids is None:
            token_ids = _pad_tokens(requests)
        elif callable(token_ids):
            token_ids = token_ids()
        md.token_ids = token_ids.to(device=device, dtype=torch.int64)
    return md


def _pad_tokens(requests: Sequence[RequestState]) -> torch.Tensor:
    width = max(r.num_tokens for r in requests)
    table = torch.zeros(len(requests), width, dtype=torch.int64)
    for i, r in enumerate(requests):
        table[i, : r.num_tokens] = torch.tensor(r.prompt_token_ids + r.output_token_ids)
    return table


def _sparse_bias(ps: Sequence[executor_pb2.SamplingParams], device):
    rows, ids, vals = [], [], []
    for i, p in enumerate(ps):
        for tok, val in p.logit_bias.items():
            rows.append(i)
            ids.append(tok)
            vals.append(val)
    if not rows:
        return None
    return (torch.tensor(rows, device=device), torch.tensor(ids, device=device),
            torch.tensor(vals, dtype=torch.float32, device=device))


def _min_tokens_ban(requests: Sequence[RequestState], eos_token_ids: Sequence[int], device):
    rows, ids = [], []
    for i, r in enumerate(requests):
        p = r.sampling
        if r.num_output_tokens >= p.min_tokens:
            continue
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        rows += [i] * len(stops)
        ids += sorted(stops)
    if not rows:
        return None
    return torch.tensor(rows, device=device), torch.tensor(ids, device=device)


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

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        """logits [S, V] (raw model output) -> the sampled token of each row and its logprobs."""
        logits = logits.float()
        x = apply_penalties_and_bias(logits.clone(), md)
        token_ids = x.argmax(dim=-1)
        random_rows = (~md.greedy).nonzero().flatten()
        if random_rows.numel():
            token_ids[random_rows] = self._sample(x[random_rows], md, random_rows)
        return _with_logprobs(logits, token_ids, md.num_logprobs)

    def _sample(self, x: torch.Tensor, md: SamplingMetadata, rows: torch.Tensor) -> torch.Tensor:
        x = x / md.temperature[rows, None]
        x = apply_min_p(x, md.min_p[rows])
        x = apply_top_k_top_p(x, md.top_k[rows], md.top_p[rows])
        seeds = md.seeds[rows].clone()
        unseeded = ~md.seeded[rows]
        n = int(unseeded.sum())
        if n:
            drawn = torch.randint(0, 1 << 32, (n, 2), generator=self.generator, dtype=torch.int64)
            seeds[unseeded] = drawn.to(seeds.device)
        return inverse_cdf(x, counter_uniform(seeds, md.output_positions[rows]))


def apply_penalties_and_bias(x: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """min_tokens ban, logit bias, then repetition / frequency / presence penalties, in place."""
    if md.banned is not None:
        x[md.banned] = float("-inf")
    if md.bias is not None:
        rows, ids, vals = md.bias
        x.index_put_((rows, ids), vals, accumulate=True)
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
    """Drop tokens whose probability is below min_p times the top one's (in the logit domain)."""
    if not bool((min_p > 0).any()):
        return x
    floor = x.max(dim=-1, keepdim=True).values + torch.log(min_p)[:, None]
    return x.masked_fill(x < floor, float("-inf"))


def apply_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k highest logits (ties with the k-th kept), then the smallest prefix,
    by probability, whose mass reaches top_p. Only the rows that ask are touched, in place."""
    vocab = x.shape[-1]
    k_rows = (top_k < vocab).nonzero().flatten()
    if k_rows.numel():
        xk, k = x[k_rows], top_k[k_rows]
        kth = xk.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        x[k_rows] = xk.masked_fill_(xk < kth, float("-inf"))
    p_rows = (top_p < 1).nonzero().flatten()
    if p_rows.numel():
        x[p_rows] = _top_p(x[p_rows], top_p[p_rows])
    return x


TOP_P_CANDIDATES = 1024  # top-p first looks among this many best tokens; sorts the row if short


def _top_p(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """x [R, V] logits -> a copy with everything past each row's top-p prefix set to -inf.

    The prefix is looked for among each row's TOP_P_CANDIDATES best tokens (a partial sort, much
    cheaper than sorting 100k-token rows); rows whose candidates hold less than top_p of the mass
    are sorted whole.
    """
    num_cand = min(x.shape[-1], TOP_P_CANDIDATES)
    vals, idx = x.topk(num_cand, dim=-1)
    lse = x.logsumexp(dim=-1, keepdim=True)
    out = _keep_mass(x, vals, idx, lse, top_p)
    short = torch.exp(vals - lse).sum(dim=-1) < top_p
    if num_cand < x.shape[-1] and bool(short.any()):
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
