"""transformers as the reference: greedy generate on the same weights, and the near-tie rule.

Both sides generate exactly N tokens (transformers: min_new_tokens; ours: ignore_eos). At the first
token where they disagree, a prompt still counts as matching only if it is a near-tie: each token is
in the other's top 5 and their logprobs differ by less than TIE; the comparison stops there.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

TOP = 5
TOL = 1e-3  # logprob error allowed on matching tokens
TIE = 0.02  # logprob gap under which a divergence is a near-tie


@dataclass
class Reference:
    prompt: list[int]
    tokens: list[int]
    logprobs: torch.Tensor  # [N, V] float32: log_softmax of transformers' raw logits


def stdlib_prompts(tokenizer, lengths: list[int], *, source: str = "textwrap.py",
                   prefix: list[int] | None = None) -> list[list[int]]:
    """BOS (+ prefix) plus a slice of tokenised stdlib source per length, at different offsets."""
    text = Path(sysconfig.get_paths()["stdlib"], source).read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    head = [tokenizer.bos_token_id, *(prefix or [])]
    return [[*head, *ids[37 * i: 37 * i + n - 1]] for i, n in enumerate(lengths)]


_CACHE: dict[tuple, list[Reference]] = {}


@torch.no_grad()
def hf_greedy(path: Path, prompts: list[list[int]], num_tokens: int) -> list[Reference]:
    """transformers' greedy continuation of each prompt in float32 (cached per model+prompts)."""
    key = (str(path), tuple(map(tuple, prompts)), num_tokens)
    if key in _CACHE:
        return _CACHE[key]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    refs = []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=num_tokens, min_new_tokens=num_tokens,
            output_logits=True, return_dict_in_generate=True,
            pad_token_id=model.config.pad_token_id,
        )
        logprobs = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)
        refs.append(Reference(prompt, out.sequences[0, len(prompt):].tolist(), logprobs))
    _CACHE[key] = refs
    return refs


def assert_greedy_matches(tokens: list[int], top: list[dict[int, float]], ref: Reference) -> float:
    """Our greedy tokens (with their top-5 logprobs) against transformers'; returns the max error."""
    assert len(tokens) == len(ref.tokens), (len(tokens), len(ref.tokens))
    worst = 0.0
    for t, (mine, theirs) in enumerate(zip(tokens, ref.tokens)):
        lp = ref.logprobs[t]
        if mine != theirs:
            gap = abs(float(lp[mine] - lp[theirs]))
            ref_top = lp.topk(TOP).indices.tolist()
            assert mine in ref_top and theirs in top[t] and gap < TIE, (
                f"token {t} of a {len(ref.prompt)}-token prompt: ours {mine}, transformers' "
                f"{theirs} (logprob gap {gap:.4f}, not a near-tie)")
            return worst
        worst = max([worst] + [abs(float(lp[i]) - x) for i, x in top[t].items()])
        assert worst < TOL, f"token {t} of a {len(ref.prompt)}-token prompt: error {worst:.2e}"
    return worst
