"""The engine: owns model, tokenizer and prefix KV; turns (question, chunks) into an answer with
timings, in any prefill mode. Functions below it take tensors; this is the one stateful object."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from blend.decode import Sampling, decode
from blend.forward import model_parts
from blend.graphs import LayerGraphs
from blend.kv import ArrivingKV, ChunkKV
from blend.loader import LoadedModel
from blend.prefill import MODES, BlendConfig, PrefillResult, compute_kv, prefill_cached, prefill_full
from blend.prompt import DEFAULT_SYSTEM, Layout, PromptBuilder
from blend.rope import check_blendable
from store.hashing import chunk_hash

# (key, chunk token ids) → the chunk's KV, from whatever tier holds it (or computed). A source
# may also offer `many(keys, ids_list) -> list[ChunkKV]` to read a request's chunks at once, and
# `stream(keys, ids_list, layers) -> ArrivingKV` to hand them over layer by layer as they are read.
KVSource = Callable[[str, list[int]], ChunkKV]


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    mode: str
    ratio: float | None
    ttft_ms: float
    kv_load_ms: float
    prefill_ms: float
    per_token_ms: float
    recomputed_tokens: int    # chunk tokens computed fresh through every layer
    total_tokens: int         # prompt tokens
    chunk_tokens: int
    first_logits: torch.Tensor = field(repr=False)
    cached_tokens: int = 0    # prompt tokens whose KV was reused (prefix and chunks), not recomputed
    selection: str | None = None          # blend: how tokens were chosen
    requested_ratio: float | None = None  # blend: the ratio asked for (`ratio` is the one used)
    guard_estimate: float | None = None   # blend with a guard: its estimate at the ratio used

    @property
    def guard_raised(self) -> bool:
        return self.ratio is not None and self.requested_ratio is not None and self.ratio > self.requested_ratio

    def top_logprobs(self, tokenizer, k: int = 20) -> list[dict]:
        logp = torch.log_softmax(self.first_logits, dim=-1)
        top = torch.topk(logp, k)
        return [{"token_id": int(i), "token": tokenizer.decode([int(i)]) if tokenizer else str(int(i)),
                 "logprob": float(v)} for v, i in zip(top.values, top.indices)]


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

    def chunk_key(self, prefix_ids: Sequence[int], chunk_ids: Sequence[int]) -> str:
        return chunk_hash(self.fingerprint, prefix_ids, chunk_ids)

    def compute_chunk(self, prefix_ids: Sequence[int], chunk_ids: Sequence[int]) -> ChunkKV:
        """A chunk's KV as if it came right after the prefix (its attention sink)."""
        prefix_kv = self.prefix_kv(prefix_ids)
        return ChunkKV(compute_kv(self.parts, prefix_kv, list(chunk_ids)), start=len(prefix_ids))

    def memory_source(self, layout: Layout) -> KVSource:
        """Every chunk's KV computed now, held in memory (no store): for `ask --chunks`, tests and
        eval. Computing up front keeps precompute out of the request's TTFT, as with a store."""
        kvs = {self.chunk_key(layout.prefix, ids): self.compute_chunk(layout.prefix, ids) for ids in layout.chunks}
        return lambda key, ids: kvs[key]

    def load_chunks(self, layout: Layout, mode: str, source: KVSource,
                    keys: Sequence[str] | None = None, blend: BlendConfig | None = None) -> list[ChunkKV] | ArrivingKV:
        """The chunk KVs a mode reads: none for full, the first for prefix, all otherwise. `keys`:
        the chunks' store keys when the caller has them (retrieval does), saving the hashing.
        From a streaming source (on CUDA), reuse and blend get them still arriving, in the order
        of the layers they read (blend: from the check layer on)."""
        wanted = {"full": 0, "prefix": min(1, len(layout.chunks))}.get(mode, len(layout.chunks))
        chunks = layout.chunks[:wanted]
        with record_function("rb.load_kv"):
            names = [keys[i] if keys is not None else self.chunk_key(layout.prefix, ids) for i, ids in enumerate(chunks)]
            if not names:
                return []
            stream = getattr(source, "stream", None)
            if stream is not None and self.graphs is not None and mode in ("reuse", "blend"):
                first = (blend or BlendConfig()).check_layer if mode == "blend" else 0
                return stream(names, chunks, list(range(first, self.parts.n_layers)))
            many = getattr(source, "many", None)  # a source that reads a whole request in one go
            if many is not None:
                return many(names, chunks)
            return [source(name, ids) for name, ids in zip(names, chunks)]

    # -- prefill and generation ----------------------------------------------------------------
    def prefill(self, layout: Layout, mode: str, chunk_kvs: list[ChunkKV] | ArrivingKV,
                blend: BlendConfig | None = None) -> PrefillResult:
        if not isinstance(chunk_kvs, ArrivingKV):
            return self._prefill(layout, mode, chunk_kvs, blend)
        try:
            result = self._prefill(layout, mode, chunk_kvs, blend)
        except BaseException:
            with contextlib.suppress(Exception):
                chunk_kvs.close()
            raise
        chunk_kvs.close()  # raises if a layer the queued prefill reads failed its checksum
        return result

    def _prefill(self, layout: Layout, mode: str, chunk_kvs: list[ChunkKV] | ArrivingKV,
                 blend: BlendConfig | None) -> PrefillResult:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if layout.n_tokens > self.max_context:
            raise ValueError(f"prompt of {layout.n_tokens} tokens exceeds the model's context of {self.max_context}")
        if mode == "full":
            return prefill_full(self.model, layout)
        check_blendable(self.model, layout.n_tokens)
        graphs = self.graphs if self.graphs is not None and layout.n_tokens <= self.graphs.max_keys else None
        return prefill_cached(self.parts, layout, self.prefix_kv(layout.prefix), chunk_kvs, mode, blend,
                              graphs, self.side)

    def generate(self, layout: Layout, *, mode: str = "blend", blend: BlendConfig | None = None,
                 max_tokens: int = 64, sampling: Sampling = Sampling(),
                 source: KVSource | None = None, keys: Sequence[str] | None = None) -> Generation:
        return Generation(self._generate(layout, mode, blend or BlendConfig(), max_tokens, sampling,
                                         source or self.memory_source(layout), keys))

    def _generate(self, layout: Layout, mode: str, blend: BlendConfig, max_tokens: int,
                  sampling: Sampling, source: KVSource, keys: Sequence[str] | None) -> Iterator[str]:
        self.prefix_kv(layout.prefix)  # computed once per model, never part of a request's TTFT
        sync(self.device)
        t0 = time.perf_counter()
        chunk_kvs = self.load_chunks(layout, mode, source, keys, blend)
        sync(self.device)
        t_loaded = time.perf_counter()
        result = self.prefill(layout, mode, chunk_kvs, blend)
        tokens: list[int] = []
        text = ""
        t_first = None
        for token in decode(self.model, result, max_tokens, sampling, self.stop_ids):
            if t_first is None:
                sync(self.device)
                t_first = time.perf_counter()
            tokens.append(token)
            if self.tokenizer is not None:
                new_text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if not new_text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    yield new_text[len(text):]
                    text = new_text
        sync(self.device)
        t_end = time.perf_counter()
        if t_first is None:  # stopped before any token: the first token was still produced
            t_first = t_end
        if self.tokenizer is not None:
            final = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if final.startswith(text) and len(final) > len(text):
                yield final[len(text):]  # a piece held back (an unfinished character) at the end
            text = final
        sel = result.selected if mode == "blend" else None
        return Answer(
            text=text, token_ids=tokens, mode=mode, ratio=sel.ratio if sel is not None else None,
            ttft_ms=(t_first - t0) * 1e3, kv_load_ms=(t_loaded - t0) * 1e3,
            prefill_ms=(t_first - t_loaded) * 1e3,
            per_token_ms=(t_end - t_first) * 1e3 / max(1, len(tokens) - 1),
            recomputed_tokens=result.recomputed_tokens, total_tokens=layout.n_tokens,
            chunk_tokens=layout.n_chunk_tokens, first_logits=result.logits.cpu(),
            cached_tokens=0 if mode == "full" else layout.suffix_start - result.recomputed_tokens,
            selection=blend.selection if sel is not None else None,
            requested_ratio=blend.ratio if sel is not None else None,
            guard_estimate=float(sel.estimate) if sel is not None and sel.estimate is not None else None)

