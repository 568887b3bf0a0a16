"""Errors in OpenAI's format: `{"error": {"message", "type", "param", "code"}}` with a fitting status."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.responses import JSONResponse

from serving.errors import (
    ChatTemplateError,
    ContextLengthError,
    InvalidRequestError,
    LLMClusterError,
)


class APIError(Exception):
    """An error the API answers with; raise it anywhere a request is handled."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def overloaded(retry_after_s: int) -> APIError:
    return APIError(
        503,
        "the server is at capacity: too many requests are queued; retry later",
        type="server_error",
        code="overloaded",
        headers={"Retry-After": str(retry_after_s)},
    )


def replica_failed() -> APIError:
    return APIError(
        503,
        "the model replica serving this request failed and is being replaced; retry the request",
        type="server_error",
        code="replica_failed",
    )


def model_not_found(model: str) -> APIError:
    return APIError(404, f"the model '{model}' does not exist", param="model", code="model_not_found")


def internal_error(message: str = "internal server error") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


def from_engine_error(error: LLMClusterError, param_names: Mapping[str, str] | None = None) -> APIError:
    """The API error for an error the engine raised; `param_names` renames engine params to API ones."""
    rename = param_names or {}
    if isinstance(error, InvalidRequestError):
        param = rename.get(error.param, error.param) if error.param else None
        code = "context_length_exceeded" if isinstance(error, ContextLengthError) else None
        return APIError(400, str(error), param=param, code=code)
    if isinstance(error, ChatTemplateError):
        return APIError(400, str(error), param="messages")
    return internal_error(str(error))  # EngineDeadError and the like: a real fault
