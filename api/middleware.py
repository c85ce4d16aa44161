"""Pure ASGI middleware (no BaseHTTPMiddleware, which would buffer streams and hide client
disconnects): bearer-token auth and request body limits, both decided before routing."""
from __future__ import annotations

import logging

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from api.keys import KeyRing
from api.request_log import KEY_NAME

log = logging.getLogger(__name__)
INTERNAL = "internal server error (logged on the server)"
OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
OPEN_PREFIX = "/docs/static/"  # the docs pages' own scripts and styles (api/docs_page.py)


class BearerAuth:
    """Checked before any body is read, so an unauthenticated client cannot make the server
    buffer an upload. /health and the OpenAPI docs stay open (they show no content). The key's
    name (api/keys.py) goes into the request's state and log context, never the key."""

    def __init__(self, app: ASGIApp, keys: KeyRing):
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not scope["path"].startswith(OPEN_PREFIX):
            raw = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b"")
            scheme, _, token = raw.partition(b" ")
            name = self.keys.name_of(token.strip()) if scheme.lower() == b"bearer" else None
            if name is None:
                response = error_response(scope["path"], 401, "missing or wrong API key: send the header "
                                          "`Authorization: Bearer <key>`", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})["api_key"] = name
            KEY_NAME.set(name)
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body parsing passes it on (as a 413) instead of
    turning it into "There was an error parsing the body"."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body too large: at most {limit} bytes here")


class BodyLimit:
    """413 for a declared Content-Length over the limit, before reading anything; and for a
    body (chunked, or lying about its length) that turns out larger while it streams in."""

    def __init__(self, app: ASGIApp, default: int, per_path: dict[str, int] | None = None):
        self.app, self.default, self.per_path = app, default, per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"], self.default)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            too_large = BodyTooLarge(limit)
            await error_response(scope["path"], 413, too_large.detail)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


class CatchAll:
    """The last word on an error that no handler took: a 500 with a JSON body and a log line with
    the traceback, and never an exception out to the server, which would drop the connection
    (uvicorn closes it when an app raises after starting its response). A response already
    under way (a stream) is ended cleanly instead."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = False

        async def tracked(message: Message) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await error_response(scope["path"], 500, INTERNAL)(scope, receive, send)
            elif not finished:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
