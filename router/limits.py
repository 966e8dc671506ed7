"""What one API request may ask for: safe defaults, each configurable (`pagedserve router --help`
has a flag per field: --max-n, --max-request-body-bytes, ...).

Every limit is checked before any work is queued, and a request past one gets a 400 naming the
field (413 for the body size, 429 with Retry-After for a full queue). List sizes are checked
before anything is built from a list, and prompt lengths before tokenizing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

INT32_MAX = (1 << 31) - 1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def _limit(default: int | None, help: str) -> int | None:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Limits:
    max_request_body_bytes: int = _limit(4 << 20, "request bodies larger than this get 413, "
                                         "before parsing (chunked bodies too)")
    max_json_depth: int = _limit(32, "deepest nesting of JSON objects and arrays in a body")
    max_n: int = _limit(16, "largest n and best_of")
    max_prompts: int = _limit(64, "most prompts in one completions request")
    max_sequences: int = _limit(256, "most sequences in one request (prompts x best_of or n)")
    max_logprobs: int = _limit(20, "largest logprobs (completions) and top_logprobs (chat)")
    max_stop: int = _limit(16, "most stop strings")
    max_stop_length: int = _limit(256, "longest stop string, in characters")
    max_logit_bias: int = _limit(1024, "most logit_bias entries")
    max_stop_token_ids: int = _limit(256, "most stop_token_ids")
    max_messages: int = _limit(1024, "most chat messages in one request")
    max_content_parts: int = _limit(256, "most content parts in one chat message")
    max_tools: int = _limit(128, "most tools in one chat request")
    max_prompt_chars: int | None = _limit(None, "longest prompt text (and rendered chat), in "
                                          "characters, checked before tokenizing; none: "
                                          "max_model_len x the tokenizer's longest token")
    max_output_tokens: int | None = _limit(None, "largest max_tokens; none: what the "
                                           "context leaves")
    max_queued_requests: int = _limit(1024, "requests admitted but without a first token yet; "
                                      "past this, 429 with Retry-After")

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value is not None and value < 1:
                raise ValueError(f"limit {name} must be at least 1, got {value}")


LIMIT_FIELDS = tuple((f.name, f.default, f.metadata["help"]) for f in fields(Limits))
