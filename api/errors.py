"""Every error the API sends says what went wrong in one sentence: `{"detail": message}`, and on
the OpenAI-compatible routes also OpenAI's `{"error": {...}}`, which its clients read."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

OPENAI_PREFIXES = ("/v1/chat/", "/v1/models", "/v1/completions")
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 409: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                 422: "invalid_request_error", 429: "rate_limit_error", 503: "server_overloaded"}


class ApiError(Exception):
    """An error with its HTTP status, raised anywhere below a route (the worker included)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, *,
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
        self.code, self.param = code, param  # OpenAI's error code and parameter, where it has them


def error_response(path: str, status: int, message: str, headers: dict[str, str] | None = None,
                   extra: dict | None = None, code: str | None = None, param: str | None = None) -> JSONResponse:
    body: dict = {"detail": message, **(extra or {})}
    if path.startswith(OPENAI_PREFIXES):
        body["error"] = {"message": message, "type": _OPENAI_TYPES.get(status, "api_error"),
                         "param": param, "code": code or status}
    return JSONResponse(body, status_code=status, headers=headers)


def describe_validation(errors: list[dict]) -> str:
    """pydantic's error list as one line: `top_k: Input should be less than or equal to 32`."""
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ())]
        if loc[:1] == ["body"]:
            loc = loc[1:]
        kind, msg = e.get("type", ""), str(e.get("msg", "invalid"))
        if kind == "json_invalid":
            parts.append(f"invalid JSON: {e.get('ctx', {}).get('error', msg)} (at character {loc[0] if loc else '?'})")
        elif not loc and kind == "missing":
            parts.append("a JSON request body is required")
        elif not loc and kind in ("model_attributes_type", "dict_type"):
            parts.append("the request body must be a JSON object (Content-Type: application/json)")
        else:
            msg = msg.removeprefix("Value error, ")
            parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return error_response(request.url.path, 422, describe_validation(exc.errors()), extra={"errors": errors})

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        return error_response(request.url.path, exc.status_code, message, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request.url.path, exc.status, exc.message, headers=exc.headers, code=exc.code,
                              param=exc.param)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request.url.path, 500, "internal server error (logged on the server)")
