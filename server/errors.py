"""Errors that reach a client, in OpenAI's shape.

Exception tree (every class carries its HTTP status, OpenAI ``type`` and ``code``)::

    ApiError                              -> {"error": {"message", "type", "param", "code"}}
    ├── InvalidRequest            400  invalid_request_error
    │   ├── UnsupportedParameter  400  code=unsupported_parameter, param=<name>
    │   └── ContextLengthExceeded 400  code=context_length_exceeded
    ├── RequestTooLarge           413  code=request_too_large
    ├── Unauthorized              401  authentication_error / invalid_api_key
    ├── Forbidden                 403  permission_error / insufficient_permissions (a key without the role)
    ├── ModelNotFound             404  code=model_not_found
    ├── Overloaded                429  code=rate_limit_exceeded (queue full, or the key's rate), with Retry-After
    ├── ModelUnavailable          503  code=model_unavailable (in the catalog, not loaded)
    ├── QueueTimeout              503  code=queue_timeout, with Retry-After
    ├── UpstreamUnavailable       503  code=upstream_unavailable, with Retry-After
    ├── ShuttingDown              503  code=server_shutting_down (draining), with Retry-After
    └── InternalError             500  server_error (a bug; never carries request text)

Routing decisions use ``server.upstream`` errors (transport vs status), not these.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        self.extra_headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        out = dict(self.extra_headers)
        if self.retry_after is not None:
            out["Retry-After"] = str(max(1, int(-(-self.retry_after // 1))))
        return out


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"

    def __init__(self, name: str, detail: str = "") -> None:
        why = f" {detail}" if detail else ""
        super().__init__(f"Unsupported parameter: '{name}' is not supported by this server.{why}", param=name)


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class RequestTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ApiError):
    status = 403
    type = "permission_error"
    code = "insufficient_permissions"


class ModelNotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist or you do not have access to it.", param="model")


class Overloaded(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ModelUnavailable(ApiError):
    status = 503
    type = "server_error"
    code = "model_unavailable"


class QueueTimeout(ApiError):
    status = 503
    type = "server_error"
    code = "queue_timeout"


class UpstreamUnavailable(ApiError):
    status = 503
    type = "server_error"
    code = "upstream_unavailable"


class ShuttingDown(ApiError):
    status = 503
    type = "server_error"
    code = "server_shutting_down"


class InternalError(ApiError):
    status = 500
    type = "server_error"
    code = "internal_error"
