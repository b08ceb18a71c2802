"""The serving errors: one exception type that carries an HTTP status and renders OpenAI's error body.

OpenAI (and vLLM) answer every error with ``{"error": {"message", "type", "param", "code"}}``; clients such as the
``openai`` package read ``message`` from there and raise ``BadRequestError`` / ``NotFoundError`` / ... by status.
"""

from __future__ import annotations

from typing import Any

# The `type` strings OpenAI uses for each status (vLLM uses the same names).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 422: "invalid_request_error", 500: "internal_server_error",
          503: "service_unavailable"}


class ServeError(ValueError):
    """A request the server refuses: HTTP ``status``, a message naming the bad value, and the field (``param``).

    Args:
        message: What is wrong, what is valid and how to fix it.
        status: The HTTP status code. Default: 400.
        param: The request field at fault, e.g. ``"max_tokens"``. Default: None.
        code: A short machine-readable code, e.g. ``"model_not_found"``. Default: None.
    """

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """OpenAI's error body for this error."""
        return error_body(self.message, self.status, self.param, self.code)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` as OpenAI and vLLM send it."""
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code if code is not None else status}}
