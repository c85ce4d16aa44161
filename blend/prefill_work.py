"""One request's prefill as the scheduler's work: what it costs in tokens, and how it is spent
over one step or several.

The scheduler gives each step a token budget for prefill work, after every running sequence has
decoded its token. A prefill that fits the budget runs whole, through `Runner.start` (the engine's
one prefill entry, every mode and fast path as `blend/prefill.py` has them). One that does not is
spread over steps:
- `full` and `prefix` are cut along the prompt: `prefill.run_layers` pushes the prompt through
  every layer a piece at a time, each piece attending to the cache the earlier pieces wrote — the
  same layers and the same cache, so the result is the unchunked one up to float rounding. These
  pieces never use the prefill graphs: a chunked prefill keeps its own cache across steps.
- `blend` is cut along the layers (its selection needs every chunk token at the check layer at
  once): `Runner.start_steps` is the whole prefill as a coroutine that yields after each layer it
  queued, and a step queues layers until their tokens reach the budget. The same kernels in the
  same order, so the result is the whole prefill's, bit for bit. It keeps the prefill graphs'
  buffer across steps: the scheduler lets no prefill overtake one under way.
`reuse` always runs whole: its cost is the question's, a fraction of any budget.
"""
from __future__ import annotations

import math
import time
from collections.abc import Generator, Iterator
from typing import Protocol

import torch

from blend.batch import DecodeBatch
from blend.forward import ModelParts, logits_of
from blend.prefill import PrefillResult, Steps, new_cache, prefix_hit_cache, run_layers, to_device
from blend.prompt import Layout
from blend.sequence import SeqState
from blend.spec import Mode, QuerySpec
from store.chunkkv import ArrivingKV
from store.tiers import ChunkKVSource


class Runner(Protocol):
    """What the scheduler and its work need of the one owner of the model (blend.engine.Engine)."""
    parts: ModelParts
    tokenizer: object
    stop_ids: frozenset[int]
    max_context: int
    decoder: DecodeBatch | None  # the decode slots and their batched step

    def reserve_decode(self, slots: int, slot_tokens: int, grow_only: bool = False) -> DecodeBatch: ...

    def start(self, layout: Layout, spec: QuerySpec, kv: ChunkKVSource) -> SeqState: ...
    def start_steps(self, layout: Layout, spec: QuerySpec, kv: ChunkKVSource,
                    spread: bool = False) -> Steps[SeqState]: ...
    def prefix_kv(self, prefix_ids: list[int]) -> torch.Tensor: ...
    def load_chunks(self, layout: Layout, mode: Mode, kv: ChunkKVSource, blend=None): ...
    def check(self, layout: Layout, spec: QuerySpec) -> None: ...
    def next_tokens(self, logits: torch.Tensor, seqs: dict[int, SeqState]) -> dict[int, int]: ...


def prefill_cost(n_layers: int, layout: Layout, spec: QuerySpec) -> int:
    """Tokens pushed through every layer, or the equivalent: what a prefill spends of a step's
    budget. blend: every token through layers 0…c, the selected chunk tokens and the question
    through the rest."""
    N, P, S = layout.n_tokens, layout.n_prefix, layout.suffix_start
    mode = spec.mode
    if mode is Mode.FULL:
        return N
    if mode is Mode.PREFIX:
        return N - P - (len(layout.chunks[0]) if layout.chunks else 0)
    if mode is Mode.REUSE:
        return N - S
    c, L = spec.blend.check_layer, n_layers
    kept = math.ceil(spec.blend.ratio * layout.n_chunk_tokens) + N - S
    return max(1, math.ceil(((c + 1) * N + (L - c - 1) * kept) / L))


class PrefillWork:
    """A request's prefill, advanced by the scheduler a budget at a time; `seq` once done."""

    def __init__(self, runner: Runner, layout: Layout, spec: QuerySpec, kv: ChunkKVSource):
        self.runner, self.layout, self.spec, self.kv = runner, layout, spec, kv
        self.cost = prefill_cost(runner.parts.n_layers, layout, spec)
        self.spent = 0
        self.seq: SeqState | None = None
        self._pieces: Iterator[int] | None = None  # a chunked prefill under way

    @property
    def left(self) -> int:
        return self.cost - self.spent

    @property
    def chunkable(self) -> bool:
        return self.spec.mode in (Mode.FULL, Mode.PREFIX, Mode.BLEND)

    @property
    def min_piece(self) -> int:
        """The least a prefill's first piece costs: blend's first layer pushes every prompt token
        (a layer's worth of the cost); a chunked full or prefix piece, or a later one, can be one
        token."""
        if self.spec.mode is Mode.BLEND and not self.started:
            return min(self.left, math.ceil(self.layout.n_tokens / self.runner.parts.n_layers))
        return 1

    @property
    def started(self) -> bool:
        return self._pieces is not None

    def advance(self, budget: int) -> int:
        """Spend up to `budget` tokens (at least one piece's worth, so that every prefill ends);
        returns what was spent. `seq` is set when the prefill is done."""
        if self.seq is not None:
            return 0
        if self._pieces is None and (self.left <= budget or not self.chunkable):
            self.seq = self.runner.start(self.layout, self.spec, self.kv)
            spent, self.spent = self.left, self.cost
            return spent
        if self._pieces is None:
            self._pieces = self._layered() if self.spec.mode is Mode.BLEND else self._chunked()
            next(self._pieces)  # nothing computed yet
        spent = self._pieces.send(max(1, budget))
        self.spent += spent
        if self.seq is not None:  # the last piece: its suspended frame still holds the prefill's
            self._pieces.close()  # cache (one prompt's KV), which the sequence's slot now copies
            self._pieces = None
        return spent

    def close(self) -> None:
        """Drop a chunked prefill under way (its client left): its cache is freed now."""
        if self._pieces is not None:
            self._pieces.close()
            self._pieces = None

    def _layered(self) -> Generator[int, int, None]:
        """A coroutine: receives a budget, queues the prefill's next layers until the tokens they
        pushed (over the layer count: the cost's unit) reach it, yields what they cost; the
        last piece sets `seq`."""
        L = self.runner.parts.n_layers
        steps = self.runner.start_steps(self.layout, self.spec, self.kv, spread=True)
        budget = yield 0
        pushed = 0  # tokens through one layer, since the piece began
        try:
            while True:
                try:
                    pushed += next(steps)
                except StopIteration as stop:
                    self.seq = stop.value
                    yield max(1, math.ceil(pushed / L))
                    return
                if pushed >= budget * L:
                    budget = yield math.ceil(pushed / L)
                    pushed = 0
        finally:
            steps.close()  # dropped early: the arriving KV is closed with it

    @torch.inference_mode()
    def _chunked(self) -> Iterator[int]:
        """A coroutine: receives a budget, computes that many of the prompt's tokens through every
        layer, yields how many; the last piece sets `seq`."""
        runner, layout, spec = self.runner, self.layout, self.spec
        parts = runner.parts
        N = layout.n_tokens
        t0 = time.perf_counter()
        if spec.mode is Mode.FULL:
            kv, start = new_cache(parts, N), 0
        else:
            chunk_kvs = runner.load_chunks(layout, spec.mode, self.kv, spec.blend)
            if isinstance(chunk_kvs, ArrivingKV):  # prefix reads whole chunks, never streams
                chunk_kvs = chunk_kvs.wait_all()
            kv, start = prefix_hit_cache(parts, layout, runner.prefix_kv(layout.prefix), chunk_kvs)
        t_loaded = time.perf_counter()
        ids = to_device(layout.ids(), parts.device)
        budget = yield 0
        a = start
        h = None
        while a < N:
            b = min(N, a + budget)
            # The first b positions of the cache are the whole cache as far as these tokens can see.
            h, _, _ = run_layers(parts, ids[:b], kv[:, :, :, :b], a)
            done, a = b - a, b
            if a < N:
                budget = yield done
        recomputed = layout.n_chunk_tokens if spec.mode is Mode.FULL else max(0, layout.suffix_start - start)
        result = PrefillResult(logits_of(parts, h), kv, N, recomputed)
        self.seq = SeqState(layout, spec, result, runner.tokenizer, runner.stop_ids, t0, t_loaded)
        yield done
