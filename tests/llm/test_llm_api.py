"""The offline API as users write it: prompts in, RequestOutputs back, bad input a ValueError."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from tests.conftest import model_dir

LOGPROB_TOL = 1e-4  # float32 on both sides


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model_dir("llama"), dtype="float32", num_kv_blocks=256, max_num_batched_tokens=256)


def test_seed_example_shape(llm: LLM) -> None:
    outputs = llm.generate(["Hello, world!", "Why is the sky blue?"],
                           SamplingParams(temperature=0.8, top_p=0.95, max_tokens=12, seed=3))
    assert [o.prompt for o in outputs] == ["Hello, world!", "Why is the sky blue?"]
    for o in outputs:
        tok = llm.get_tokenizer()
        assert o.prompt_token_ids == tok(o.prompt).input_ids
        (c,) = o.outputs
        assert c.index == 0
        assert len(c.token_ids) == 12 or c.finish_reason == "stop"
        assert c.finish_reason in ("stop", "length")
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert c.cumulative_logprob is None and c.logprobs is None


def test_token_id_prompts_and_per_prompt_params(llm: LLM) -> None:
    outs = llm.generate([{"prompt_token_ids": [0, 5, 6, 7]}, {"prompt_token_ids": [0, 9]}],
                        [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                         SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)],
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert outs[0].prompt is None and outs[0].prompt_token_ids == [0, 5, 6, 7]


def _hf_logprobs(prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits (float32, same weights) at each generated position,
    with our tokens fed in: [len(tokens), V]."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir("llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0].float()
    return logits[len(prompt) - 1:-1].log_softmax(-1)


def test_logprobs_and_cumulative_logprob(llm: LLM) -> None:
    """Each token's top-3 are transformers' three best tokens with their logprobs (greedy: the
    sampled token is the best), and cumulative_logprob is the sum of the sampled ones."""
    (out,) = llm.generate("def f(x):", SamplingParams(temperature=0, max_tokens=6, logprobs=3,
                                                      ignore_eos=True))
    c = out.outputs[0]
    ref = _hf_logprobs(out.prompt_token_ids, c.token_ids)
    assert len(c.logprobs) == len(c.token_ids) == 6
    for tok, entry, row in zip(c.token_ids, c.logprobs, ref):
        best = row.topk(3)
        assert tok == best.indices[0] and entry.keys() == set(best.indices.tolist())
        assert [entry[i] for i in best.indices.tolist()] == pytest.approx(best.values.tolist(),
                                                                          abs=LOGPROB_TOL)
    sampled = ref[torch.arange(6), torch.tensor(c.token_ids)]
    assert c.cumulative_logprob == pytest.approx(float(sampled.sum()), abs=6 * LOGPROB_TOL)


def test_n_completions_share_the_prompt(llm: LLM) -> None:
    before = llm.scheduler.stats().prefix_cache_hits
    prompt = "import os\nimport sys\n" * 12  # several full blocks
    (out,) = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8,
                                                 ignore_eos=True))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # siblings draw differently
    full_blocks = (len(out.prompt_token_ids) - 1) // 16
    # Siblings 2 and 3 found the prompt's full blocks in the prefix cache.
    assert llm.scheduler.stats().prefix_cache_hits - before >= 2 * full_blocks * 16


def test_seeded_sampling_alone_equals_batched(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_k=50, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate("class Foo(Bar):", params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=14, ignore_eos=True)] * 3
    batch = llm.generate(["x = 1", "class Foo(Bar):", "while True:", "yield"],
                         [others[0], params, others[1], others[2]])
    assert batch[1].outputs[0].token_ids == alone


def test_chat_applies_the_template(llm: LLM) -> None:
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    (out,) = llm.chat(conv, SamplingParams(temperature=0, max_tokens=4))
    tok = llm.get_tokenizer()
    expected = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert out.prompt_token_ids == list(expected)
    two = llm.chat([conv, conv[1:]], SamplingParams(temperature=0, max_tokens=2))
    assert len(two) == 2


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("temperature", -0.5), ("temperature", float("nan")), ("top_p", 0.0),
    ("top_p", 1.5), ("top_k", -2), ("min_p", 2.0), ("max_tokens", 0), ("min_tokens", -1),
    ("presence_penalty", 3.0), ("frequency_penalty", float("inf")), ("repetition_penalty", 0.0),
    ("logprobs", 21), ("seed", -1), ("stop_token_ids", [-3]), ("logit_bias", {5: float("nan")}),
])
def test_invalid_sampling_params_name_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_prompt_longer_than_max_model_len_is_refused() -> None:
    small = LLM(model_dir("llama"), dtype="float32", max_model_len=32, num_kv_blocks=8)
    with pytest.raises(ValueError, match="max_model_len"):
        small.generate({"prompt_token_ids": list(range(5, 45))}, SamplingParams(max_tokens=2))
    # The engine still serves after the refusal.
    (ok,) = small.generate({"prompt_token_ids": [0, 5, 6]}, SamplingParams(max_tokens=2))
    assert ok.outputs[0].token_ids


def test_bad_prompts_and_param_counts(llm: LLM) -> None:
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([{"foo": 1}])
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [SamplingParams(), SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"prompt_token_ids": [0, 10**6]})
