"""The comparison every multi-rank layout is held to (tensor, pipeline, on GPUs): the same
tokens as one rank, and each step's top logprobs within a tolerance where both report a token
(the top few may swap a near tie; the sampled one is in both)."""

from __future__ import annotations


def assert_same_outputs(want: list, got: list, logprob_tol: float) -> None:
    for w, g in zip(want, got, strict=True):
        assert g.token_ids == w.token_ids
        for w_step, g_step in zip(w.logprobs or [], g.logprobs or [], strict=True):
            for token, lp in w_step.items():
                if token in g_step:
                    assert abs(g_step[token] - lp) <= logprob_tol, (token, lp, g_step[token])
