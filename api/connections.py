"""Connection hygiene for the HTTP server, so that idle, half-sent or flooding clients cannot take
it off the air (issue 23, item 6). uvicorn alone closes a connection only when it is idle after a
response (`timeout_keep_alive`): one that never sends a byte, or stops halfway through its
headers or body, stays open for ever, and some tens of thousands of them exhaust the process's
file descriptors, after which accepting fails, probes time out and every failure is logged.

- **Request timeout**: a connection that owes the server bytes (no complete request head yet,
  or a body still arriving) and sends none for `request_timeout` seconds is closed; a request
  head must be complete within `request_timeout` of the connection (or the last response),
  whatever trickles in meanwhile. A connection whose request is being answered is never
  touched (a long streamed answer sends, it does not wait).
- **Deferred accept** (Linux): a connection is handed to the server only once it sends its
  first bytes, so silent connections wait in the kernel, not in the server's accept queue.
- **Connection limit**: past `max_connections` open connections, each new one closes the
  oldest connection that is waiting for a request, so a flood of idle sockets churns instead of
  locking out new clients (a health probe always gets in); the file descriptor limit is raised
  to what the limit needs.
- **Log rate limit**: at most `burst` records per message template per `window` seconds; the rest
  are counted and reported in one line when the window ends, so a flood cannot fill the disk.
"""
from __future__ import annotations

import collections
import logging
import resource
import socket
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_REQUEST_TIMEOUT_S = 10.0
DEFAULT_KEEP_ALIVE_S = 5.0
# The listen backlog also bounds the kernel's queue of connections still deferred (TCP_DEFER_ACCEPT):
# past it SYN cookies admit silent connections into the accept queue after all. Measured on the
# 20,000-connection flood: 512 lets probes time out while the flood connects, 4096 does not.
ACCEPT_BACKLOG = 2048
_FD_HEADROOM = 512  # descriptors kept for everything but client sockets (LMDB, model files, threads)


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards `wanted` + headroom (never past the hard limit); returns
    how many client connections the limit then allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted + _FD_HEADROOM if hard == resource.RLIM_INFINITY else min(hard, wanted + _FD_HEADROOM)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit to %d: %s", target, e)
    return max(16, min(wanted, soft - _FD_HEADROOM))


def defer_accept(sock: socket.socket, seconds: float) -> bool:
    """Linux's TCP_DEFER_ACCEPT on the listening socket: a connection reaches accept() only once
    its first bytes arrive (or after `seconds`, when the request timeout then closes it), so
    connections that never send one cost the server no work and do not queue ahead of a real
    request (a health probe sends its request at once). Past the listen backlog the kernel admits
    connections by SYN cookie, which skips the deferral: the protocol's limits still hold then.
    Returns False where the option does not exist."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None:
        return False
    sock.setsockopt(socket.IPPROTO_TCP, option, max(1, int(seconds)))
    return True


def guarded_protocol(max_connections: int, request_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the request timeout and the connection limit (module docstring).
    A new class per server: the waiting connections it tracks are that server's."""
    waiting: collections.OrderedDict[GuardedProtocol, None] = collections.OrderedDict()

    class GuardedProtocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._guard_timer = None
            self._owed_since = self._last_data = self.loop.time()
            waiting[self] = None
            if len(self.connections) > max_connections:
                oldest = next(iter(waiting))
                (oldest if oldest is not self else self)._guard_close("connection limit reached")
            self._guard_arm(request_timeout)

        def connection_lost(self, exc) -> None:
            waiting.pop(self, None)
            if self._guard_timer is not None:
                self._guard_timer.cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._last_data = self.loop.time()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a request head is complete: being answered
                waiting.pop(self, None)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # waiting for the next request (keep-alive)
                self._owed_since = self.loop.time()
                waiting[self] = None
                waiting.move_to_end(self)

        def _owes_bytes(self) -> bool:
            their = self.conn.their_state
            return their is h11.IDLE or (their is h11.SEND_BODY and self.conn.our_state is h11.SEND_RESPONSE)

        def _guard_arm(self, delay: float) -> None:
            self._guard_timer = self.loop.call_later(max(0.05, delay), self._guard_check)

        def _guard_check(self) -> None:
            self._guard_timer = None
            if self.transport.is_closing():
                return
            now = self.loop.time()
            if self._owes_bytes():
                head_due = self._owed_since + request_timeout if self.conn.their_state is h11.IDLE else float("inf")
                idle_due = self._last_data + request_timeout
                if now >= min(head_due, idle_due):
                    self._guard_close("request not received in time")
                    return
                self._guard_arm(min(head_due, idle_due) - now)
            else:
                self._guard_arm(request_timeout)

        def _guard_close(self, why: str) -> None:
            waiting.pop(self, None)
            if self.logger.level <= logging.DEBUG:
                self.logger.debug("closing %s: %s", self.client, why)
            self.transport.abort()  # no lingering FIN_WAIT on a client that does not read

    return GuardedProtocol


class RateLimit(logging.Filter):
    """At most `burst` records per (logger, message template) per `window` seconds; what is
    dropped is counted and reported once the window is over (module docstring)."""

    def __init__(self, burst: int = 20, window: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.burst, self.window, self._clock = burst, window, clock
        self._seen: dict[tuple[str, str], list] = {}  # key -> [window start, count, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self._clock()
        slot = self._seen.get(key)
        if slot is None or now - slot[0] >= self.window:
            dropped = slot[2] if slot is not None else 0
            if len(self._seen) > 10_000:  # templates are few; never let the table itself grow without bound
                self._seen.clear()
            self._seen[key] = [now, 1, 0]
            if dropped:
                record.msg = f"{record.msg} [and {dropped} more like it in the last {self.window:g} s, not logged]"
            return True
        slot[1] += 1
        if slot[1] <= self.burst:
            return True
        slot[2] += 1
        return False


def rate_limit_logs(*logger_names: str, burst: int = 20, window: float = 10.0) -> RateLimit:
    """One RateLimit on every handler of the root logger and of the named loggers."""
    limit = RateLimit(burst, window)
    for name in ("", *logger_names):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(limit)
    return limit
