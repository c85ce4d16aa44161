"""Goodput: the highest Poisson arrival rate at which a server keeps its latency targets (p99 time
to first token and p99 time per output token) over a run of requests — DistServe's measure, and
the one serving systems are compared by (throughput at saturation hides latency).

The search spends few runs: a burst of requests all at once gives the rate the server completes
at saturation, which bounds goodput from above (a server cannot keep up with more arrivals than
it completes). The first run is at a fraction of it; then bisection between the highest rate
that held and the lowest that did not, until they are close or the runs are spent. Every rate is
judged on one full run of at least `requests` requests, never extrapolated.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Targets:
    ttft_p99_ms: float = 1000.0
    tpot_p99_ms: float = 50.0

    def met(self, row: dict) -> bool:
        return row["ttft_p99_ms"] <= self.ttft_p99_ms and row["tpot_p99_ms"] <= self.tpot_p99_ms


@dataclass
class Goodput:
    rate: float                 # the highest rate that held (0.0: none did)
    failed_at: float | None     # the lowest rate that did not (None: none failed)
    saturation: float           # completed requests/s under a burst
    runs: list[dict]            # every run, in order, each marked "met"


def search(run: Callable[[float], dict], saturation: float, targets: Targets = Targets(),
           max_runs: int = 5, start: float = 0.75, precision: float = 0.1,
           affordable: Callable[[float], bool] = lambda rate: True) -> Goodput:
    """`run(rate)` serves one Poisson run at `rate` and returns its row (ttft_p99_ms,
    tpot_p99_ms). Stops after `max_runs` runs, once the bracket [held, failed] is narrower
    than `precision` × held, or when `affordable(rate)` says the next run would not fit the
    time left (the bracket so far is the answer)."""
    if saturation <= 0:
        raise ValueError("the saturation rate must be positive")
    held, failed, runs = 0.0, None, []
    rate = start * saturation
    for _ in range(max_runs):
        if runs and not affordable(rate):
            break
        row = dict(run(rate))
        row["met"] = targets.met(row)
        runs.append(row)
        if row["met"]:
            held = max(held, rate)
        else:
            failed = rate if failed is None else min(failed, rate)
        if failed is None:  # every rate so far held: go up (the burst may have underestimated)
            rate *= 1.25
        elif held == 0.0:   # nothing held yet: halve
            rate = failed / 2
        else:
            if failed - held <= precision * held:
                break
            rate = (held + failed) / 2
    return Goodput(held, failed, saturation, runs)
