"""Errors the router reports, in OpenAI's shape, with their HTTP and gRPC status."""

from __future__ import annotations

import grpc


class RouterError(Exception):
    """An error a client sees: {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = (
            message, status, type, param, code)
        self.headers = headers or {}

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _GRPC_CODES.get(self.status, grpc.StatusCode.INTERNAL)


_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def invalid_request(message: str, param: str | None = None, code: str | None = None
                    ) -> RouterError:
    return RouterError(message, 400, "invalid_request_error", param, code)


def unauthorized() -> RouterError:
    return RouterError("Missing or incorrect API key: send the header "
                       "'Authorization: Bearer <key>'.", 401, "authentication_error", None,
                       "invalid_api_key")


def too_many_requests(waiting: int, retry_after_s: int = 1) -> RouterError:
    return RouterError(f"The server is busy: {waiting} requests are already waiting for their "
                       "first token. Retry later.", 429, "rate_limit_error", None,
                       "too_many_queued_requests", {"Retry-After": str(retry_after_s)})


def internal_error(request_id: str | None) -> RouterError:
    return RouterError(f"Internal server error (request id {request_id}); it has been logged.",
                       500, "internal_error", None, "internal_error")


def model_not_found(model: str) -> RouterError:
    return RouterError(f"The model `{model}` does not exist.", 404, "invalid_request_error",
                       "model", "model_not_found")


def context_length_exceeded(max_model_len: int, prompt_tokens: int, max_tokens: int | None,
                            param: str = "prompt") -> RouterError:
    asked = prompt_tokens + (max_tokens or 0)
    detail = (f"{prompt_tokens} in the prompt, {max_tokens} in the completion"
              if max_tokens else f"{prompt_tokens} in the prompt, none left for the completion")
    return RouterError(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{asked} tokens ({detail}). Please reduce the length of the prompt or completion.",
        400, "invalid_request_error", param, "context_length_exceeded")


def from_grpc(e: grpc.aio.AioRpcError) -> RouterError:
    """An error from the scheduler, as the router's client should see it."""
    code = e.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return RouterError(f"scheduler unavailable: {e.details()}", 503, "service_unavailable",
                           code="scheduler_unavailable", headers={"Retry-After": "1"})
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return invalid_request(e.details() or "invalid request")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RouterError(e.details() or "overloaded", 429, "rate_limit_error",
                           headers={"Retry-After": "1"})
    if code == grpc.StatusCode.ALREADY_EXISTS:  # the client's request_id is still running
        return RouterError(e.details() or "request_id is already running", 409,
                           "invalid_request_error", "request_id", "request_id_in_use")
    return RouterError(f"scheduler error {code.name}: {e.details()}", 500, "internal_error")
