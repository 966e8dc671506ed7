"""Constrained decoding end to end through the offline LLM, on the random-weight tiny model (which
never "wants" valid output: every structure comes from the mask).

Every completion that stops on EOS must match its constraint (jsonschema for the 120 schemas,
re.fullmatch for regexes, membership for choices, Python's own parser for an arithmetic grammar);
one cut by max_tokens says "length". Unconstrained requests batched with constrained ones give
exactly their tokens from alone; preemption and n > 1 keep each sequence's matcher right.
"""

from __future__ import annotations

import ast
import json
import re

import jsonschema
import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.bench.structured_schemas import schemas
from pagedserve.sampling_params import StructuredOutputsParams
from tests.conftest import model_dir

PROMPT = "Answer in JSON:"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model_dir("llama"), dtype="float32", num_kv_blocks=1024, max_num_seqs=128,
               max_num_batched_tokens=1024)


def _constrained(so: StructuredOutputsParams, seed: int, max_tokens: int = 96,
                 **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens,
                          structured_outputs=so, **kw)


def _check_all(outputs, valid) -> int:
    """Asserts every EOS-stopped completion is valid and every other one hit the length;
    returns how many stopped on EOS."""
    stopped = 0
    for i, out in enumerate(outputs):
        for c in out.outputs:
            if c.finish_reason == "stop":
                stopped += 1
                assert valid(i, c.text), (i, c.text)
            else:
                assert c.finish_reason == "length", c.finish_reason
    return stopped


def test_json_schemas_validate(llm: LLM) -> None:
    suite = schemas()
    params = [_constrained(StructuredOutputsParams(json=s), seed=i) for i, s in enumerate(suite)]
    outputs = llm.generate([PROMPT] * len(suite), params, use_tqdm=False)

    def valid(i: int, text: str) -> bool:
        jsonschema.validate(json.loads(text), suite[i],
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        return True

    stopped = _check_all(outputs, valid)
    assert stopped >= len(suite) // 2, f"only {stopped} of {len(suite)} stopped on EOS"


def test_json_object_regex_choice_grammar(llm: LLM) -> None:
    regexes = [r"[a-z]{3,8}", r"\d{3}-\d{4}", r"(yes|no)!?", r"[A-Z][a-z]*( [A-Z][a-z]*){0,2}",
               r"0x[0-9a-f]{2,6}"]
    choices = ["alpha", "beta", "gamma delta", 'quote " and \\ slash']
    arithmetic = ('start: expr\nexpr: term (("+" | "-") term)*\nterm: NUMBER | "(" expr ")"\n'
                  "NUMBER: /[1-9][0-9]{0,2}/\n")
    gbnf = 'root ::= "(" [a-c]+ ")" | "[" [0-9]+ "]"'
    cases = ([(StructuredOutputsParams(json_object=True), _is_json_object)]
             + [(StructuredOutputsParams(regex=r), lambda t, r=r: re.fullmatch(r, t))
                for r in regexes]
             + [(StructuredOutputsParams(choice=choices), lambda t: t in choices)]
             + [(StructuredOutputsParams(grammar=arithmetic), _is_arithmetic)]
             + [(StructuredOutputsParams(grammar=gbnf),
                 lambda t: re.fullmatch(r"\([a-c]+\)|\[[0-9]+\]", t))])
    cases = cases * 2  # different seeds, different paths
    params = [_constrained(so, seed=i, max_tokens=64) for i, (so, _) in enumerate(cases)]
    outputs = llm.generate([PROMPT] * len(cases), params, use_tqdm=False)
    stopped = _check_all(outputs, lambda i, text: cases[i][1](text))
    assert stopped >= len(cases) // 2


def _is_json_object(text: str) -> bool:
    return isinstance(json.loads(text), dict)


def _is_arithmetic(text: str) -> bool:
    node = ast.parse(text, mode="eval").body
    allowed = (ast.BinOp, ast.Add, ast.Sub, ast.Constant)
    return all(isinstance(n, allowed) for n in ast.walk(node))


def test_length_cut_reports_length(llm: LLM) -> None:
    schema = {"type": "array", "items": {"type": "string"}, "minItems": 50}
    (out,) = llm.generate(PROMPT, _constrained(StructuredOutputsParams(json=schema), 1,
                                               max_tokens=8), use_tqdm=False)
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 8


def test_unconstrained_neighbours_keep_their_tokens(llm: LLM) -> None:
    free = [SamplingParams(temperature=0.9, seed=100 + i, max_tokens=24) for i in range(4)]
    alone = llm.generate([PROMPT] * 4, free, use_tqdm=False)
    mixed_params = [p for i, f in enumerate(free)
                    for p in (f, _constrained(StructuredOutputsParams(json=schemas()[i]), i))]
    mixed = llm.generate([PROMPT] * 8, mixed_params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == \
        [o.outputs[0].token_ids for o in mixed[::2]]


def test_n_chunks_and_preemption_keep_each_matcher(llm: LLM) -> None:
    """n = 3 children, a prompt cut into chunks and a pool so small that they preempt each
    other (their matchers rebuilt by replay): the same tokens as with room to spare."""
    schema = schemas()[9]
    so = StructuredOutputsParams(json=schema)
    prompt = PROMPT * 8
    (whole,) = llm.generate(prompt, _constrained(so, 5, n=3), use_tqdm=False)
    small = LLM(model_dir("llama"), dtype="float32", num_kv_blocks=10, block_size=16,
                max_num_seqs=8, max_num_batched_tokens=16)
    (squeezed,) = small.generate(prompt, _constrained(so, 5, n=3), use_tqdm=False)
    assert small.scheduler.num_preemptions > 0
    assert [c.token_ids for c in whole.outputs] == [c.token_ids for c in squeezed.outputs]
    _check_all([whole], lambda i, t: jsonschema.validate(json.loads(t), schema) is None)


def test_mask_comes_before_bias_and_penalties(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    outside = [*tok("zebra", add_special_tokens=False).input_ids, tok.eos_token_id]
    params = [SamplingParams(temperature=2.0, seed=i, max_tokens=12, top_k=5, top_p=0.5,
                             presence_penalty=-2.0, frequency_penalty=-2.0,
                             repetition_penalty=0.1, logit_bias={t: 100.0 for t in outside},
                             structured_outputs=StructuredOutputsParams(choice=["no", "yes"]))
              for i in range(8)]
    outputs = llm.generate([PROMPT] * 8, params, use_tqdm=False)
    assert all(o.outputs[0].text in ("no", "yes") for o in outputs), \
        [o.outputs[0].text for o in outputs]
