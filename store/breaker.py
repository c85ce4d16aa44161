"""A circuit breaker for the shared KV tier: while the tier is unhealthy (paused, partitioned,
overloaded), every request would otherwise wait out a socket timeout before recomputing its
chunks. After `failures` consecutive failures, or at once when the server cannot be reached
(a timeout, a refused connection), the breaker opens and calls are refused at once
(the chunk is recomputed, as for a miss); after `cooldown` seconds one trial call goes through
(half-open): its success closes the breaker, its failure opens it for another cooldown."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

DEFAULT_FAILURES = 3
DEFAULT_COOLDOWN_S = 5.0


class CircuitBreaker:
    def __init__(self, failures: int = DEFAULT_FAILURES, cooldown: float = DEFAULT_COOLDOWN_S,
                 clock: Callable[[], float] = time.monotonic):
        self.failures, self.cooldown, self._clock = failures, cooldown, clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial = False       # a half-open trial call is in flight
        self.opened = 0           # times it opened (for stats)
        self.refused = 0          # calls refused while open

    @property
    def state(self) -> str:
        """closed (healthy), open (refusing) or half-open (one trial call allowed or in flight)."""
        with self._lock:
            return self._state()

    def _state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half-open" if self._clock() - self._opened_at >= self.cooldown else "open"

    def allow(self) -> bool:
        """Whether a call may go to the tier now (counts a refusal when not)."""
        with self._lock:
            state = self._state()
            if state == "closed":
                return True
            if state == "half-open" and not self._trial:
                self._trial = True
                return True
            self.refused += 1
            return False

    def success(self) -> None:
        with self._lock:
            self._consecutive, self._opened_at, self._trial = 0, None, False

    def failure(self, unreachable: bool = False) -> None:
        """One failed call; `unreachable` (a timeout, a refused or dropped connection) opens the
        breaker at once: the next call would only wait out the same timeout."""
        with self._lock:
            self._consecutive += 1
            if unreachable or self._trial or self._consecutive >= self.failures:
                if self._opened_at is None or self._trial:
                    self.opened += 1
                self._opened_at, self._trial = self._clock(), False
