"""The loading controller: as much recompute as the loading of a request's chunk KV hides.

When a request's chunk KV streams from a slower tier (LMDB, on CUDA), the GPU waits for layers to
land; computing more of the selected tokens of each layer in that time costs nothing in time to
first token, and a higher ratio brings the answer closer to `full`'s. CacheBlend's loading
controller picks the ratio so that recompute hides under loading; this one does so from

- the compute: blend's prefill time with the KV already on the device, a linear model in the
  prompt's tokens N and the recomputed tokens r·C, fitted at startup from a few timed prefills
  (`calibrate`), and
- the load: the bytes a request's stream moves over the tier's bandwidth, measured on every
  streamed request (`observe`), since it depends on the page cache, the disk and the host's load.

The ratio is the largest r ≤ the request's ceiling (`BlendConfig.max_ratio`) whose compute fits
in `margin` of the load, never below the ratio asked for; a request without a ceiling keeps its
ratio (it is pinned). Nothing here runs on the CPU path, where KV is read whole before the
prefill and loading hides nothing.
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

from blend.spec import DEFAULT_MAX_RATIO

# The share of the load time recompute may fill: the last layers' compute never overlaps a load.
MARGIN = 0.8


@dataclass(frozen=True)
class ComputeCost:
    """Blend prefill time (ms) with the KV on the device: fixed + per_token·N + per_recomputed·r·C."""
    fixed_ms: float
    per_token_ms: float
    per_recomputed_ms: float

    def ms(self, n_tokens: int, recomputed: float) -> float:
        return self.fixed_ms + self.per_token_ms * n_tokens + self.per_recomputed_ms * recomputed

    def ratio_within(self, budget_ms: float, n_tokens: int, n_chunk_tokens: int) -> float:
        """The largest ratio whose compute fits in `budget_ms` (may be < 0 or > 1: clamp it)."""
        if n_chunk_tokens <= 0 or self.per_recomputed_ms <= 0:
            return 0.0
        return (budget_ms - self.fixed_ms - self.per_token_ms * n_tokens) / (self.per_recomputed_ms * n_chunk_tokens)


class LoadingController:
    """`ceiling`: the server's cap on any request's ceiling (`serve --max-ratio`)."""

    def __init__(self, cost: ComputeCost, ceiling: float = DEFAULT_MAX_RATIO, margin: float = MARGIN,
                 smoothing: float = 0.3):
        self.cost, self.ceiling, self.margin, self.smoothing = cost, ceiling, margin, smoothing
        self.bytes_per_s: float | None = None  # of the streamed tier, smoothed over requests
        self._lock = threading.Lock()

    def observe(self, nbytes: int, seconds: float) -> None:
        """One streamed request's load: its bytes, and the time from its first read to its last."""
        if nbytes <= 0 or seconds <= 0:
            return
        bw = nbytes / seconds
        with self._lock:
            self.bytes_per_s = bw if self.bytes_per_s is None else (
                self.smoothing * bw + (1 - self.smoothing) * self.bytes_per_s)

    def load_ms(self, nbytes: int) -> float | None:
        return None if self.bytes_per_s is None else 1e3 * nbytes / self.bytes_per_s

    def ratio(self, requested: float, ceiling: float | None, n_tokens: int, n_chunk_tokens: int, nbytes: int) -> float:
        """The ratio to recompute for a request whose chunks stream `nbytes`: within
        [requested, ceiling]; `requested` when there is no ceiling or no load measured yet."""
        load = self.load_ms(nbytes)
        if ceiling is None or load is None:
            return requested
        ceiling = min(ceiling, self.ceiling)
        if ceiling <= requested:
            return requested
        hidden = self.cost.ratio_within(self.margin * load, n_tokens, n_chunk_tokens)
        # a ratio is a share of tokens: keep it coarse, so that a request's answer does not move
        # with every jitter of the measured bandwidth
        return max(requested, min(ceiling, int(hidden * 20) / 20))


def calibrate(engine, n_chunks: int = 6, chunk_tokens: int = 512, question_tokens: int = 64,
              ratios: tuple[float, float] = (0.1, 0.3), runs: int = 3) -> ComputeCost:
    """Fit ComputeCost from timed blend prefills on random token ids with the KV on the device:
    two ratios at one prompt size, and the first ratio at half the size (three points, three
    unknowns). The ratios span the range the controller works in (the selected tokens' layers
    run as CUDA graphs there). A few hundred ms on a 7B model's GPU; the ids need no tokenizer."""
    from blend.engine import sync
    from blend.shapes import random_layout
    from blend.spec import BlendConfig, Mode, QuerySpec

    chunk_tokens = max(8, min(chunk_tokens, (engine.max_context - question_tokens - 64) // max(1, n_chunks)))
    vocab = engine.model.config.vocab_size
    points = []
    for n, r in ((n_chunks, ratios[0]), (n_chunks, ratios[1]), (max(1, n_chunks // 2), ratios[0])):
        layout = random_layout(vocab, n, chunk_tokens, question_tokens, seed=17 + n)
        kv = engine.memory_cache(layout)
        spec = QuerySpec(Mode.BLEND, BlendConfig(ratio=r), max_tokens=1)
        times = []
        for i in range(runs + 1):
            sync(engine.device)
            t0 = time.perf_counter()
            engine.generate(layout, spec, kv).run()
            sync(engine.device)
            if i:  # the first run warms graphs and kernels
                times.append((time.perf_counter() - t0) * 1e3)
        kv.close()
        points.append((layout.n_tokens, r * layout.n_chunk_tokens, statistics.median(times)))
    (n1, c1, t1), (_, c2, t2), (n3, c3, t3) = points
    per_rec = max(0.0, (t2 - t1) / (c2 - c1)) if c2 != c1 else 0.0
    per_tok = max(0.0, ((t1 - per_rec * c1) - (t3 - per_rec * c3)) / (n1 - n3)) if n1 != n3 else 0.0
    fixed = t1 - per_rec * c1 - per_tok * n1
    return ComputeCost(fixed, per_tok, per_rec)

