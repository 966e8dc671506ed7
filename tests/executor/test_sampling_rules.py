"""Every sampling rule, alone and in the pairs and triples users combine, against an independent
reference: transformers' own logits processors and warpers, applied in the order its generate()
applies them (sequence bias -> repetition penalty -> min new tokens -> temperature -> top-k ->
top-p -> min-p). The sampler's kept set must equal the reference's exactly and its probabilities
must agree to float32 rounding, at temperatures other than 1, where the order of the rules shows.

Temperature comes before top-k and top-p in all three of pagedserve, vLLM V1 and generate() (top-k
is unaffected by it, top-p is not: at T=3 the top-p set grows), and logit bias comes before the
repetition penalty in both vLLM V1 and generate(), so transformers is the reference for those.
Where pagedserve follows vLLM V1 / OpenAI rather than transformers, the reference is a plain
torch formula written here, and the case says so:
- presence and frequency penalties (OpenAI's; transformers has none): subtract
  frequency * count + presence * (count > 0), counting the output tokens only (vLLM; the prompt
  counts for the repetition penalty alone).
- min-p runs before top-k and top-p (vLLM V1), after temperature (both). With top-k the two
  orders keep the same set (both keep a prefix by probability, and min-p's threshold is relative
  to the top token, which renormalising does not move); with top-p they differ, because top-p
  measures mass after min-p has removed the tail.
- min_tokens masks the request's stop_token_ids as well as EOS (vLLM); transformers' processor
  takes the union as its eos_token_id list.
A structured-output mask reaches the sampler as -inf in its input logits (executor.py applies it
before every rule), so those cases start from logits with -inf entries.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pagedserve.executor.request_state import RequestState
from pagedserve.executor.sampler import (
    Sampler,
    build_sampling_metadata,
    counter_uniform,
    sampling_logits,
)
from pagedserve.protos import executor_pb2

V = 64
EOS = (1, 3)
PROMPT = [5, 6, 7, 9, 9, 12, 40]
OUTPUT = [9, 12, 12, 20, 33, 33, 33]
ATOL = 2e-6  # float32 rounding of probabilities in [0, 1]


def f32(x: float) -> float:
    """The value the sampler sees: parameters travel as proto float32."""
    return float(np.float32(x))


def req(output: list[int] = OUTPUT, **sampling) -> RequestState:
    return RequestState("r", list(PROMPT), list(output), executor_pb2.SamplingParams(**sampling), [], 0)


def random_logits(rows: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * scale


def ours(logits: torch.Tensor, requests: list[RequestState]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampler's own processed [S, V] and warped [R, V] logits (the path Sampler.__call__ takes)."""
    md = build_sampling_metadata(requests, vocab_size=V, eos_token_ids=EOS)
    return sampling_logits(logits, md)


def hf(row: torch.Tensor, r: RequestState, processors: list[LogitsProcessor]) -> torch.Tensor:
    """One row through transformers' processors, in the given order; input_ids is prompt + output."""
    ids = torch.tensor([r.prompt_token_ids + r.output_token_ids])
    return LogitsProcessorList(processors)(ids, row[None].clone())[0]


def kept(x: torch.Tensor) -> set[int]:
    return set(x.isfinite().nonzero().flatten().tolist())


def assert_same_distribution(got: torch.Tensor, want: torch.Tensor) -> None:
    """The same kept set, exactly, and the same probabilities to float32 rounding."""
    assert kept(got) == kept(want)
    assert torch.allclose(got.softmax(-1), want.softmax(-1), atol=ATOL, rtol=1e-5)


# ---- transformers as the reference ---------------------------------------------------------------


def tf_warpers(temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """generate()'s warpers for these parameters, in generate()'s order."""
    out: list[LogitsProcessor] = [TemperatureLogitsWarper(f32(temperature))]
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        out.append(TopPLogitsWarper(f32(top_p)))
    if min_p:
        out.append(MinPLogitsWarper(f32(min_p)))
    return out


# (sampling parameters, seed of the logits): each rule alone, then the pairs and triples, at
# temperatures 0.5 and 3 (and 1 for the rules alone).
WARPER_CASES = [
    dict(temperature=0.5), dict(temperature=3.0),
    dict(temperature=1.0, top_k=5), dict(temperature=1.0, top_p=0.8), dict(temperature=1.0, min_p=0.2),
    *[dict(temperature=t, top_k=7) for t in (0.5, 3.0)],
    *[dict(temperature=t, top_p=p) for t in (0.5, 3.0) for p in (0.5, 0.9)],
    *[dict(temperature=t, min_p=m) for t in (0.5, 3.0) for m in (0.05, 0.3)],
    *[dict(temperature=t, top_k=10, top_p=0.7) for t in (0.5, 3.0)],
    *[dict(temperature=t, top_k=4, top_p=0.95) for t in (0.5, 3.0)],
    # min-p with top-k: the orders commute (see the module docstring), so generate()'s is a reference.
    *[dict(temperature=t, top_k=12, min_p=0.1) for t in (0.5, 3.0)],
]


@pytest.mark.parametrize("params", WARPER_CASES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warpers_match_transformers(params, seed):
    logits = random_logits(1, seed)
    r = req(**params)
    _, warped = ours(logits, [r])
    assert_same_distribution(warped[0], hf(logits[0], r, tf_warpers(**params)))


def test_temperature_changes_the_top_p_set_in_these_cases():
    """The cases above can tell temperature-then-top-p from top-p-then-temperature (the order
    the planted bug swaps): at T=3 and at T=0.5 the two orders keep different sets."""
    logits = random_logits(1, 0)[0]
    for t in (0.5, 3.0):
        right = hf(logits, req(), tf_warpers(t, top_p=0.9))
        swapped = hf(logits, req(), [TopPLogitsWarper(f32(0.9)), TemperatureLogitsWarper(f32(t))])
        assert kept(right) != kept(swapped)


def test_min_tokens_with_top_k_matches_transformers():
    """EOS and the stop ids are the three best tokens: masked, they leave top-k to the next ones."""
    logits = random_logits(1, 3)
    logits[0, [1, 3, 8]] = torch.tensor([9.0, 8.5, 8.0])
    for output, stops in [(OUTPUT, [8]), (OUTPUT[:2], [8]), (OUTPUT[:2], [])]:
        r = req(output=output, temperature=3.0, top_k=4, min_tokens=5, stop_token_ids=stops)
        _, warped = ours(logits, [r])
        banned = MinNewTokensLengthLogitsProcessor(len(PROMPT), 5, list(EOS) + stops)
        want = hf(logits[0], r, [banned, *tf_warpers(3.0, top_k=4)])
        assert_same_distribution(warped[0], want)
        assert (1 in kept(warped[0])) == (len(output) >= 5)


@pytest.mark.parametrize("temperature,top_p", [(0.5, 0.9), (3.0, 0.6)])
def test_logit_bias_with_top_p_matches_transformers(temperature, top_p):
    logits = random_logits(1, 4)
    bias = {2: 3.0, 17: -2.5, 40: 1.25, 63: 6.0}
    r = req(temperature=temperature, top_p=top_p, logit_bias=bias)
    _, warped = ours(logits, [r])
    seq_bias = SequenceBiasLogitsProcessor([[[t], f32(b)] for t, b in bias.items()])
    want = hf(logits[0], r, [seq_bias, *tf_warpers(temperature, top_p=top_p)])
    assert_same_distribution(warped[0], want)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, 0, 0.9), (3.0, 8, 1.0), (3.0, 0, 0.7)])
def test_repetition_penalty_with_bias_and_warpers_matches_transformers(penalty, temperature, top_k, top_p):
    """Bias then repetition penalty (both orders agree: generate() and vLLM V1), on tokens of the
    prompt and of the output, then the warpers. Token 9 is biased and repeated."""
    logits = random_logits(1, 5)
    bias = {9: 1.5, 50: 2.0}
    r = req(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty,
            logit_bias=bias)
    processed, warped = ours(logits, [r])
    before = [SequenceBiasLogitsProcessor([[[t], f32(b)] for t, b in bias.items()]),
              RepetitionPenaltyLogitsProcessor(f32(penalty))]
    assert torch.allclose(processed[0], hf(logits[0], r, before), atol=1e-6)
    want = hf(logits[0], r, before + tf_warpers(temperature, top_k=top_k, top_p=top_p))
    assert_same_distribution(warped[0], want)


def test_greedy_takes_the_argmax_after_bias_penalty_and_min_tokens():
    """Temperature 0 skips the warpers: the argmax of transformers' processed logits."""
    logits = random_logits(8, 6)
    for i in range(8):
        top = logits[i].topk(3).indices.tolist()
        bias = {top[1]: 0.5 * i - 1.0}
        r = req(output=OUTPUT[: i + 1], temperature=0.0, repetition_penalty=1.0 + 0.4 * i,
                logit_bias=bias, min_tokens=4, stop_token_ids=[top[0]])
        token = Sampler()(logits[i : i + 1], build_sampling_metadata([r], vocab_size=V, eos_token_ids=EOS))
        before = [SequenceBiasLogitsProcessor([[[t], f32(b)] for t, b in bias.items()]),
                  RepetitionPenaltyLogitsProcessor(f32(1.0 + 0.4 * i)),
                  MinNewTokensLengthLogitsProcessor(len(PROMPT), 4, [*EOS, top[0]])]
        assert token.token_ids.item() == hf(logits[i], r, before).argmax().item()


def test_structured_mask_then_rules_matches_transformers():
    """A grammar's mask is -inf in the logits the sampler receives: top-k and top-p count only
    the allowed tokens, and min-p's top token is the best allowed one."""
    logits = random_logits(1, 7)
    logits[0, logits[0].topk(6).indices] = float("-inf")  # the grammar forbids the six best
    logits[0, 30:] = float("-inf")
    for params in [dict(temperature=3.0, top_p=0.8), dict(temperature=0.5, top_k=5),
                   dict(temperature=3.0, min_p=0.3), dict(temperature=3.0, top_k=6, top_p=0.9)]:
        _, warped = ours(logits, [req(**params)])
        assert_same_distribution(warped[0], hf(logits[0], req(), tf_warpers(**params)))
        assert kept(warped[0]) <= set(range(30))


def test_min_p_keeps_a_token_exactly_at_the_threshold():
    """Both generate() and vLLM drop only tokens whose probability is below min_p * the top one's:
    a token at exactly half the top probability stays at min_p 0.5 (the logits make the ratio
    exact in float32: log(0.5) is -log(2) to the last bit)."""
    logits = torch.full((1, V), -30.0)
    logits[0, 0], logits[0, 1] = 0.0, float(torch.log(torch.tensor(0.5)))
    r = req(temperature=1.0, min_p=0.5)
    _, warped = ours(logits, [r])
    assert kept(warped[0]) == {0, 1}
    assert_same_distribution(warped[0], hf(logits[0], r, tf_warpers(1.0, min_p=0.5)))


def test_top_p_stops_where_the_mass_reaches_top_p_exactly():
    """Four equal tokens of probability 1/4 (exact in float32) and top_p 0.5: the mass of two
    reaches it, so two are kept, as in generate() (which of the tied four is an ordering detail)."""
    logits = torch.full((1, V), float("-inf"))
    logits[0, :4] = 0.0
    r = req(temperature=1.0, top_p=0.5)
    _, warped = ours(logits, [r])
    assert len(kept(warped[0])) == len(kept(hf(logits[0], r, tf_warpers(1.0, top_p=0.5)))) == 2


# ---- plain torch where pagedserve follows vLLM / OpenAI ------------------------------------------


def openai_penalties(x: torch.Tensor, output: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence/frequency rule, counting output tokens only (vLLM)."""
    counts = torch.bincount(torch.tensor(output), minlength=V).float()
    return x - f32(frequency) * counts - f32(presence) * (counts > 0).float()


@pytest.mark.parametrize("presence,frequency", [(0.8, 0.0), (0.0, 0.6), (-0.5, 1.2)])
@pytest.mark.parametrize("temperature,top_p", [(0.5, 1.0), (3.0, 1.0), (3.0, 0.8)])
def test_presence_frequency_with_temperature_match_openai_formula(presence, frequency, temperature, top_p):
    logits = random_logits(1, 8)
    logits[0, 33] = logits[0].max() + 1.0  # the output's most repeated token leads before penalties
    r = req(temperature=temperature, top_p=top_p, presence_penalty=presence, frequency_penalty=frequency)
    processed, warped = ours(logits, [r])
    want = openai_penalties(logits[0], OUTPUT, presence, frequency)
    assert torch.allclose(processed[0], want, atol=1e-6)
    # The prompt-only tokens (5, 6, 7, 40) are untouched: the prompt does not count here.
    assert torch.equal(processed[0, [5, 6, 7, 40]], logits[0, [5, 6, 7, 40]])
    assert_same_distribution(warped[0], hf(want, r, tf_warpers(temperature, top_p=top_p)))


def vllm_warp(x: torch.Tensor, temperature: float, min_p: float, top_p: float) -> torch.Tensor:
    """vLLM V1's order written out: / temperature -> min-p (relative to the top probability) ->
    top-p (the shortest prefix, by probability, whose renormalised mass reaches top_p)."""
    x = x.double() / f32(temperature)
    probs = x.softmax(-1)
    x = x.masked_fill(probs < f32(min_p) * probs.max(), float("-inf"))
    probs = x.softmax(-1)
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(-1) - probs[order]
    drop = order[before >= f32(top_p)]
    return x.masked_fill(torch.isin(torch.arange(V), drop), float("-inf")).float()


@pytest.mark.parametrize("temperature,min_p,top_p", [(0.5, 0.1, 0.8), (0.5, 0.05, 0.9), (3.0, 0.2, 0.7),
                                                     (3.0, 0.1, 0.9)])
def test_min_p_then_top_p_follows_vllm_order(temperature, min_p, top_p):
    """Here vLLM's order and generate()'s disagree (checked below), so the reference is written out."""
    logits = random_logits(1, 9)
    _, warped = ours(logits, [req(temperature=temperature, min_p=min_p, top_p=top_p)])
    want = vllm_warp(logits[0], temperature, min_p, top_p)
    assert_same_distribution(warped[0], want)
    tf_order = hf(logits[0], req(), tf_warpers(temperature, top_p=top_p, min_p=min_p))
    assert kept(tf_order) != kept(want), "the case must tell the two orders apart"


# ---- one batch of mixed rules, and the draw itself ---------------------------------------------------


BATCH = [
    dict(temperature=3.0, top_p=0.9), dict(temperature=0.0, logit_bias={4: 2.0}),
    dict(temperature=0.5, top_k=7), dict(temperature=3.0, min_p=0.3),
    dict(temperature=3.0, top_k=10, top_p=0.7, repetition_penalty=1.3),
    dict(temperature=0.5, logit_bias={2: 3.0}, top_p=0.9), dict(temperature=1.0),
    dict(temperature=3.0, top_k=4, min_tokens=20, stop_token_ids=[8]),
]


def batch_reference(logits: torch.Tensor) -> list[torch.Tensor]:
    """Each BATCH row through transformers alone (greedy rows: processed logits only)."""
    out = []
    for i, p in enumerate(BATCH):
        before: list[LogitsProcessor] = []
        if "logit_bias" in p:
            before.append(SequenceBiasLogitsProcessor([[[t], f32(b)] for t, b in p["logit_bias"].items()]))
        if "repetition_penalty" in p:
            before.append(RepetitionPenaltyLogitsProcessor(f32(p["repetition_penalty"])))
        if "min_tokens" in p:
            before.append(MinNewTokensLengthLogitsProcessor(len(PROMPT), p["min_tokens"], [*EOS, 8]))
        warp = {k: v for k, v in p.items() if k in ("temperature", "top_k", "top_p", "min_p")}
        out.append(hf(logits[i], req(), before + (tf_warpers(**warp) if p["temperature"] else [])))
    return out


def test_mixed_batch_rows_match_transformers_row_by_row():
    """Rows that do and do not ask for each rule share a batch (the sampler's row subsets)."""
    logits = random_logits(len(BATCH), 10)
    processed, warped = ours(logits, [req(**p) for p in BATCH])
    want = batch_reference(logits)
    random_rows = [i for i, p in enumerate(BATCH) if p["temperature"] > 0]
    for j, i in enumerate(random_rows):
        assert_same_distribution(warped[j], want[i])
    for i in set(range(len(BATCH))) - set(random_rows):
        assert processed[i].argmax().item() == want[i].argmax().item()


def test_rows_without_a_rule_are_untouched_by_it():
    """Top-k and top-p touch only the rows that ask (a top_p of 1 asks for nothing). Row 1's other
    tokens each hold e^-30 of the mass or less: applying top-p 1 would drop them all, as the row's
    float32 cumulative sum is 1 after the first token."""
    logits = random_logits(3, 14)
    logits[1, 7] = 100.0  # after temperature 3, the others are e^-30 below it or further
    reqs = [req(temperature=3.0, top_p=0.5), req(temperature=3.0, top_p=1.0),
            req(temperature=0.5, top_k=3)]
    processed, warped = ours(logits, reqs)
    assert torch.equal(warped[1], processed[1] / f32(3.0))
    assert kept(warped[1]) == set(range(V))
    assert len(kept(warped[0])) < V and len(kept(warped[2])) == 3


def test_draws_invert_the_reference_distribution_at_the_counter_uniform():
    """End to end through Sampler.__call__: each seeded row's token is the one whose interval of
    the reference CDF (vocabulary order) holds counter_uniform(seed, position)."""
    logits = random_logits(len(BATCH), 11)
    want = batch_reference(logits)
    checked = 0
    for seed in range(40):
        reqs = [req(seed=seed * 100 + i, **p) for i, p in enumerate(BATCH)]
        got = Sampler()(logits, build_sampling_metadata(reqs, vocab_size=V, eos_token_ids=EOS)).token_ids
        seeds = torch.tensor([[s.sampling.seed & 0xFFFFFFFF, s.sampling.seed >> 32] for s in reqs])
        u = counter_uniform(seeds, torch.full((len(BATCH),), len(OUTPUT))).double()
        for i, p in enumerate(BATCH):
            if p["temperature"] == 0:
                assert got[i].item() == want[i].argmax().item()
                continue
            cdf = want[i].double().softmax(-1).cumsum(-1)
            if (cdf - u[i]).abs().min() < 1e-5:  # u on a boundary: float32 rounding may pick either side
                continue
            assert got[i].item() == int(torch.searchsorted(cdf, u[i]).item())
            checked += 1
    assert checked > 250
