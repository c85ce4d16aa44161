"""Decoding many sequences at once over preallocated KV memory.

KVSlots is one buffer [L, 2, slots, H_kv, T, D] allocated up front: a sequence takes a free slot
when it is admitted (its prefill KV copied in once), writes one position per decode step, and
gives the slot back when it ends. Nothing grows or is concatenated while decoding, and the bound
on memory is the buffer's size.

A decode step runs every slot from 0 to the highest slot in use (new sequences take the lowest
free slot, so the batch stays dense); free slots in between ride along masked, writing to their
own position 0, which a later prefill overwrites. Ragged lengths attend through a per-row mask.
On CUDA the step replays a graph captured per (batch bucket, key bucket): at a few tokens per
layer the eager step is bound by kernel launches, not by arithmetic or memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from blend.forward import ModelParts, attend_and_mlp, project_qkv, rope_for

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KEY_STEP = 256  # key-length buckets: attention reads this many more keys at most


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= n)


class KVSlots:
    """`slots` sequences of at most `max_tokens` tokens each (prompt + answer)."""

    def __init__(self, parts: ModelParts, slots: int, max_tokens: int):
        if slots < 1 or max_tokens < 1:
            raise ValueError("KVSlots needs at least one slot of at least one token")
        self.parts, self.n_slots = parts, slots
        self.max_tokens = -(-max_tokens // KEY_STEP) * KEY_STEP
        self.kv = torch.zeros(parts.n_layers, 2, slots, parts.n_kv_heads, self.max_tokens, parts.head_dim,
                              dtype=parts.dtype, device=parts.device)
        self.lengths = [0] * slots        # tokens held per slot (0: free)
        self._free = list(range(slots))   # kept sorted: the lowest free slot is taken first

    @staticmethod
    def bytes_per_token(parts: ModelParts) -> int:
        return 2 * parts.n_layers * parts.n_kv_heads * parts.head_dim * torch.finfo(parts.dtype).bits // 8

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def high(self) -> int:
        """One past the highest slot in use (the rows a decode step runs)."""
        busy = [i for i, n in enumerate(self.lengths) if n]
        return busy[-1] + 1 if busy else 0

    def take(self, kv: torch.Tensor) -> int:
        """A free slot holding the prefill cache `kv` [L, 2, H, N, D]; raises when none is free."""
        n = kv.shape[3]
        if n >= self.max_tokens:
            raise ValueError(f"a {n}-token prompt does not fit a {self.max_tokens}-token slot")
        slot = self._free.pop(0)
        self.kv[:, :, slot, :, :n].copy_(kv)
        self.lengths[slot] = n
        return slot

    def release(self, slot: int) -> None:
        if self.lengths[slot]:
            self.lengths[slot] = 0
            self._free.append(slot)
            self._free.sort()


@dataclass
class _StepIO:
    """Static inputs and outputs of one (batch, key) bucket: what a captured graph reads/writes."""
    tokens: torch.Tensor      # [B] long
    positions: torch.Tensor   # [B] long: where each row's new token goes
    logits: torch.Tensor | None = None  # [B, vocab] float32, written by the step


def decode_step(parts: ModelParts, slots: KVSlots, io: _StepIO, n_keys: int) -> torch.Tensor:
    """One token for rows 0…B-1 (slot b = row b): its K/V written at its position in its slot,
    attention over the slot's first `n_keys` positions up to its own. Returns [B, vocab] float32."""
    b = io.tokens.numel()
    rows = torch.arange(b, device=io.tokens.device)
    cos, sin = rope_for(parts, io.positions)
    cos, sin = cos[:, None, None, :], sin[:, None, None, :]  # [B, 1, 1, D]: one position per row
    mask = (torch.arange(n_keys, device=io.tokens.device)[None, :] <= io.positions[:, None])[:, None, None, :]
    h = parts.embed(io.tokens)[:, None, :]                   # [B, 1, hidden]
    for i, layer in enumerate(parts.layers):
        q, k, v = project_qkv(layer, h, cos, sin, parts.head_dim)
        keys, values = slots.kv[i, 0], slots.kv[i, 1]        # [S, H, T, D]
        keys[rows, :, io.positions] = k[:, :, 0]
        values[rows, :, io.positions] = v[:, :, 0]
        h = attend_and_mlp(layer, h, q, keys[:b, :, :n_keys], values[:b, :, :n_keys], mask)
    return parts.lm_head(parts.norm(h[:, -1])).float()


class DecodeBatch:
    """Steps every live slot of a KVSlots by one token. `graphs`: replay a CUDA graph per
    (batch bucket, key bucket) instead of the eager step."""

    def __init__(self, parts: ModelParts, slots: KVSlots, graphs: bool | None = None):
        self.parts, self.slots = parts, slots
        self.graphs = parts.device.type == "cuda" if graphs is None else graphs
        self._io: dict[tuple[int, int], _StepIO] = {}
        self._graph: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    @torch.inference_mode()
    def step(self, tokens: dict[int, int]) -> torch.Tensor:
        """`tokens`: slot → the token it feeds in (at position slots.lengths[slot]). Returns the
        logits [high, vocab] of every row up to the highest live slot (free rows are garbage), and
        advances each fed slot's length."""
        slots = self.slots
        b = slots.high
        if b == 0:
            raise ValueError("no sequence to decode")
        live = {s for s in range(b) if slots.lengths[s]}
        if set(tokens) != live:  # a live row left out would write its K/V over position 0
            raise ValueError(f"a step feeds every live slot: {sorted(live)}, got {sorted(tokens)}")
        for s in tokens:
            if slots.lengths[s] >= slots.max_tokens:
                raise ValueError(f"slot {s} is full ({slots.max_tokens} tokens)")
        bb = _bucket(b, BATCH_BUCKETS) if self.graphs else b
        bb = min(bb, slots.n_slots)
        n_keys = min(slots.max_tokens, -(-(max(slots.lengths[:b]) + 1) // KEY_STEP) * KEY_STEP)
        tok = [0] * bb
        pos = [0] * bb
        for s, t in tokens.items():
            tok[s], pos[s] = t, slots.lengths[s]
        device = self.parts.device
        pin = device.type == "cuda"
        host = torch.tensor([tok, pos], dtype=torch.long, pin_memory=pin)
        if self.graphs:
            graph = self._graph_for(bb, n_keys)  # capturing overwrites the inputs: first
            io = self._inputs(bb, n_keys)
            io.tokens.copy_(host[0], non_blocking=True)
            io.positions.copy_(host[1], non_blocking=True)
            graph.replay()
            logits = io.logits
        else:
            dev = host.to(device)
            logits = decode_step(self.parts, slots, _StepIO(dev[0], dev[1]), n_keys)
        for s in tokens:
            slots.lengths[s] += 1
        return logits[:b]

    def warm(self, max_batch: int, n_tokens: int | None = None) -> int:
        """Capture the graphs of every batch bucket up to `max_batch` now, rather than in the
        middle of serving (a capture stalls every row): for sequences of about `n_tokens` tokens,
        or (None) for every key length a slot can reach. Returns the graphs captured."""
        if not self.graphs:
            return 0
        top = self.slots.max_tokens
        keys = range(KEY_STEP, top + 1, KEY_STEP) if n_tokens is None else \
            [min(top, -(-(n_tokens + 1) // KEY_STEP) * KEY_STEP)]
        before = len(self._graph)
        n = self.slots.n_slots
        limit = min(max_batch, n)
        sizes = sorted({min(bb, n) for bb in BATCH_BUCKETS if bb < limit} | {min(_bucket(limit, BATCH_BUCKETS), n)})
        for n_keys in keys:
            for bb in sizes:
                self._graph_for(bb, n_keys)
        return len(self._graph) - before

    def _inputs(self, bb: int, n_keys: int) -> _StepIO:
        if (bb, n_keys) not in self._io:
            d = self.parts.device
            self._io[bb, n_keys] = _StepIO(torch.zeros(bb, dtype=torch.long, device=d),
                                           torch.zeros(bb, dtype=torch.long, device=d))
        return self._io[bb, n_keys]

    def _graph_for(self, bb: int, n_keys: int) -> torch.cuda.CUDAGraph:
        key = (bb, n_keys)
        if key in self._graph:
            return self._graph[key]
        io = self._inputs(bb, n_keys)
        # Warm-up and capture write K/V only at position 0 of rows whose inputs are zero; a live
        # slot's position 0 is restored after (its prompt's first token never changes).
        saved = self.slots.kv[:, :, :bb, :, 0].clone()
        io.tokens.zero_()
        io.positions.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                decode_step(self.parts, self.slots, io, n_keys)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
            io.logits = decode_step(self.parts, self.slots, io, n_keys)
        self.slots.kv[:, :, :bb, :, 0].copy_(saved)
        self._graph[key] = graph
        return graph
