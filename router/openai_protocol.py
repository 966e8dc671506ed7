"""OpenAI-compatible request bodies (pydantic), their checks, and their mapping to params.

Types and ranges are pydantic's, in strict mode (no "5" for 5, no 1.5 for an int, no NaN); the
rules that span fields or depend on configured limits are `check()`, which names the field of
each refusal. A null field means its default. Unknown fields are ignored (as OpenAI does for most);
fields we know but cannot honour yet (suffix) are refused with 400 rather than silently dropped. The sizes of a body's lists are checked on the parsed JSON, before
pydantic builds anything from them (`check_body_sizes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pagedserve.router.errors import context_length_exceeded, invalid_request
from pagedserve.router.generation import GenerationParams
from pagedserve.router.limits import INT32_MAX, INT64_MAX, INT64_MIN, Limits
from pagedserve.router.structured_outputs import GUIDED_FIELDS, Constraint, from_request
from pagedserve.router.tools import ToolPlan, plan_tools, template_message

ChatRole = Literal["system", "developer", "user", "assistant", "tool", "function"]
# The lists (and logit_bias's map) a request may carry, each with the Limits field bounding it.
LIST_LIMITS = {"stop": "max_stop", "stop_token_ids": "max_stop_token_ids",
               "logit_bias": "max_logit_bias", "messages": "max_messages", "tools": "max_tools",
               "input": "max_messages"}  # /v1/responses' input items become messages


def array_bounds(limits: Limits) -> dict[str, int]:
    """The top-level arrays a JSON body may carry and their sizes, for the JSON reader to refuse
    a longer one while it reads (router/json_body.py)."""
    return {name: getattr(limits, attr) for name, attr in LIST_LIMITS.items()
            if name != "logit_bias"}


def check_list_sizes(sizes: Mapping[str, int], limits: Limits) -> None:
    """400 naming the first list longer than its limit (sizes: field name -> length)."""
    for name, size in sizes.items():
        limit = getattr(limits, LIST_LIMITS[name])
        if size > limit:
            raise invalid_request(f"{name} may have at most {limit} entries, got {size}", name)


def check_body_sizes(body: Any, limits: Limits, max_model_len: int | None = None) -> None:
    """The list sizes of a parsed JSON body, before pydantic (or anything) is built from it: the
    LIST_LIMITS lists, each message's content parts, and the prompts (token-id prompts against
    max_model_len, when known). Types are pydantic's to check later."""
    if not isinstance(body, dict):
        return
    check_list_sizes({name: len(value) for name in LIST_LIMITS
                      if isinstance(value := body.get(name), (list, dict))}, limits)
    messages = body.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        parts = message.get("content") if isinstance(message, dict) else None
        if isinstance(parts, list) and len(parts) > limits.max_content_parts:
            raise invalid_request(f"messages[{i}].content may have at most "
                                  f"{limits.max_content_parts} parts, got {len(parts)}",
                                  "messages")
    _check_prompt_sizes(body.get("prompt"), limits, max_model_len)


def _check_prompt_sizes(prompt: Any, limits: Limits, max_model_len: int | None) -> None:
    if not isinstance(prompt, list) or not prompt:
        return
    batched = isinstance(prompt[0], (str, list))
    if batched and len(prompt) > limits.max_prompts:
        raise invalid_request(f"at most {limits.max_prompts} prompts in one request", "prompt")
    for ids in (prompt if batched else [prompt]) if max_model_len else ():
        if isinstance(ids, list) and len(ids) >= max_model_len:  # no room for one token
            raise context_length_exceeded(max_model_len, len(ids), None, "prompt")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingRequest(_Body):
    """Fields shared by completions and chat completions (OpenAI's and vLLM's extras)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=INT32_MAX)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra sampling fields, all in the scheduler's proto.
    ignore_eos: bool = False
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0, le=INT32_MAX)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Structured outputs (router/structured_outputs.py): OpenAI's, vLLM's, vLLM's older ones.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        """Top logprobs per token the response shows; None: no logprobs at all."""
        return None

    def check(self, limits: Limits) -> None:
        """The rules pydantic's types do not say; 400 naming the field."""
        if self.n > limits.max_n:
            raise invalid_request(f"n must be at most {limits.max_n}", "n")
        if self.stream_options is not None and not self.stream:
            raise invalid_request("stream_options is only allowed when stream is true",
                                  "stream_options")
        stops = self.stop_list
        if len(stops) > limits.max_stop:
            raise invalid_request(f"at most {limits.max_stop} stop strings", "stop")
        if any(len(s) > limits.max_stop_length for s in stops):
            raise invalid_request(f"stop strings must be at most {limits.max_stop_length} "
                                  "characters", "stop")
        check_list_sizes({"stop_token_ids": len(self.stop_token_ids or ())}, limits)
        self._check_logit_bias(limits)
        self._check_constraint()

    def constraint(self) -> Constraint | None:
        """The output constraint the request's fields ask for (400 when malformed)."""
        return from_request({f: getattr(self, f) for f in (
            "response_format", "structured_outputs", *GUIDED_FIELDS)})

    def _check_constraint(self) -> None:
        c = self.constraint()
        if c is None:
            return
        # EOS must stay allowed wherever the grammar ends; both of these would take it away.
        if self.min_tokens:
            raise invalid_request("min_tokens cannot be combined with a structured output "
                                  f"constraint ({c.param})", "min_tokens")
        if self.ignore_eos:
            raise invalid_request("ignore_eos cannot be combined with a structured output "
                                  f"constraint ({c.param})", "ignore_eos")

    def _check_logit_bias(self, limits: Limits) -> None:
        bias = self.logit_bias or {}
        if len(bias) > limits.max_logit_bias:
            raise invalid_request(f"logit_bias may have at most {limits.max_logit_bias} entries",
                                  "logit_bias")
        for key, value in bias.items():
            if not (key.isascii() and key.isdigit()) or len(key) > 10:
                raise invalid_request(f"logit_bias keys must be token ids, got {key[:32]!r}",
                                      "logit_bias")
            if not -100.0 <= value <= 100.0:
                raise invalid_request(f"logit_bias values must be in [-100, 100], got {value}",
                                      "logit_bias")

    def params(self, max_tokens: int) -> GenerationParams:
        if self.min_tokens > max_tokens:
            raise invalid_request(
                f"min_tokens ({self.min_tokens}) must be at most max_tokens ({max_tokens})",
                "min_tokens")
        return GenerationParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, min_p=self.min_p or 0.0, seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            min_tokens=self.min_tokens, stop=self.stop_list,
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=self.num_logprobs(),
        )


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    logprobs: int | None = Field(None, ge=0, le=INT32_MAX)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=INT32_MAX)

    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def candidates(self) -> int:
        """Sequences generated per prompt: best_of, or n."""
        return self.best_of or self.n

    def check(self, limits: Limits) -> None:
        super().check(limits)
        if self.suffix:
            raise invalid_request("suffix is not supported (this server does no insertion)",
                                  "suffix")
        if self.logprobs is not None and self.logprobs > limits.max_logprobs:
            raise invalid_request(f"logprobs must be at most {limits.max_logprobs}", "logprobs")
        if self.best_of is not None:
            if self.best_of < self.n:
                raise invalid_request(f"best_of ({self.best_of}) must be at least n ({self.n})",
                                      "best_of")
            if self.best_of > limits.max_n:
                raise invalid_request(f"best_of must be at most {limits.max_n}", "best_of")
            if self.stream and self.best_of > self.n:
                raise invalid_request("best_of > n cannot be streamed", "best_of")
        self._check_prompt(limits)

    def _check_prompt(self, limits: Limits) -> None:
        p = self.prompt
        batched = isinstance(p, list) and p and isinstance(p[0], (str, list))
        prompts = p if batched else [p]
        if not prompts or any(len(x) == 0 for x in prompts):
            raise invalid_request("prompt must not be empty", "prompt")
        if len(prompts) > limits.max_prompts:
            raise invalid_request(f"at most {limits.max_prompts} prompts in one request",
                                  "prompt")
        if len(prompts) * self.candidates > limits.max_sequences:
            raise invalid_request(f"prompts x best_of (or n) must be at most "
                                  f"{limits.max_sequences}", "prompt")

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of prompts (text, or token ids)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return p  # type: ignore[return-value]


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow")  # tool_calls, tool_call_id... reach the template
    role: ChatRole
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.model_extra
                                         and self.model_extra.get("tool_calls")):
            raise ValueError(f"a {self.role} message needs content")
        for part in self.content if isinstance(self.content, list) else ():
            if part.type != "text":
                raise ValueError(f"only text content parts are supported, got {part.type!r}")
            if part.text is None:
                raise ValueError("a text content part needs text")
        return self

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it: text parts joined into one string."""
        out = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            out["content"] = "\n".join(p.text or "" for p in self.content)
        return out


class _ChatTemplateFields(_Body):
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check_template(self, trusted: bool) -> None:
        for field in ("chat_template", "chat_template_kwargs"):
            if getattr(self, field) is not None and not trusted:
                raise invalid_request(f"{field} is refused: this server does not trust request "
                                      "chat templates (--trust-request-chat-template)", field)
        if self.continue_final_message and self.add_generation_prompt:
            raise invalid_request("continue_final_message needs add_generation_prompt false",
                                  "continue_final_message")


class ChatCompletionRequest(SamplingRequest, _ChatTemplateFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=INT32_MAX)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    echo: bool = False

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self, limits: Limits) -> None:
        super().check(limits)
        if not self.messages:
            raise invalid_request("messages must not be empty", "messages")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise invalid_request("top_logprobs needs logprobs: true", "top_logprobs")
            if self.top_logprobs > limits.max_logprobs:
                raise invalid_request(f"top_logprobs must be at most {limits.max_logprobs}",
                                      "top_logprobs")

    def tool_plan(self, parser: str | None) -> ToolPlan:
        """How tools shape this request (router/tools.py); 400 naming the field at fault."""
        return plan_tools(self.tools, self.tool_choice, self.parallel_tool_calls, parser,
                          self.constraint())

    def template_messages(self) -> list[dict[str, Any]]:
        return [template_message(m.template_dict()) for m in self.messages]


class TokenizeRequest(_ChatTemplateFields):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# -- responses (completions and chat are built as dicts in router/serving.py) -------------------
class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "pagedserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
