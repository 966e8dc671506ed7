"""What the executor remembers about one request between steps.

A request's full data arrives once (NewRequest); afterwards a plan carries only diffs (new block
ids, tokens to compute). The executor keeps no knowledge the scheduler lacks: everything here can be
rebuilt from a NewRequest, which is how a forgotten (preempted) request resumes by recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.protos import executor_pb2


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # the executor's own copy; it appends each token it samples
    sampling: executor_pb2.SamplingParams
    block_ids: list[int]  # the block table: logical block i lives in physical block block_ids[i]
    num_computed_tokens: int  # tokens whose KV is in the cache
    row: int = -1  # the request's row in InputBatch's persistent tables

    @classmethod
    def from_proto(cls, req: executor_pb2.NewRequest) -> RequestState:
        sampling = executor_pb2.SamplingParams()
        sampling.CopyFrom(req.sampling)
        return cls(
            request_id=req.request_id,
            prompt_token_ids=list(req.prompt_token_ids),
            output_token_ids=list(req.output_token_ids),
            sampling=sampling,
            block_ids=list(req.block_ids),
            num_computed_tokens=req.num_computed_tokens,
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Outputs so far, which is also the output position of the next sampled token."""
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens the request holds: prompt plus output."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)
