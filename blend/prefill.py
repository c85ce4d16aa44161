"""The four prefill modes over one prompt layout. Each returns the last position's logits and the
per-layer KV cache that decoding continues from.

| mode   | computed through every layer                    | KV taken from cache          |
| full   | every token (transformers' own forward)          | nothing                      |
| prefix | chunks 2…k and the suffix                        | prefix, chunk 1 (exact)      |
| reuse  | the suffix                                       | prefix, all chunks           |
| blend  | layers < c and K/V of c: all; then top-r + suffix | prefix, the unselected rest  |
"""
from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch.profiler import record_function

from blend import hostwait
from blend.graphs import LayerGraphs
from blend.forward import ModelParts, attend_and_mlp, causal_mask, logits_of, project_qkv, rope_for
from blend.lookahead import KeysAt, lookahead_attention, probe_layers, question_states
from blend.question import question_pass
from store.chunkkv import ArrivingKV, ChunkKV
from blend.prompt import Layout
from blend.rope import delta_cos_sin, rotate_keys_
from blend.select import CheckLayer, gradual_counts, narrow, score, top_tokens
from blend.spec import QUESTION_PASS, BlendConfig


@dataclass
class Selected:
    """What the check layers decided: the ratio (the budget) and how many chunk tokens flowed on
    after each check layer (one count per check layer; several with gradual filtering)."""
    ratio: float
    counts: list[int] = field(default_factory=list)


@dataclass
class PrefillResult:
    logits: torch.Tensor      # [vocab], float32, at the last prompt position
    kv: torch.Tensor          # [L, 2, H, N, D], the decode cache
    n_tokens: int
    recomputed_tokens: int    # chunk tokens whose KV is freshly computed in the last layer
    selected: Selected | None = field(default=None)  # blend only


R = TypeVar("R")
# What a prefill's coroutine yields after each layer it queued: the tokens that layer pushed (its
# cost, in tokens through one layer); what it returns is its result.
Steps = Generator[int, None, R]


def drive(steps: Steps[R]) -> R:
    """Run a prefill's coroutine to its end, in one go."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def run_layers(parts: ModelParts, ids: torch.Tensor, kv: torch.Tensor, start: int,
               blend: BlendConfig | None = None, chunk_span: tuple[int, int] | None = None,
               graphs: LayerGraphs | None = None, ready: torch.cuda.Event | None = None,
               feed: LayerFeed | None = None, chunk_lengths: list[int] | None = None,
               keys_at: KeysAt | None = None, asked: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, Selected | None]:
    """layer_steps in one go: every layer queued at once (the graph layers in one graph)."""
    return drive(layer_steps(parts, ids, kv, start, blend, chunk_span, graphs, ready, feed, chunk_lengths,
                             keys_at, asked))


def layer_steps(parts: ModelParts, ids: torch.Tensor, kv: torch.Tensor, start: int,
                blend: BlendConfig | None = None, chunk_span: tuple[int, int] | None = None,
                graphs: LayerGraphs | None = None, ready: torch.cuda.Event | None = None,
                feed: LayerFeed | None = None, chunk_lengths: list[int] | None = None,
                keys_at: KeysAt | None = None, asked: torch.Tensor | None = None, spread: bool = False,
                ) -> Steps[tuple[torch.Tensor, torch.Tensor, Selected | None]]:
    """Push the tokens at positions `start…N-1` through every layer, writing their K/V into the
    fused cache `kv` [L, 2, H, N, D] (pre-filled with cached K/V before `start`, and wherever a
    token will not be recomputed) and attending over it.

    With `blend`, at the check layer the chunk tokens (positions in `chunk_span`, chunks of
    `chunk_lengths`) are scored by the config's selection and only the top ratio, plus every
    token after the chunks, flow on. With `graphs` (whose buffer `kv` must be), the layers where few tokens
    flow replay CUDA graphs instead; `ready` marks the cache of the layers after the check layer
    as filled (by a side stream, overlapping the first layers); or `feed(i)` is called before
    each layer i computes, to fill its cache as the KV arrives. Nothing here waits for the GPU.
    `keys_at(layers)` gives those layers' keys over the prefix and chunks (the lookahead probe's);
    `asked` the question pass's chunk-token scores (the question selection). With several check
    layers, each later one narrows the flowing chunk tokens to its count (select.gradual_counts).
    Returns the last active token's hidden state, the final active positions and what blend's
    check layer selected.

    A coroutine: it yields after each layer it queued, the tokens that layer pushed (the graph
    layers count as one step, each layer's tokens summed), so that the scheduler can queue a
    prefill a few layers per step between decode steps (blend/prefill_work.py). With `spread`,
    the graph layers replay one graph per layer, each its own step.
    """
    n = kv.shape[3]
    active = torch.arange(start, n, device=parts.device)
    h = parts.embed(ids[start:])[None]
    cos, sin = rope_for(parts, active)
    # None: plain causal attention (the flash kernel), the queries being a tail of the keys; an
    # explicit mask once the tail is short enough that padding it would cost more.
    mask = None if 2 * (n - start) >= n else causal_mask(active, n)
    checks = blend.check_layers if blend is not None else ()
    graph_from = checks[-1] + 1 if checks else 0
    counts = (gradual_counts(chunk_span[1] - chunk_span[0], blend.ratio, checks, parts.n_layers)
              if checks else [])
    selected, first, first_score = None, None, None
    for i, layer in enumerate(parts.layers):
        if ready is not None and i == checks[0] + 1:
            torch.cuda.current_stream().wait_event(ready)
        if graphs is not None and i >= graph_from and graphs.covers(active.numel()):
            fill, rotation = (None, None) if feed is None or feed.settled else (feed.fill, feed.graph_rotation())
            spans = [(j, j + 1) for j in range(i, parts.n_layers)] if spread else [(i, parts.n_layers)]
            for lo, hi in spans:
                with record_function("rb.graph_layers"):
                    h = graphs.run(lo, h, active, n, fill, rotation, last=hi)
                if spread and feed is not None:
                    feed.arriving.start()
                yield active.numel() * (hi - lo)
            break
        if feed is not None:
            # Eager kernels may synchronize (cuDNN planning a new shape): the reads of this layer
            # must be under way before anything waits on them (the source starts them at fetch).
            feed.arriving.start(i)
            feed(i)
        q, k, v = project_qkv(layer, h, cos, sin, parts.head_dim)
        keep = None
        if checks and i in checks[1:]:
            with record_function("rb.narrow"):
                j = checks.index(i)
                m = counts[j - 1]  # the chunk tokens flowing: the first m active ones
                pos = active[:m]
                chosen = narrow(blend.selection, first, first_score, pos - chunk_span[0], k[:, :, :m],
                                v[:, :, :m], kv[i], pos, counts[j])
                keep = torch.cat([chosen, torch.arange(m, active.numel(), device=active.device)])
        if checks and i == checks[0]:
            with record_function("rb.select"):
                lo, hi = chunk_span
                ahead = None
                if blend.selection == "lookahead":
                    if keys_at is None:
                        raise ValueError("the lookahead selection needs the later layers' cached keys")
                    t = hi - start  # the question's first active index
                    hq = question_states(layer, h, q, k, v, t, active - start)
                    ahead = lookahead_attention(parts, hq, cos[t:], sin[t:],
                                                probe_layers(parts.n_layers, i), keys_at, lo, hi)
                first = CheckLayer(q, k, v, kv[i], lo - start, hi - start, start,
                                   list(chunk_lengths or [hi - lo]), layer.self_attn.scaling, ahead, asked)
                first_score = score(blend.selection, first)
                keep = keep_after_check(first, first_score, counts[0])
                selected = Selected(blend.ratio, counts)
        kv[i, 0].index_copy_(1, active, k[0])
        kv[i, 1].index_copy_(1, active, v[0])
        if keep is not None:
            # The check layer needs every token's K/V (written above), but the rest of the layer
            # only for the tokens that flow on: the others' outputs would never be read.
            h, q, active = h[:, keep], q[:, :, keep], active[keep]
            cos, sin, mask = cos[keep], sin[keep], causal_mask(active, n)
        h = attend_and_mlp(layer, h, q, kv[i, 0][None], kv[i, 1][None], mask)
        if spread and feed is not None:  # the steps between pieces synchronize with the device,
            feed.arriving.start()       # which may wait on flags of layers queued so far
        yield active.numel()
    return h[:, -1], active, selected


def keep_after_check(check: CheckLayer, chunk_score: torch.Tensor, count: int) -> torch.Tensor:
    """Indices into the active tokens (positions start, start+1, …) that survive the check layer:
    the `count` chunk tokens (indices lo…hi-1) of largest score, then every token after the
    chunks. Tokens before the chunks (none, in blend) are dropped."""
    chosen = top_tokens(chunk_score, count) + check.lo
    n_active = check.k.shape[2]
    return torch.cat([chosen, torch.arange(check.hi, n_active, device=check.k.device)])


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A small host list on the device without stalling the host: a copy from pageable memory
    waits for the stream to drain, one from pinned memory is queued like a kernel."""
    if device.type == "cuda":  # allocated pinned: pin_memory() would first ask CUDA about the pointer
        return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(values, dtype=torch.long)


def new_cache(parts: ModelParts, n_tokens: int) -> torch.Tensor:
    """An unfilled fused cache [L, 2, H_kv, N, D] in the model's dtype and device."""
    return torch.empty(parts.n_layers, 2, parts.n_kv_heads, n_tokens, parts.head_dim,
                       dtype=parts.dtype, device=parts.device)


# Re-rotation tables kept per model (ModelParts.rotations): a layout's shifts recur (chunks of one
# token budget in the same slots), and building the tables costs a few hundred µs of host time.
ROTATIONS_KEPT = 8


def chunk_rotation(parts: ModelParts, layout: Layout, chunk_kvs: list[ChunkKV]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-token cos/sin that move the chunks' cached keys to their places in `layout` (None when
    every chunk sits where it was cached). Read-only: later requests of the same shifts share them."""
    runs = tuple((start - ckv.start, ckv.n_tokens) for start, ckv in zip(layout.chunk_starts, chunk_kvs))
    if not any(shift for shift, _ in runs):
        return None
    kept = parts.rotations
    rotation = kept.get(runs)
    if rotation is None:
        shift = [d for d, n in runs for _ in range(n)]
        rotation = delta_cos_sin(parts.inv_freq, to_device(shift, parts.device))
        if len(kept) >= ROTATIONS_KEPT:
            kept.pop(next(iter(kept)))
        kept[runs] = rotation
    used_on(rotation, None)
    return rotation


def used_on(tensors: tuple[torch.Tensor, ...], stream: torch.cuda.Stream | None) -> None:
    """Kept tables read by work on `stream` (None: the current one): their memory must not be
    handed out again, once they are dropped, before that work is done."""
    if tensors[0].device.type == "cuda":
        stream = stream or torch.cuda.current_stream(tensors[0].device)
        for t in tensors:
            t.record_stream(stream)


def fill_cache(parts: ModelParts, layout: Layout, prefix_kv: torch.Tensor,
               chunk_kvs: list[ChunkKV], out: torch.Tensor | None = None,
               layers: slice = slice(None), rotate: bool = True,
               rotation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The fused cache before any compute: exact prefix KV, the given chunks' KV (the first ones of
    the layout, possibly none) re-rotated to their places; the rest is written by compute.

    Chunk KV is copied straight into place (asynchronously from pinned memory), then all moved
    keys are re-rotated in one pass with per-token angles (`rotation`, from chunk_rotation, when
    the caller fills layer by layer). `layers` fills only those layers; `rotate=False` leaves
    chunk keys unrotated (for layers where only cached values are read)."""
    kv = out if out is not None else new_cache(parts, layout.n_tokens)
    P = layout.n_prefix
    kv[layers, :, :, :P] = prefix_kv[layers]
    end = P
    for start, ckv in zip(layout.chunk_starts, chunk_kvs):
        end = start + ckv.n_tokens
        kv[layers, :, :, start:end].copy_(ckv.kv[layers], non_blocking=True)
    if rotate:
        rotation = rotation or chunk_rotation(parts, layout, chunk_kvs)
        if rotation is not None:
            rotate_keys_(kv[layers, 0, :, P:end], *rotation)
    return kv


class LayerFeed:
    """Fills the fused cache layer by layer from chunk KVs still arriving in host memory: layer
    i is copied (and its keys re-rotated) on the `side` stream as soon as the host holds it, and
    the compute stream waits for that layer alone, so reading layer i+1 overlaps computing i."""

    def __init__(self, parts: ModelParts, layout: Layout, prefix_kv: torch.Tensor, arriving: ArrivingKV,
                 kv: torch.Tensor, side: torch.cuda.Stream):
        self.parts, self.layout, self.prefix_kv, self.kv, self.side = parts, layout, prefix_kv, kv, side
        self.arriving = arriving
        self.layers = set(arriving.layers)
        self.filled: set[int] = set()      # layers already queued (a probe may fill one early)
        self.unrotated: set[int] = set()   # of those, layers whose chunk keys are not yet rotated
        self.settled = False               # every layer filled and rotated (after a question pass)
        P, S = layout.n_prefix, layout.suffix_start
        # One copy per layer needs the chunks side by side, in layout order, filling P…S.
        block = arriving.block
        self.block = block if block is not None and block.shape[3] == S - P else None
        self.rotation = chunk_rotation(parts, layout, arriving.chunks)
        if self.rotation is not None:
            used_on(self.rotation, side)
        # The side stream waits for each layer's flag itself where it can: then this thread only
        # queues work, and the whole prefill is queued while the reads are still running.
        self.flag_base = None
        if arriving.flags is not None and hostwait.available():
            self.flag_base = hostwait.device_address(arriving.flags)
        else:  # the host waits layer by layer: the reads must run ahead of it
            arriving.start()
        # KV stored in another format (int8, fp8, …) arrives as packed rows: with flags, each
        # layer's row is copied and decoded on the side stream straight into the cache.
        self.packed = arriving.packed if self.flag_base is not None and self.block is not None else None
        side.wait_stream(torch.cuda.current_stream())  # the rotation tables exist before use
        if self.block is not None and self.layers:
            with torch.cuda.stream(side):  # the exact prefix KV, for every fed layer at once
                lo = min(self.layers)
                kv[lo:, :, :, :P] = prefix_kv[lo:]

    def __call__(self, i: int, rotate: bool = True) -> None:
        """Queue layer i's fill; `rotate=False` where the layer's graph re-rotates the keys
        itself (see graph_rotation): one launch less per layer for the host."""
        if i not in self.layers:
            return
        if i in self.filled:  # by the probe, unrotated: an eager layer needs its keys in place
            if rotate and i in self.unrotated and self.rotation is not None:
                P, S = self.layout.n_prefix, self.layout.suffix_start
                rotate_keys_(self.kv[i, 0, :, P:S], *self.rotation)
            if rotate:
                self.unrotated.discard(i)
            return
        self.filled.add(i)
        if not rotate:
            self.unrotated.add(i)
        if self.flag_base is None:
            with record_function("rb.wait_kv"):
                self.arriving.wait(i)
        with torch.cuda.stream(self.side), record_function("rb.fill_layer"):
            if self.flag_base is not None:
                hostwait.wait_geq(self.side, self.flag_base + 4 * i, self.arriving.seq)
            if self.packed is not None or self.block is not None:
                P, S = self.layout.n_prefix, self.layout.suffix_start
                landing = self.arriving.landing if self.flag_base is not None else None
                if landing is not None:  # kept for the device tier: land there, then copy in
                    self.arriving.land(i)
                    self.kv[i, :, :, P:S].copy_(landing[i])
                elif self.packed is not None:
                    self.packed.decode_into(i, self.kv[i, :, :, P:S])
                else:
                    self.kv[i, :, :, P:S].copy_(self.block[i], non_blocking=True)
                if rotate and self.rotation is not None:
                    rotate_keys_(self.kv[i, 0, :, P:S], *self.rotation)
            else:
                fill_cache(self.parts, self.layout, self.prefix_kv, self.arriving.chunks, self.kv,
                           slice(i, i + 1), rotate=rotate, rotation=self.rotation)
            filled = torch.cuda.Event()
            filled.record(self.side)
        torch.cuda.current_stream().wait_event(filled)

    def fill(self, i: int) -> None:
        self(i, rotate=False)

    def fill_rows(self, layers: range) -> None:
        """fill() for consecutive layers at once, where their rows move in one copy (packed or
        block, with flags): the flag waits, then one copy and one decode for them all, and one
        event. The lookahead probe's layers are filled so, from the check layer."""
        todo = [i for i in layers if i in self.layers and i not in self.filled]
        one_copy = (self.flag_base is not None and (self.packed is not None or self.block is not None)
                    and len(todo) > 1 and todo == list(range(todo[0], todo[0] + len(todo))))
        if not one_copy:
            for i in todo:
                self.fill(i)
            return
        lo, hi = todo[0], todo[-1] + 1
        P, S = self.layout.n_prefix, self.layout.suffix_start
        with torch.cuda.stream(self.side), record_function("rb.fill_rows"):
            for i in todo:
                hostwait.wait_geq(self.side, self.flag_base + 4 * i, self.arriving.seq)
            if self.arriving.landing is not None and self.arriving.land_rows is not None:
                self.arriving.land_rows(lo, hi)
                self.kv[lo:hi, :, :, P:S].copy_(self.arriving.landing[lo:hi])
            elif self.packed is not None:
                self.packed.decode_rows(lo, hi, self.kv[lo:hi, :, :, P:S])
            else:
                self.kv[lo:hi, :, :, P:S].copy_(self.block[lo:hi], non_blocking=True)
            filled = torch.cuda.Event()
            filled.record(self.side)
        torch.cuda.current_stream().wait_event(filled)
        self.filled.update(todo)
        self.unrotated.update(todo)

    def probe_keys(self, layers: range) -> torch.Tensor:
        """[n, H, S, D]: the keys of `layers` over prefix and chunks, at their places, filled early
        for the lookahead probe: their cache is filled unrotated (each layer's graph rotates it
        later), so the probe reads a rotated copy."""
        self.arriving.start(layers.start)
        self.fill_rows(layers)
        P, S = self.layout.n_prefix, self.layout.suffix_start
        keys = self.kv[layers.start:layers.stop, 0, :, :S].clone()
        if self.rotation is not None:
            rotate_keys_(keys[:, :, P:], *self.rotation)
        return keys

    def settle(self) -> None:
        """A pass through every layer (the question pass) has filled them all and rotated their
        keys, in its graphs or eagerly: later passes read the cache as it is."""
        if self.layers - self.filled:
            raise RuntimeError(f"layers {sorted(self.layers - self.filled)} were never filled")
        self.unrotated.clear()
        self.settled = True

    def graph_rotation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position cos/sin [N, D] for the whole prompt: the chunks' re-rotation, the
        identity elsewhere (exact: k·1 + rot(k)·0 = k)."""
        P, S, N = self.layout.n_prefix, self.layout.suffix_start, self.layout.n_tokens
        D = self.parts.head_dim
        cos = torch.ones(N, D, dtype=torch.float32, device=self.parts.device)
        sin = torch.zeros(N, D, dtype=torch.float32, device=self.parts.device)
        if self.rotation is not None:
            cos[P:S], sin[P:S] = self.rotation
        return cos, sin


@torch.inference_mode()
def prefill_full(model: torch.nn.Module, layout: Layout) -> PrefillResult:
    """The baseline: transformers' own forward over the whole prompt."""
    device = model.model.embed_tokens.weight.device
    ids = torch.tensor([layout.ids()], device=device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    return PrefillResult(out.logits[0, -1].float(), kv, layout.n_tokens, layout.n_chunk_tokens)


def prefill_cached(parts: ModelParts, layout: Layout, prefix_kv: torch.Tensor,
                   chunk_kvs: list[ChunkKV] | ArrivingKV, mode: str, blend: BlendConfig | None = None,
                   graphs: LayerGraphs | None = None, side: torch.cuda.Stream | None = None) -> PrefillResult:
    """`prefix`, `reuse` or `blend` over cached chunk KVs (one per chunk; `prefix` reads the first).

    With a CUDA `side` stream, blend copies (and re-rotates) the cached KV of the layers after the
    check layer there, while the first layers compute: those layers recompute every token and
    need nothing cached but the check layer's values. Chunk KVs still arriving (ArrivingKV) are
    fed in layer by layer as they land, with CUDA graphs and a side stream; otherwise awaited."""
    return drive(prefill_steps(parts, layout, prefix_kv, chunk_kvs, mode, blend, graphs, side))


@torch.inference_mode()
def prefill_steps(parts: ModelParts, layout: Layout, prefix_kv: torch.Tensor,
                  chunk_kvs: list[ChunkKV] | ArrivingKV, mode: str, blend: BlendConfig | None = None,
                  graphs: LayerGraphs | None = None, side: torch.cuda.Stream | None = None,
                  spread: bool = False) -> Steps[PrefillResult]:
    """prefill_cached as a coroutine (layer_steps'): with `spread`, a step per layer. The question
    selection's pass runs whole, as the first step. Between steps nothing else may use `graphs`
    (the scheduler lets no prefill overtake one under way)."""
    arriving = chunk_kvs if isinstance(chunk_kvs, ArrivingKV) else None
    asking = mode == "blend" and (blend or BlendConfig()).selection in QUESTION_PASS
    if asking and arriving is not None and len(set(arriving.layers)) < parts.n_layers:
        raise ValueError("the question selection reads every layer's chunk KV: load the chunks with its "
                         "BlendConfig (Engine.load_chunks)")
    if arriving is not None:
        if graphs is None or side is None or mode == "prefix":
            arriving = None
        chunk_kvs = chunk_kvs.wait_all() if arriving is None else chunk_kvs.chunks
    needed = min(1, len(layout.chunks)) if mode == "prefix" else len(layout.chunks)
    if len(chunk_kvs) < needed:
        raise ValueError(f"{len(chunk_kvs)} chunk KVs for {needed} chunks")
    for ids, ckv in zip(layout.chunks, chunk_kvs):
        if ckv.n_tokens != len(ids):
            raise ValueError(f"chunk KV holds {ckv.n_tokens} tokens, the chunk has {len(ids)}")
    P, S, N = layout.n_prefix, layout.suffix_start, layout.n_tokens
    out = graphs.buffer(N) if graphs is not None else None
    ready, cfg, feed, keys_at, asked = None, None, None, None, None
    ids = to_device(layout.ids(), parts.device)
    if mode == "prefix":
        kv, start = prefix_hit_cache(parts, layout, prefix_kv, chunk_kvs, out)
    elif mode == "reuse":
        if arriving is not None:
            kv, feed = out, LayerFeed(parts, layout, prefix_kv, arriving, out, side)
        else:
            with record_function("rb.fill_cache"):
                kv = fill_cache(parts, layout, prefix_kv, chunk_kvs, out)
        start = S
    elif asking:
        # The question pass reads every layer's stale KV first, as `reuse` does.
        cfg = blend
        if arriving is not None:
            kv, feed = out, LayerFeed(parts, layout, prefix_kv, arriving, out, side)
        else:
            with record_function("rb.fill_cache"):
                kv = fill_cache(parts, layout, prefix_kv, chunk_kvs, out)
        with record_function("rb.question_pass"):
            asked = question_pass(parts, ids, kv, S, P, S,
                                  cfg.question_layers, graphs, feed)
        if feed is not None:
            feed.settle()
        yield (N - S) * parts.n_layers
        start = 0
    elif mode == "blend":
        cfg = blend or BlendConfig()
        if arriving is not None:
            kv, feed = out, LayerFeed(parts, layout, prefix_kv, arriving, out, side)
            keys_at = feed.probe_keys
        else:
            with record_function("rb.fill_cache"):
                kv = _blend_cache(parts, layout, prefix_kv, chunk_kvs, cfg, out)
            ready, keys_at = _fill_later_layers(parts, layout, prefix_kv, chunk_kvs, cfg, kv, side)
        start = 0
    else:
        raise ValueError(f"prefill_cached serves prefix, reuse and blend, not {mode!r}")
    h, final, selected = yield from layer_steps(parts, ids, kv, start, cfg, (P, S), graphs, ready, feed,
                                                [len(c) for c in layout.chunks], keys_at, asked, spread)
    logits = logits_of(parts, h)
    if arriving is not None:  # everything is queued: the reads must be under way (a source that
        arriving.start()     # did not start them at fetch starts them now)
    recomputed = int(((final >= P) & (final < S)).sum())
    return PrefillResult(logits, kv, N, recomputed, selected)


def prefix_hit_cache(parts: ModelParts, layout: Layout, prefix_kv: torch.Tensor, chunk_kvs: list[ChunkKV],
                     out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """`prefix` mode's fused cache and the first position it computes. Only a chunk cached at
    exactly its position is a true prefix hit: the first one."""
    P = layout.n_prefix
    first = len(layout.chunks[0]) if layout.chunks and chunk_kvs[0].start == P else 0
    with record_function("rb.fill_cache"):
        kv = fill_cache(parts, layout, prefix_kv, chunk_kvs[:1] if first else [], out)
    return kv, P + first


def _fill_later_layers(parts: ModelParts, layout: Layout, prefix_kv: torch.Tensor, chunk_kvs: list[ChunkKV],
                       cfg: BlendConfig, kv: torch.Tensor, side: torch.cuda.Stream | None,
                       ) -> tuple[torch.cuda.Event | None, KeysAt]:
    """Blend's cache for the layers after the check layer (they read cached K/V), on the `side`
    stream where there is one, overlapping the first layers' compute. The lookahead probe's layers
    go first, with their own event, so the check layer waits for them alone. Returns the event
    that marks every layer filled (None without a side stream) and the probe's key reader."""
    c, S = cfg.check_layer, layout.suffix_start
    probed = probe_layers(parts.n_layers, c) if cfg.selection == "lookahead" else range(c + 1, c + 1)
    if side is None:
        fill_cache(parts, layout, prefix_kv, chunk_kvs, kv, slice(c + 1, None))
        return None, lambda layers: kv[layers.start:layers.stop, 0, :, :S]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), record_function("rb.fill_cache_side"):
        rotation, rest = None, c + 1
        if len(probed):
            rotation, rest = chunk_rotation(parts, layout, chunk_kvs), probed.stop
            fill_cache(parts, layout, prefix_kv, chunk_kvs, kv, slice(c + 1, rest), rotation=rotation)
        probed_ready = torch.cuda.Event()
        probed_ready.record(side)
        fill_cache(parts, layout, prefix_kv, chunk_kvs, kv, slice(rest, None), rotation=rotation)
        ready = torch.cuda.Event()
        ready.record(side)
    waited = []

    def keys_at(layers: range) -> torch.Tensor:
        if not waited:
            torch.cuda.current_stream().wait_event(probed_ready)
            waited.append(True)
        return kv[layers.start:layers.stop, 0, :, :S]
    return ready, keys_at


def _blend_cache(parts: ModelParts, layout: Layout, prefix_kv: torch.Tensor, chunk_kvs: list[ChunkKV],
                 cfg: BlendConfig, out: torch.Tensor | None) -> torch.Tensor:
    """Blend's cache for the layers up to the check layer. They recompute every token, so of the
    cache they read only the check layer's chunk values (and keys) to compare against."""
    c = cfg.check_layer
    kv = out if out is not None else new_cache(parts, layout.n_tokens)
    fill_cache(parts, layout, prefix_kv, chunk_kvs, kv, slice(c, c + 1), rotate=cfg.selection == "key")
    return kv


@torch.inference_mode()
def compute_kv(parts: ModelParts, prefix_kv: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """KV [L, 2, H, T, D] of `ids` placed right after the prefix (the chunk's canonical position)."""
    P = prefix_kv.shape[3]
    layout = Layout(prefix=[0] * P, chunks=[], suffix=list(ids))
    kv = fill_cache(parts, layout, prefix_kv, [])
    all_ids = torch.tensor(layout.ids(), device=parts.device)
    run_layers(parts, all_ids, kv, P)
    return kv[:, :, :, P:].contiguous()
