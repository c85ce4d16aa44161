"""Connection hygiene on a real server (issue 23, item 6): idle and half-sent connections are
closed in bounded time, a flood past the connection limit never locks out a health probe, and a
flood of bad requests writes a bounded log. The 20,000-connection run is eval/idle_flood.py."""
from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.test_api import launch

pytestmark = pytest.mark.real  # tiny-smol speaks the bundled tokenizer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("RAGBLEND_REQUEST_TIMEOUT_S", "1")
    mp.setenv("RAGBLEND_MAX_CONNECTIONS", "64")
    tmp = tmp_path_factory.mktemp("conn")
    s = launch(tmp, "--threads", "1")
    mp.undo()
    s.log = tmp / "server.log"
    yield s
    s.stop()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setblocking(False)
    return s


def closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1024) == b""
    except BlockingIOError:
        return False
    except (ConnectionResetError, OSError):
        return True


def test_idle_and_half_sent_connections_are_closed_and_health_answers_throughout(server):
    idle = [connect(server.port) for _ in range(150)]  # past the limit of 64
    half = []
    for _ in range(20):
        s = connect(server.port)
        s.send(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the head never finished
        half.append(s)
    trickle = connect(server.port)
    worst, t0 = 0.0, time.monotonic()
    while time.monotonic() - t0 < 5.0:  # deferred accept (1 s) + the request timeout (1 s) + slack
        t = time.monotonic()
        assert httpx.get(f"{server.base}/health", timeout=1).status_code == 200
        worst = max(worst, time.monotonic() - t)
        try:
            trickle.send(b"G")  # a byte at a time: slowloris
        except OSError:
            pass
        time.sleep(0.2)
    assert worst < 1.0, worst
    still_open = [s for s in idle + half + [trickle] if not closed_by_server(s)]
    assert not still_open, f"{len(still_open)} of {len(idle) + len(half) + 1} still open"
    for s in idle + half + [trickle]:
        s.close()


def test_a_flood_of_bad_requests_writes_a_bounded_log(server):
    before = server.log.read_text().count("Invalid HTTP request")
    for _ in range(300):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
            try:
                s.recv(1024)
            except OSError:
                pass
    time.sleep(0.2)
    logged = server.log.read_text().count("Invalid HTTP request") - before
    assert 1 <= logged <= 21, logged
    assert httpx.get(f"{server.base}/health", timeout=1).status_code == 200
