"""The engine: the one owner of the model and of all its device state — weights, tokenizer, prefix
KV, the prefill graphs and side stream, one set of decode slots with their graphs, the sampler —
and of the one loop that runs it (`self.scheduler`, blend/scheduler.py). Everything that uses the
model goes through that loop: `generate` steps it inline (ask, eval, bench) or waits for it when
it runs on its own thread (serve); a chunk's KV (`compute_chunk`) is work queued in it. Functions
below the engine take tensors; this is the one stateful object."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Protocol

import torch
from torch.profiler import record_function

from blend.batch import DecodeBatch, KVSlots
from blend.forward import model_parts
from blend.graphs import LayerGraphs
from blend.loader import LoadedModel
from blend.prefill import PrefillResult, Steps, compute_kv, drive, prefill_full, prefill_steps
from blend.prompt import DEFAULT_SYSTEM, Layout, PromptBuilder
from blend.rope import check_blendable
from blend.scheduler import Scheduler, slot_size
from blend.sequence import Answer, SeqState, penalized, pick
from blend.spec import QUESTION_PASS, BlendConfig, ContextOverflow, Mode, QuerySpec
from store.chunkkv import ArrivingKV, ChunkKV
from store.serialize import CorruptEntry
from store.tiers import ChunkKVCache, ChunkKVSource, KVShape

# A memory-only cache with no byte budget worth the name: one request's chunks (ask --chunks, eval).
UNBOUNDED = 1 << 62


class RatioPolicy(Protocol):
    """What may raise a streamed request's recompute ratio (blend.loading.LoadingController)."""

    def ratio(self, requested: float, ceiling: float | None, n_tokens: int, n_chunk_tokens: int,
              nbytes: int) -> float: ...

    def observe(self, nbytes: int, seconds: float) -> None: ...


def sync(device: torch.device) -> None:
    """Wait for the device, so that a host clock reads the time its work took."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generation:
    """Iterate for text pieces as they are decoded; `result` holds the Answer once exhausted."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.result: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._pieces

    def run(self) -> Answer:
        for _ in self:
            pass
        assert self.result is not None
        return self.result


class Engine:
    def __init__(self, loaded: LoadedModel, system: str = DEFAULT_SYSTEM, *,
                 cuda_graphs: bool | None = None, graph_tokens: int = 16384):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.fingerprint = loaded.fingerprint
        self.name = loaded.name
        self.parts = model_parts(self.model)
        self.prompts = PromptBuilder(self.tokenizer, system) if self.tokenizer is not None else None
        self._prefix_kv: dict[tuple[int, ...], torch.Tensor] = {}
        self.stop_ids = self._stop_ids()
        if cuda_graphs is None:
            cuda_graphs = self.parts.device.type == "cuda"
        self.graphs = LayerGraphs(self.parts, min(graph_tokens, self.max_context)) if cuda_graphs else None
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.decoder: DecodeBatch | None = None  # the decode slots, allocated by reserve_decode
        self.scheduler = Scheduler(self)
        # Raises the ratio of a request whose chunk KV streams, to what the loading hides
        # (blend.loading; set by whoever serves, once calibrated). None: ratios stay as asked.
        self.loading: RatioPolicy | None = None

    @property
    def device(self) -> torch.device:
        return self.parts.device

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 4096))

    def _stop_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None:
            for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", self.tokenizer.eos_token):
                tid = self.tokenizer.convert_tokens_to_ids(tok) if tok else None
                if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                    ids.add(tid)
        return frozenset(ids)

    # -- layout and chunk KV -------------------------------------------------------------------
    def layout(self, question: str, chunks: Sequence[str]) -> Layout:
        if self.prompts is None:
            raise ValueError("this model has no tokenizer; build a Layout from token ids")
        return self.prompts.layout(question, list(chunks))

    def prefix_kv(self, prefix_ids: Sequence[int]) -> torch.Tensor:
        """Exact KV of the prompt head, computed once per distinct prefix."""
        key = tuple(prefix_ids)
        if key not in self._prefix_kv:
            p = self.parts
            empty = torch.empty(p.n_layers, 2, p.n_kv_heads, 0, p.head_dim, dtype=p.dtype, device=p.device)
            self._prefix_kv[key] = compute_kv(p, empty, list(prefix_ids))
        return self._prefix_kv[key]

    def compute_chunk(self, prefix_ids: Sequence[int], chunk_ids: Sequence[int],
                      context: Sequence[int] = ()) -> ChunkKV:
        """A chunk's KV as if it came right after the prefix (its attention sink), or, with
        `context` (its nearest neighbours' ids, side by side), right after the prefix and the
        context: only the chunk's own rows are kept, at the positions they had (neighbour-aware
        KV, FusionRAG-style; it costs the context's prefill too). Work queued in the model's loop,
        like a request's prefill (indexing never stalls the decoding batch for longer than one
        step's budget)."""
        ids, ctx = list(chunk_ids), list(context)

        def compute() -> ChunkKV:
            kv = compute_kv(self.parts, self.prefix_kv(prefix_ids), ctx + ids)
            return ChunkKV(kv[:, :, :, len(ctx):].contiguous() if ctx else kv, start=len(prefix_ids) + len(ctx))
        return self.scheduler.run_model(compute, cost=len(prefix_ids) + len(ctx) + len(ids))

    def run_model(self, fn, cost: int):
        """Any other use of the model (a logprob pass): `fn()` run in the loop, in its turn."""
        return self.scheduler.run_model(fn, cost)

    def kv_shape(self) -> KVShape:
        p = self.parts
        return KVShape(self.fingerprint, p.n_layers, p.n_kv_heads, p.head_dim, p.dtype)

    def kv_cache(self, prefix_ids: Sequence[int] | None = None, **tiers) -> ChunkKVCache:
        """A ChunkKVCache for this model's chunks behind `prefix_ids` (default: the prompt head of
        its chat template); `tiers`: ChunkKVCache's store, budgets and streaming switch. Its
        recompute callback runs the model through its loop."""
        if prefix_ids is None:
            if self.prompts is None:
                raise ValueError("this model has no tokenizer: give the prompt head's token ids")
            prefix_ids = self.prompts.prefix_ids
        prefix = list(prefix_ids)
        return ChunkKVCache(self.kv_shape(), prefix, lambda ids: self.compute_chunk(prefix, ids).kv,
                            device=self.device,
                            compute_in_context=lambda ids, ctx: self.compute_chunk(prefix, ids, ctx).kv, **tiers)

    def memory_cache(self, layout: Layout) -> ChunkKVCache:
        """Every chunk of `layout` computed now and held in memory (no store): for `ask --chunks`,
        tests and eval. Computing up front keeps precompute out of the request's TTFT, as with a
        store."""
        cache = self.kv_cache(layout.prefix, gpu_bytes=UNBOUNDED, stream=False)
        for ids in layout.chunks:
            cache.ensure(ids)
        return cache

    def load_chunks(self, layout: Layout, mode: Mode | str, kv: ChunkKVSource,
                    blend: BlendConfig | None = None) -> list[ChunkKV] | ArrivingKV:
        """The chunk KVs a mode reads: none for full, the first for prefix, all otherwise. With
        CUDA graphs, reuse and blend take them still arriving if the source streams, in the
        order of the layers they read (blend: from the check layer on)."""
        mode = Mode.parse(mode)
        wanted = {Mode.FULL: 0, Mode.PREFIX: min(1, len(layout.chunks))}.get(mode, len(layout.chunks))
        chunks = layout.chunks[:wanted]
        if not chunks:
            return []
        with record_function("rb.load_kv"):
            layers = None
            if self.graphs is not None and mode in (Mode.REUSE, Mode.BLEND):
                cfg = blend or BlendConfig()
                # the question selection's pass reads every layer before blending starts
                first = cfg.check_layer if mode is Mode.BLEND and cfg.selection not in QUESTION_PASS else 0
                layers = list(range(first, self.parts.n_layers))
            return kv.fetch(chunks, layers)

    # -- prefill and generation ----------------------------------------------------------------
    def prefill(self, layout: Layout, mode: Mode | str, chunk_kvs: list[ChunkKV] | ArrivingKV,
                blend: BlendConfig | None = None) -> PrefillResult:
        """Raises CorruptEntry when a streamed layer failed its checksum (the result is void)."""
        return drive(self.prefill_steps(layout, mode, chunk_kvs, blend))

    def prefill_steps(self, layout: Layout, mode: Mode | str, chunk_kvs: list[ChunkKV] | ArrivingKV,
                      blend: BlendConfig | None = None, spread: bool = False) -> Steps[PrefillResult]:
        """prefill as a coroutine (blend.prefill.prefill_steps): a step per layer with `spread`.
        Closed early (its client left), it closes the arriving KV too."""
        if not isinstance(chunk_kvs, ArrivingKV):
            return (yield from self._prefill(layout, mode, chunk_kvs, blend, spread))
        try:
            result = yield from self._prefill(layout, mode, chunk_kvs, blend, spread)
        except BaseException:
            with contextlib.suppress(Exception):
                chunk_kvs.close()
            raise
        chunk_kvs.close()  # raises if a layer the queued prefill reads failed its checksum
        return result

    def check(self, layout: Layout, spec: QuerySpec) -> None:
        """What the model decides about a query, checked before any work."""
        spec.check_model(self.parts.n_layers)
        if layout.n_tokens + spec.max_tokens > self.max_context:
            raise ContextOverflow("max_tokens", f"the prompt ({layout.n_tokens} tokens) plus max_tokens={spec.max_tokens} "
                                         f"exceeds the model's context of {self.max_context}")
        if spec.mode is not Mode.FULL:
            check_blendable(self.model, layout.n_tokens)

    def _prefill(self, layout: Layout, mode: Mode | str, chunk_kvs: list[ChunkKV] | ArrivingKV,
                 blend: BlendConfig | None, spread: bool = False) -> Steps[PrefillResult]:
        mode = Mode.parse(mode)
        QuerySpec(mode, blend or BlendConfig()).check_model(self.parts.n_layers)
        if layout.n_tokens > self.max_context:
            raise ContextOverflow("question", f"the prompt of {layout.n_tokens} tokens exceeds the model's context "
                                       f"of {self.max_context}")
        if mode is Mode.FULL:
            return prefill_full(self.model, layout)
        check_blendable(self.model, layout.n_tokens)
        graphs = self.graphs if self.graphs is not None and layout.n_tokens <= self.graphs.max_keys else None
        return (yield from prefill_steps(self.parts, layout, self.prefix_kv(layout.prefix), chunk_kvs, mode,
                                         blend, graphs, self.side, spread))

    def generate(self, layout: Layout, spec: QuerySpec = QuerySpec(), kv: ChunkKVSource | None = None) -> Generation:
        """The one query path: the layout's chunk KV from `kv` (a memory cache of the layout's
        chunks when None), the prefill `spec` asks for, then decoding — as a job of the model's
        loop, stepped by the caller while it iterates (or by the loop's thread while serving).
        Raises BadQuery for what the caller must change."""
        self.check(layout, spec)
        return Generation(self.scheduler.stream(layout, spec, kv or self.memory_cache(layout)))

    def reserve_decode(self, slots: int, slot_tokens: int, grow_only: bool = False) -> DecodeBatch:
        """Allocate the decode slots: `slots` sequences of `slot_tokens` tokens (the scheduler's
        to call, with nothing running). `grow_only`: keep the present ones if they are as large."""
        old = self.decoder
        size = slot_size(slot_tokens)
        if old is not None:
            have = (old.slots.n_slots, old.slots.max_tokens)
            if have == (slots, size) or grow_only and have[0] >= slots and have[1] >= size:
                return old
        if grow_only:  # the inline slot: room for a usual request too, so that it is rarely regrown
            size = max(size, min(self.max_context, 4096), old.slots.max_tokens if old is not None else 0)
        self.decoder = None  # the old buffer is freed before the new one is allocated
        if self.device.type == "cuda":
            del old
            torch.cuda.empty_cache()
        self.decoder = DecodeBatch(self.parts, KVSlots(self.parts, slots, size),
                                   graphs=self.graphs is not None)
        return self.decoder

    def release_decode(self) -> None:
        """Free the decode slots (and their graphs) now, e.g. before measuring free memory."""
        self.decoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def start(self, layout: Layout, spec: QuerySpec, kv: ChunkKVSource) -> SeqState:
        """Load the layout's chunk KV from `kv` and prefill it as `spec` asks: the sequence is then
        ready to decode (`SeqState.first()` picks its first token). The caller has checked it."""
        return drive(self.start_steps(layout, spec, kv))

    def start_steps(self, layout: Layout, spec: QuerySpec, kv: ChunkKVSource,
                    spread: bool = False) -> Steps[SeqState]:
        """start as a coroutine: it yields after each layer it queued (with `spread`, one per
        layer), so that the scheduler can spread a blend prefill over its steps."""
        mode, blend = spec.mode, spec.blend
        self.prefix_kv(layout.prefix)  # computed once per model, never part of a request's TTFT
        sync(self.device)
        t0 = time.perf_counter()
        chunk_kvs = self.load_chunks(layout, mode, kv, blend)
        sync(self.device)
        t_loaded = time.perf_counter()
        streamed = isinstance(chunk_kvs, ArrivingKV)
        if streamed and mode is Mode.BLEND and self.loading is not None and blend.max_ratio is not None:
            blend = replace(blend, ratio=self.loading.ratio(blend.ratio, blend.max_ratio, layout.n_tokens,
                                                            layout.n_chunk_tokens, chunk_kvs.nbytes))
        try:
            result = yield from self.prefill_steps(layout, mode, chunk_kvs, blend, spread)
        except CorruptEntry:
            if not isinstance(chunk_kvs, ArrivingKV):
                raise
            # A streamed layer failed its checksum mid-prefill: the prefill is void; the source
            # serves the chunks again, verified whole (recomputing what is bad).
            wanted = len(chunk_kvs.chunks)
            result = yield from self.prefill_steps(layout, mode, kv.refetch(layout.chunks[:wanted]), blend, spread)
        else:
            load = chunk_kvs.loaded() if streamed and chunk_kvs.loaded is not None else None
            if load is not None and self.loading is not None:
                self.loading.observe(*load)
        return SeqState(layout, spec, result, self.tokenizer, self.stop_ids, t0, t_loaded)

    def next_tokens(self, logits: torch.Tensor, seqs: dict[int, SeqState]) -> dict[int, int]:
        """The next token of every sequence (row → sequence) from a decode step's logits: greedy
        rows in one argmax and one host sync, sampled rows each with its own generator."""
        logits = penalized(logits, seqs)  # repetition control, every row in one call
        greedy = [r for r, s in seqs.items() if s.spec.sampling.temperature == 0.0]
        out: dict[int, int] = {}
        if greedy:  # every row's argmax (free rows' too): one kernel, one copy to the host
            best = logits.argmax(-1).tolist()
            out = {r: best[r] for r in greedy}
        for r, s in seqs.items():
            if r not in out:
                out[r] = pick(logits[r], s.spec.sampling, s.generator)
        return out
