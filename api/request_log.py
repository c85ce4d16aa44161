"""A request id for every request, and logs that carry it.

`RequestContext` (pure ASGI, the outermost middleware) takes the client's `X-Request-ID` when it
is a short token, else makes one; sends it back in the response's `X-Request-ID`; and makes it
the context of everything logged while the request is handled. With `--log-format json` each log
line is one JSON object (`time`, `level`, `logger`, `message`, `request_id`, `api_key`: the
name of the key used, never the key), and every request ends with one access line
(`method`, `path`, `status`, `ms`)."""
from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
KEY_NAME: contextvars.ContextVar[str | None] = contextvars.ContextVar("api_key", default=None)
HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
access = logging.getLogger("ragblend.access")


class RequestContext:
    def __init__(self, app: ASGIApp, log_access: bool = False):
        self.app, self.log_access = app, log_access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(HEADER.encode(), b"").decode("latin-1")
        rid = given if _CLIENT_ID.match(given) else uuid.uuid4().hex[:16]
        token = REQUEST_ID.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        status, t0 = 500, time.perf_counter()

        async def tagged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (HEADER.encode(), rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        finally:
            if self.log_access:
                KEY_NAME.set(scope["state"].get("api_key"))
                access.info("%s %s %d", scope.get("method"), scope.get("path"), status,
                            extra={"method": scope.get("method"), "path": scope.get("path"), "status": status,
                                   "ms": round((time.perf_counter() - t0) * 1e3, 3)})
            REQUEST_ID.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object a line."""
    EXTRA = ("method", "path", "status", "ms")

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
               "request_id": REQUEST_ID.get(), "api_key": KEY_NAME.get()}
        out.update({k: getattr(record, k) for k in self.EXTRA if hasattr(record, k)})
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def use_json_logs(level: str) -> None:
    """Route every logger (uvicorn's too, which is then started without its own config) to one
    JSON handler on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
