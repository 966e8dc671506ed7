"""The sampler against hand-written references: seeded determinism, support restriction,
penalties, min_tokens, greedy, and the sampled distribution (seeded, so nothing can flake)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pagedserve.executor.request_state import RequestState
from pagedserve.executor.sampler import (
    Sampler,
    apply_penalties_and_bias,
    apply_top_k_top_p,
    build_sampling_metadata,
    counter_uniform,
    inverse_cdf,
)
from pagedserve.protos import executor_pb2
from pagedserve.protos.request_checks import check_sampling_params

V = 64
EOS = (1, 3)


def req(prompt=(5, 6), output=(), **sampling) -> RequestState:
    return RequestState("r", list(prompt), list(output), executor_pb2.SamplingParams(**sampling), [], 0)


def sample(logits, requests, seed=0):
    md = build_sampling_metadata(requests, vocab_size=logits.shape[1], eos_token_ids=EOS)
    return Sampler(seed)(logits, md)


def random_logits(rows, vocab=V, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


# ---- determinism --------------------------------------------------------------------------------


def test_seeded_draws_do_not_depend_on_the_batch():
    logits = random_logits(6)
    params = [dict(temperature=1.0, seed=s) for s in (7, 8, 2**63 + 5, 7, 11, 12)]
    outs = [(3,), (), (9, 9, 9), (1, 2, 3, 4), (), (4,)]
    reqs = [req(output=o, **p) for o, p in zip(outs, params)]
    batched = sample(logits, reqs).token_ids
    for i in range(6):
        alone = sample(logits[i : i + 1], [reqs[i]], seed=123).token_ids
        assert alone.item() == batched[i].item()
    # Reverse the batch and put unseeded rows between: seeded rows keep their tokens.
    mixed_reqs = [req(temperature=1.0), *reqs[::-1], req(temperature=0.5)]
    mixed_logits = torch.cat([random_logits(1, seed=9), logits.flip(0), random_logits(1, seed=10)])
    mixed = sample(mixed_logits, mixed_reqs, seed=99).token_ids
    assert mixed[1:-1].flip(0).tolist() == batched.tolist()


def test_seeded_draws_depend_on_seed_and_position():
    logits = torch.zeros(1, 1000)  # uniform: any two independent draws almost never coincide
    by_seed = {sample(logits, [req(temperature=1.0, seed=s)]).token_ids.item() for s in range(20)}
    by_pos = {sample(logits, [req(output=[0] * n, temperature=1.0, seed=3)]).token_ids.item()
              for n in range(20)}
    assert len(by_seed) >= 15 and len(by_pos) >= 15


def test_unseeded_draws_follow_the_executor_seed():
    logits = torch.zeros(4, 1000)
    reqs = [req(temperature=1.0) for _ in range(4)]
    a = sample(logits, reqs, seed=1).token_ids
    assert a.tolist() == sample(logits, reqs, seed=1).token_ids.tolist()
    assert a.tolist() != sample(logits, reqs, seed=2).token_ids.tolist()


def test_counter_uniform_is_open_unit_interval_and_flat():
    n = 100_000
    seeds = torch.stack([torch.arange(n) % 1000, torch.arange(n) // 1000 * 7919], dim=1)
    u = counter_uniform(seeds, torch.arange(n) % 37)
    assert u.shape == (n,) and float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005
    hist = torch.histc(u, bins=20, min=0, max=1)
    assert float((hist / n - 0.05).abs().max()) < 0.003
    # Neighbouring positions of one seed are not correlated.
    one = counter_uniform(torch.tensor([[5, 0]]).expand(n, 2), torch.arange(n))
    assert abs(float(torch.corrcoef(torch.stack([one[:-1], one[1:]]))[0, 1])) < 0.01
    assert torch.equal(u, counter_uniform(seeds, torch.arange(n) % 37))


def test_inverse_cdf_never_draws_masked_tokens():
    x = torch.tensor([[float("-inf"), 0.0, float("-inf"), 0.0, float("-inf")]]).expand(5, 5)
    u = torch.tensor([1e-7, 0.25, 0.5, 0.75, 1 - 2**-24])
    assert inverse_cdf(x, u).tolist() == [1, 1, 1, 3, 3]  # token 1 owns (0, 0.5]


# ---- greedy, distribution, support --------------------------------------------------------------


def test_greedy_is_argmax_of_the_processed_logits():
    logits = random_logits(5)
    reqs = [req(), req(temperature=1.0, seed=1), req(temperature=1e-7), req(top_k=3), req()]
    out = sample(logits, reqs).token_ids
    for i in (0, 2, 3, 4):
        assert out[i].item() == logits[i].argmax().item()


def seeded_draws(logits_row, n, **sampling):
    """n draws for one logits row: n requests with distinct seeds, in one batch."""
    sampling.setdefault("temperature", 1.0)
    reqs = [req(seed=s, **sampling) for s in range(n)]
    return sample(logits_row.expand(n, -1).contiguous(), reqs).token_ids


def chi_square(tokens, probs):
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "drew a token of probability zero"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_matches_softmax(temperature):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.2, 1.5])
    probs = torch.softmax(logits / temperature, dim=-1)
    stat = chi_square(seeded_draws(logits[None], 20000, temperature=temperature), probs)
    assert stat < 40  # 7 degrees of freedom: P(chi2 > 40) is about 1e-6
    # One seed over many output positions is just as well distributed.
    reqs = [req(temperature=temperature, seed=42) for _ in range(20000)]
    md = build_sampling_metadata(reqs, vocab_size=8, eos_token_ids=EOS)
    md.output_positions = torch.arange(20000)  # as if request i had i outputs
    tokens = Sampler()(logits.expand(20000, -1).contiguous(), md).token_ids
    assert chi_square(tokens, probs) < 40


def support(tokens):
    return set(tokens.tolist())


def test_top_k_restricts_the_support():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1)) * 0.3
    expected = set(logits[0].topk(5).indices.tolist())
    assert support(seeded_draws(logits, 3000, top_k=5)) == expected


def test_top_p_restricts_the_support():
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0]])
    probs = logits.softmax(-1)[0]
    # Smallest prefix (by probability) whose mass reaches 0.8.
    mass, expected = 0.0, set()
    for i in probs.argsort(descending=True).tolist():
        expected.add(i)
        mass += probs[i].item()
        if mass >= 0.8:
            break
    assert support(seeded_draws(logits, 3000, top_p=0.8)) == expected
    kept = torch.tensor(sorted(expected))
    renorm = torch.zeros(8)
    renorm[kept] = probs[kept] / probs[kept].sum()
    assert chi_square(seeded_draws(logits, 20000, top_p=0.8), renorm) < 30


def test_top_p_on_a_large_vocabulary_matches_a_full_sort():
    """Peaked rows find their prefix among the best 1024 candidates; flat rows fall back to a
    full sort. Both must keep exactly the set a plain full sort keeps."""
    vocab = 3000
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, vocab, generator=g) * torch.tensor([[8.0], [8.0], [0.1], [3.0], [0.5], [8.0]])
    top_p = torch.tensor([0.9, 0.5, 0.9, 0.95, 0.3, 0.999])
    got = apply_top_k_top_p(logits.clone(), torch.full((6,), vocab), top_p)
    for row in range(6):
        probs = logits[row].softmax(-1)
        order = probs.argsort(descending=True)
        before = probs[order].cumsum(-1) - probs[order]
        want = set(order[before < top_p[row]].tolist())
        assert set(got[row].isfinite().nonzero().flatten().tolist()) == want
        assert torch.equal(got[row][list(want)], logits[row][list(want)])
    assert (logits[2].softmax(-1).topk(1024).values.sum() < 0.9), "row 2 must take the full-sort path"


def test_top_k_then_top_p():
    logits = torch.tensor([[3.0, 2.9, 2.8, 2.7, -9.0, 2.6]])
    # top-k 3 keeps {0, 1, 2} with about equal mass; top-p 0.5 then keeps the first two.
    assert support(seeded_draws(logits, 2000, top_k=3, top_p=0.5)) == {0, 1}


def test_min_p_restricts_the_support():
    logits = torch.tensor([[2.0, 1.9, 1.0, 0.0, -1.0, 1.95]])
    probs = logits.softmax(-1)[0]
    expected = {i for i in range(6) if probs[i] >= 0.5 * probs.max()}
    assert expected == {0, 1, 5}
    assert support(seeded_draws(logits, 3000, min_p=0.5)) == expected
    # min_p compares probabilities after temperature: at T=4 everything above 0.5 * max survives.
    hot = torch.softmax(logits[0] / 4, dim=-1)
    expected_hot = {i for i in range(6) if hot[i] >= 0.5 * hot.max()}
    assert support(seeded_draws(logits, 3000, min_p=0.5, temperature=4.0)) == expected_hot


# ---- penalties, bias, min_tokens ------------------------------------------------------------------


def reference_processing(logits_row, r: RequestState, eos=EOS):
    """A per-request, per-token loop: the semantics the vectorised code must have."""
    x = logits_row.clone().tolist()
    p = r.sampling
    if r.num_output_tokens < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            x[t] = -math.inf
    for t, b in p.logit_bias.items():
        x[t] += b
    rep = p.repetition_penalty or 1.0
    for t in set(r.prompt_token_ids + r.output_token_ids):
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    for t in set(r.output_token_ids):
        x[t] -= p.frequency_penalty * r.output_token_ids.count(t) + p.presence_penalty
    return torch.tensor(x)


def test_penalties_and_bias_match_a_per_request_loop():
    g = torch.Generator().manual_seed(5)
    reqs = []
    for i in range(12):
        prompt = torch.randint(0, V, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g)
        output = torch.randint(0, V, (i * 3,), generator=g)
        bias = {int(t): float(b) for t, b in zip(torch.randint(0, V, (i % 4,), generator=g),
                                                   torch.randn(i % 4, generator=g))}
        reqs.append(req(
            prompt.tolist(), output.tolist(), temperature=1.0,
            repetition_penalty=(0.0, 1.3, 0.7)[i % 3], presence_penalty=(0.0, 0.5, -0.4)[i % 3],
            frequency_penalty=(0.3, 0.0, 1.1)[i % 3 - 1], logit_bias=bias,
            min_tokens=(0, 5)[i % 2], stop_token_ids=[7, 8] if i % 4 == 1 else [],
            ignore_eos=i % 5 == 0,
        ))
    logits = random_logits(12, seed=3)
    md = build_sampling_metadata(reqs, vocab_size=V, eos_token_ids=EOS)
    got = apply_penalties_and_bias(logits.clone(), md)
    want = torch.stack([reference_processing(logits[i], r) for i, r in enumerate(reqs)])
    assert torch.allclose(got, want, atol=1e-5)
    # The same with the token table passed in, wider than needed (as the executor passes it).
    table = torch.full((12, 80), 63, dtype=torch.int64)
    for i, r in enumerate(reqs):
        table[i, : r.num_tokens] = torch.tensor(r.prompt_token_ids + r.output_token_ids)
    md2 = build_sampling_metadata(reqs, vocab_size=V, eos_token_ids=EOS, token_ids=table)
    assert torch.allclose(apply_penalties_and_bias(logits.clone(), md2), want, atol=1e-5)


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(1, V)
    logits[0, 3] = 10.0  # EOS is the argmax
    logits[0, 9] = 9.0  # then a stop id
    logits[0, 20] = 8.0
    assert sample(logits, [req(output=[4] * 2, min_tokens=3)]).token_ids.item() == 9
    assert sample(logits, [req(output=[4] * 2, min_tokens=3, stop_token_ids=[9])]).token_ids.item() == 20
    assert sample(logits, [req(output=[4] * 3, min_tokens=3, stop_token_ids=[9])]).token_ids.item() == 3
    # With ignore_eos EOS is an ordinary token, so min_tokens leaves it alone.
    assert sample(logits, [req(min_tokens=3, ignore_eos=True)]).token_ids.item() == 3
    # Random sampling can never draw a masked token.
    tokens = seeded_draws(logits, 500, min_tokens=1, stop_token_ids=[9])
    assert not ({1, 3, 9} & support(tokens))


# ---- logprobs and validation --------------------------------------------------------------------


def test_logprobs_are_raw_and_top_k_sorted():
    logits = random_logits(3)
    reqs = [req(logprobs=4, temperature=0.7, repetition_penalty=1.5, output=[1, 2], seed=1),
            req(logprobs=0, presence_penalty=2.0, output=[5]), req()]
    out = sample(logits, reqs)
    raw = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    assert torch.allclose(out.top_logprobs[0], raw[0].sort(descending=True).values[:4])
    assert out.top_token_ids.shape == (3, 4)
    assert sample(logits, [req(), req()]).logprobs is None


@pytest.mark.parametrize("field,value", [
    ("temperature", -1.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 2.0),
    ("repetition_penalty", -1.0), ("min_tokens", -1), ("logprobs", V + 1),
    ("stop_token_ids", [V]), ("logit_bias", {V: 1.0}),
])
def test_bad_sampling_params_name_request_and_field(field, value):
    p = executor_pb2.SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=rf"'req-7'.*sampling\.{field}"):
        check_sampling_params("req-7", p, V)


# ---- found by mutation testing (make mutation; docs/testing.md) -----------------------------------


def lowbias32(x: int) -> int:
    """Wellons' lowbias32 on a Python int: the published algorithm, step by step."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_the_32_bit_hash_is_lowbias32():
    """The int64-tensor arithmetic against Python's exact integers."""
    from pagedserve.executor.sampler import _mix32, _mul32

    g = torch.Generator().manual_seed(8)
    xs = torch.cat([torch.randint(0, 1 << 32, (2000,), generator=g, dtype=torch.int64),
                    torch.tensor([0, 1, 0xFFFF, 0x10000, 0xFFFFFFFF])])
    for c in (0x7FEB352D, 0x846CA68B, 0xFFFFFFFF, 3):
        assert _mul32(xs, c).tolist() == [(x * c) & 0xFFFFFFFF for x in xs.tolist()]
    assert _mix32(xs).tolist() == [lowbias32(x) for x in xs.tolist()]


def test_counter_uniform_is_pinned():
    """A seeded request must draw the same tokens after an upgrade or restart of the executor,
    so the uniform stream is part of the contract: these values must never change."""
    seeds = torch.tensor([[0, 0], [5, 0], [5, 1], [0xFFFFFFFF, 0x7FFFFFFF]])
    u = counter_uniform(seeds, torch.tensor([0, 1, 7, 123456]))
    assert (u * (1 << 23) - 0.5).tolist() == [1063709.0, 2221141.0, 8105272.0, 6667180.0]


def test_the_seed_high_bits_count():
    logits = torch.zeros(1, 1000)
    draws = {sample(logits, [req(temperature=1.0, seed=5 + (h << 32))]).token_ids.item()
             for h in range(8)}
    assert len(draws) >= 6


def test_unseeded_seeds_drawn_on_the_host_or_in_the_sampler_agree():
    """Sampler.metadata draws the unseeded rows' seeds while building the metadata; metadata built
    without the generator leaves the draw to the sampler: the same draw, so the same tokens."""
    logits = torch.zeros(32, 1000)
    reqs = [req(temperature=1.0, seed=3) if i % 4 == 0 else req(temperature=1.0) for i in range(32)]
    on_host = Sampler(7)
    md = on_host.metadata(reqs, vocab_size=1000, eos_token_ids=EOS)
    assert not md.unseeded
    tokens = on_host(logits, md).token_ids
    assert tokens.tolist() == sample(logits, reqs, seed=7).token_ids.tolist()
    assert tokens.tolist() != sample(logits, reqs, seed=8).token_ids.tolist()


def test_top_k_one_at_a_high_temperature_is_the_argmax():
    logits = random_logits(4, seed=12)
    tokens = seeded_draws(logits[0:1], 200, top_k=1, temperature=5.0)
    assert support(tokens) == {logits[0].argmax().item()}


def test_logprobs_zero_returns_the_sampled_logprob_only():
    logits = random_logits(2)
    out = sample(logits, [req(logprobs=0), req(logprobs=0, temperature=1.0, seed=4)])
    raw = torch.log_softmax(logits, dim=-1)
    assert torch.equal(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    assert out.top_token_ids is None and out.top_logprobs is None


def test_an_all_greedy_batch_takes_each_rows_argmax():
    logits = random_logits(5, seed=13)
    out = sample(logits, [req(), req(logprobs=2), req(), req(repetition_penalty=1.0), req()])
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist()


# The refusal reaches the client as INVALID_ARGUMENT: it names the request, the field and the
# accepted range, written out here as the contract (V = 64).
@pytest.mark.parametrize("field,value,why", [
    ("temperature", -0.5, "must be >= 0"),
    ("temperature", math.nan, "must be >= 0"),
    ("temperature", math.inf, "must be >= 0"),
    ("top_p", -0.25, "must be in [0, 1] (0 reads as 1)"),
    ("top_p", 1.25, "must be in [0, 1] (0 reads as 1)"),
    ("top_k", -2, "must be -1, 0 (disabled) or positive"),
    ("min_p", -0.5, "must be in [0, 1]"),
    ("min_p", 1.5, "must be in [0, 1]"),
    ("repetition_penalty", -0.5, "must be > 0 (0 reads as 1)"),
    ("repetition_penalty", math.inf, "must be > 0 (0 reads as 1)"),
    ("presence_penalty", math.inf, "must be finite"),
    ("presence_penalty", math.nan, "must be finite"),
    ("frequency_penalty", -math.inf, "must be finite"),
    ("frequency_penalty", math.nan, "must be finite"),
    ("min_tokens", -1, "must be >= 0"),
    ("logprobs", -1, "must be in [0, 64]"),
    ("logprobs", 65, "must be in [0, 64]"),
    ("logit_bias", {64: 1.0}, "ids must be in [0, 64)"),
    ("logit_bias", {-1: 1.0}, "ids must be in [0, 64)"),
    ("logit_bias", {3: math.nan}, "values must not be NaN"),
    ("stop_token_ids", [5, 64], "must be in [0, 64)"),
    ("stop_token_ids", [-1], "must be in [0, 64)"),
])
def test_bad_sampling_params_are_refused_with_the_accepted_range(field, value, why):
    from pagedserve.protos.request_checks import RequestRefused

    p = executor_pb2.SamplingParams(**{field: value})
    with pytest.raises(RequestRefused) as refused:
        check_sampling_params("req-7", p, V)
    assert str(refused.value) == f"request 'req-7': sampling.{field} {why}"
    assert refused.value.request_id == "req-7"


def test_sampling_params_at_the_edges_of_each_range_pass():
    for fields in [dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.0), dict(top_k=-1),
                   dict(top_k=0), dict(top_k=V), dict(min_p=0.0), dict(min_p=1.0),
                   dict(repetition_penalty=0.0), dict(presence_penalty=-1e30),
                   dict(frequency_penalty=1e30), dict(min_tokens=0), dict(logprobs=0),
                   dict(logprobs=V), dict(logit_bias={0: -math.inf, V - 1: math.inf}),
                   dict(stop_token_ids=[0, V - 1])]:
        check_sampling_params("r", executor_pb2.SamplingParams(**fields), V)


def test_token_ids_outside_the_vocabulary_are_refused_naming_the_field():
    from pagedserve.protos.request_checks import RequestRefused, check_token_ids

    check_token_ids("r", "prompt_token_ids", [0, V - 1], V)
    check_token_ids("r", "prompt_token_ids", [], V)
    for bad in ([V], [0, -1]):
        with pytest.raises(RequestRefused) as refused:
            check_token_ids("req-2", "output_token_ids", bad, V)
        assert str(refused.value) == "request 'req-2': output_token_ids holds an id outside [0, 64)"
        assert refused.value.request_id == "req-2"


# ---- reading the output back (one transfer per step) ----------------------------------------------


def test_to_host_without_logprobs_is_the_token_list():
    from pagedserve.executor.sampler import SamplerOutput

    host = SamplerOutput(torch.tensor([7, 0, 2**31 - 1]), None, None, None).to_host()
    assert host.token_ids == [7, 0, 2**31 - 1]
    assert all(type(t) is int for t in host.token_ids)
    assert host.logprobs is None and host.top_token_ids is None and host.top_logprobs is None


def test_to_host_with_logprobs_keeps_ids_and_float32_values_exactly():
    from pagedserve.executor.sampler import SamplerOutput

    ids = torch.tensor([151935, 3])  # a token id past float32's exact integers (2**24)
    lps = torch.tensor([-0.1, -2.5], dtype=torch.float32)
    host = SamplerOutput(ids, lps, None, None).to_host()
    assert host.token_ids == [151935, 3] and all(type(t) is int for t in host.token_ids)
    assert host.logprobs == [float(np.float32(-0.1)), -2.5]
    assert host.top_token_ids is None and host.top_logprobs is None

    top_ids = torch.tensor([[151935, 17, 4], [3, 2**24 + 1, 0]])
    top_lps = torch.tensor([[-0.1, -1.0, -3.0], [-2.5, -2.75, -9.0]])
    host = SamplerOutput(ids, lps, top_ids, top_lps).to_host()
    assert host.token_ids == [151935, 3]
    assert host.logprobs == [float(np.float32(-0.1)), -2.5]
    assert host.top_token_ids == [[151935, 17, 4], [3, 2**24 + 1, 0]]
    assert all(type(t) is int for row in host.top_token_ids for t in row)
    assert host.top_logprobs == [[float(np.float32(-0.1)), -1.0, -3.0], [-2.5, -2.75, -9.0]]


def test_upload_is_the_list_as_a_tensor_of_that_dtype():
    from pagedserve.executor.sampler import upload

    t = upload([3, -1, 2**40], torch.int64, torch.device("cpu"))
    assert t.dtype == torch.int64 and t.device.type == "cpu" and t.tolist() == [3, -1, 2**40]
    f = upload([0.5, 2.0], torch.float32, torch.device("cpu"))
    assert f.dtype == torch.float32 and f.tolist() == [0.5, 2.0]


def test_upload_gives_the_dtype_and_device_asked():
    from pagedserve.executor.sampler import upload

    assert upload([1, 2], torch.float32, torch.device("cpu")).dtype == torch.float32  # ints in
    assert upload([0.5], torch.float64, torch.device("cpu")).dtype == torch.float64
    # A device other than the CPU: "meta" tensors carry shape, dtype and device, no values.
    t = upload([1, 2, 3], torch.int64, torch.device("meta"))
    assert t.device.type == "meta" and t.shape == (3,) and t.dtype == torch.int64


# ---- the host's choices and the one upload (SamplingMetadata's field comments) --------------------


def test_row_sets_index_some_rows_and_not_all():
    from pagedserve.executor.sampler import RowSet

    cpu = torch.device("cpu")
    every = RowSet.of([0, 1, 2], 3, cpu)
    assert every.rows == [0, 1, 2] and every.index is None
    some = RowSet.of([0, 2], 3, cpu)
    assert some.index.dtype == torch.int64 and some.index.tolist() == [0, 2]
    t = torch.arange(6.0).reshape(3, 2)
    assert some.take(t).tolist() == [[0.0, 1.0], [4.0, 5.0]]
    assert some.put(t.clone(), torch.tensor([[9.0, 9.0], [8.0, 8.0]])).tolist() == \
        [[9.0, 9.0], [2.0, 3.0], [8.0, 8.0]]
    assert RowSet.of([1], 3, torch.device("meta")).index.device.type == "meta"


def test_host_pack_slots_keep_their_shape_and_the_pack_dtype():
    from pagedserve.executor.sampler import _HostPack

    floats = _HostPack(torch.float32)
    floats.add("a", [1, 2])  # ints in a float pack
    out = floats.upload(torch.device("cpu"))
    assert out["a"].dtype == torch.float32 and out["a"].tolist() == [1.0, 2.0]
    assert _HostPack(torch.int64).upload(torch.device("cpu")) == {}

    ints = _HostPack(torch.int64)
    ints.add("seeds", [1, 2, 3, 4, 5, 6], (3, 2))
    table32 = torch.tensor([[7, 8, 9], [10, 11, 12]], dtype=torch.int32)
    table64 = torch.tensor([13, 14, 15, 16])
    ints.add_table("t32", table32)
    ints.add("after", [17])
    ints.add_table("t64", table64)
    out = ints.upload(torch.device("cpu"))
    assert out["seeds"].tolist() == [[1, 2], [3, 4], [5, 6]]
    assert out["t32"].dtype == torch.int64 and out["t32"].tolist() == table32.tolist()
    assert out["after"].tolist() == [17]
    # On the CPU a table is the host tensor itself: nothing is copied.
    assert out["t64"].data_ptr() == table64.data_ptr()

    only_tables = _HostPack(torch.int64)
    only_tables.add_table("t", table64)
    assert only_tables.upload(torch.device("cpu"))["t"].tolist() == [13, 14, 15, 16]

    # Elsewhere every slot is a view of the one copy on that device, tables included.
    on_device = ints.upload(torch.device("meta"))
    for name, shape in [("seeds", (3, 2)), ("t32", (2, 3)), ("after", (1,)), ("t64", (4,))]:
        t = on_device[name]
        assert (t.device.type, tuple(t.shape), t.dtype) == ("meta", shape, torch.int64), name
    # ... laid end to end in it: no two slots overlap, none is left out.
    spans = sorted((t.storage_offset(), t.numel()) for t in on_device.values())
    assert [start for start, _ in spans] == [0, *(s + n for s, n in spans[:-1])]
    assert sum(n for _, n in spans) == 6 + 6 + 1 + 4


def test_metadata_records_the_hosts_choices():
    eps = float(np.float32(1e-5))  # sampler.GREEDY_EPS as the proto stores it
    reqs = [
        req(temperature=0.0, min_p=0.5, top_k=2),  # greedy: its parameters are not read
        req(temperature=eps, top_k=V, top_p=0.0),  # the greedy bound is random; k = V and p = 0 are off
        req(temperature=1.0, top_k=3, top_p=0.5, logprobs=3),
        req(temperature=0.7, seed=9, top_p=1.0),
    ]
    md = build_sampling_metadata(reqs, vocab_size=V, eos_token_ids=EOS)
    assert md.random.rows == [1, 2, 3] and md.random.index.tolist() == [1, 2, 3]
    assert md.top_k.tolist() == [V, 3, V]  # vocab_size when disabled
    assert md.top_p.tolist() == [1.0, 0.5, 1.0]  # 1 when disabled
    assert md.top_k_rows.rows == [1] and md.top_k_rows.index.tolist() == [1]
    assert md.top_p_rows.rows == [1] and md.max_top_k == 3
    assert md.use_min_p is False  # only the greedy row has min_p
    assert md.num_logprobs == [-1, -1, 3, -1]
    assert md.unseeded == [0, 1]
    assert Sampler(5).metadata(reqs, vocab_size=V, eos_token_ids=EOS).unseeded == []

    every = build_sampling_metadata([req(temperature=1.0, top_k=4, min_p=0.1),
                                     req(temperature=0.5, top_k=5)], vocab_size=V, eos_token_ids=EOS)
    assert every.random.index is None and every.top_k_rows.index is None
    assert every.use_min_p is True and every.max_top_k == 5


def test_a_token_table_passed_in_is_the_one_read():
    """The executor passes its persistent table (wider than the requests' tokens), or a function
    returning it; the metadata carries that table, not one rebuilt from the requests."""
    reqs = [req(prompt=(5, 6), output=(7,), presence_penalty=1.0), req(prompt=(1,))]
    table = torch.tensor([[5, 6, 7, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    md = build_sampling_metadata(reqs, vocab_size=V, eos_token_ids=EOS, token_ids=table)
    assert md.token_ids.tolist() == table.tolist()
    calls = []
    md = build_sampling_metadata(reqs, vocab_size=V, eos_token_ids=EOS,
                                 token_ids=lambda: calls.append(1) or table)
    assert md.token_ids.tolist() == table.tolist() and calls == [1]
    built = build_sampling_metadata(reqs, vocab_size=V, eos_token_ids=EOS)
    assert built.token_ids.shape == (2, 3)  # without one: the requests' tokens, padded


def test_the_executor_seed_defaults_to_zero():
    logits = torch.zeros(32, 1000)
    reqs = [req(temperature=1.0) for _ in range(32)]

    def draw(sampler):
        return sampler(logits, build_sampling_metadata(reqs, vocab_size=1000, eos_token_ids=EOS)
                       ).token_ids.tolist()

    assert draw(Sampler()) == draw(Sampler(0)) != draw(Sampler(1))


def test_apply_top_k_top_p_touches_only_the_rows_that_ask():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])
    x = probs.log().expand(3, -1).contiguous()
    inf = float("-inf")
    got = apply_top_k_top_p(x.clone(), torch.tensor([2, 4, 6]), torch.tensor([1.0, 1.0, 0.6]))
    lp = probs.log().tolist()
    assert got.tolist() == [
        lp[:2] + [inf] * 4,  # top-k 2
        lp[:4] + [inf] * 2,  # top-k 4: more than the 3 rows, fewer than the 6 tokens
        lp[:2] + [inf] * 4,  # top-p 0.6: 0.5 is short of it, 0.5 + 0.3 reaches it
    ]
