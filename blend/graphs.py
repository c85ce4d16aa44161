"""CUDA graphs for the layers where few tokens flow (after CacheBlend's check layer, or every
layer in `reuse`): there, transformers-style eager execution is bound by kernel launches, not
arithmetic. The bench's "eager" rows measure it (docs/results/gpu/mistral-7b.bench.md, H100):
`reuse` of mistral-7b takes 41.6 ms without graphs against 12.5 ms with them.

One graph per (span of layers, token bucket, key bucket): all the layers after the first in
one, or one per layer where each must wait for its cached KV to arrive. Inputs are padded to the bucket: padded
rows write their K/V into a trash slot past the keys any query can see, and attend only to
position 0, so they cannot touch real tokens. The fused KV cache lives in one static buffer that
every graph reads and writes; requests are served one at a time by the engine's worker.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from blend.forward import ModelParts, attend_and_mlp, causal_mask, project_qkv, rope_for
from blend.rope import rotate_keys_

# Padding wastes compute in proportion: buckets every 16 tokens up to 1024, every 64 above
# (captured lazily, on first use; a workload of similar prompts uses a handful).
TOKEN_BUCKETS = tuple(range(16, 1024 + 1, 16)) + tuple(range(1088, 2048 + 1, 64))
KEY_BUCKET = 128


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= n), None)


class LayerGraphs:
    def __init__(self, parts: ModelParts, max_tokens: int):
        self.parts = parts
        self.max_keys = _round_up(max_tokens, KEY_BUCKET)
        # +1: the trash slot that padded rows write to.
        self.kv = torch.zeros(parts.n_layers, 2, parts.n_kv_heads, self.max_keys + 1, parts.head_dim,
                              dtype=parts.dtype, device=parts.device)
        self.pool = torch.cuda.graph_pool_handle()
        # Static inputs per (token bucket, key bucket), shared by the graphs of those buckets, so
        # that a chain of one-layer graphs hands the hidden state on in place.
        self.io: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.graphs: dict[tuple[int, int, int, int, bool], torch.cuda.CUDAGraph] = {}

    def buffer(self, n_tokens: int) -> torch.Tensor:
        if n_tokens > self.max_keys:
            raise ValueError(f"prompt of {n_tokens} tokens exceeds the graph buffer of {self.max_keys}")
        return self.kv[:, :, :, :n_tokens]

    def covers(self, n_active: int) -> bool:
        return _bucket(n_active, TOKEN_BUCKETS) is not None

    def _inputs(self, a: int, nk: int) -> dict[str, torch.Tensor]:
        if (a, nk) not in self.io:
            p = self.parts
            hidden = p.embed.weight.shape[1]
            self.io[a, nk] = {"h": torch.zeros(1, a, hidden, dtype=p.dtype, device=p.device),
                              "qpos": torch.zeros(a, dtype=torch.long, device=p.device),
                              "wpos": torch.full((a,), self.max_keys, dtype=torch.long, device=p.device)}
        return self.io[a, nk]

    def _capture(self, first: int, last: int, a: int, nk: int, rotate: bool) -> torch.cuda.CUDAGraph:
        p = self.parts
        io = self._inputs(a, nk)
        if rotate and "rcos" not in io:
            io["rcos"] = torch.ones(nk, p.head_dim, dtype=torch.float32, device=p.device)
            io["rsin"] = torch.zeros(nk, p.head_dim, dtype=torch.float32, device=p.device)

        def body() -> None:
            cos, sin = rope_for(p, io["qpos"])
            mask = causal_mask(io["qpos"], nk)
            h = io["h"]
            for i in range(first, last):
                layer = p.layers[i]
                if rotate:  # move the cached keys to their places (identity elsewhere)
                    rotate_keys_(self.kv[i, 0, :, :nk], io["rcos"], io["rsin"])
                q, k, v = project_qkv(layer, h, cos, sin, p.head_dim)
                self.kv[i, 0].index_copy_(1, io["wpos"], k[0])
                self.kv[i, 1].index_copy_(1, io["wpos"], v[0])
                h = attend_and_mlp(layer, h, q, self.kv[i, 0, :, :nk][None], self.kv[i, 1, :, :nk][None], mask)
            io["h"].copy_(h)

        # Warm up on a side stream (allocator and cuBLAS workspaces), then capture. The warm-up
        # writes K/V only to the trash slot (and rotates nothing), and the inputs are restored.
        saved = {name: t.clone() for name, t in io.items()}
        io["wpos"].fill_(self.max_keys)
        if rotate:
            io["rcos"].fill_(1.0)
            io["rsin"].zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
            body()
        for name, t in saved.items():
            io[name].copy_(t)
        return graph

    @torch.inference_mode()
    def run(self, first: int, h: torch.Tensor, positions: torch.Tensor, n_tokens: int,
            before_layer: Callable[[int], None] | None = None,
            rotation: tuple[torch.Tensor, torch.Tensor] | None = None, last: int | None = None) -> torch.Tensor:
        """Layers `first`…`last`-1 (default: to the top) for the tokens at `positions` (ascending, < n_tokens); K/V go to self.kv.
        One graph for them all, or with `before_layer` one graph per layer, that hook being
        called before each (it may make the stream wait for that layer's cache to be filled).
        With `rotation` (cos/sin [n_tokens, D]), each graph first rotates its layer's cached keys
        by it. Missing graphs are captured before any hook runs: capturing synchronizes."""
        n = positions.numel()
        a = _bucket(n, TOKEN_BUCKETS)
        nk = _round_up(n_tokens, KEY_BUCKET)
        io = self._inputs(a, nk)
        io["h"][:, :n].copy_(h)
        io["h"][:, n:].zero_()
        io["qpos"][:n].copy_(positions)
        io["qpos"][n:].zero_()
        io["wpos"][:n].copy_(positions)
        io["wpos"][n:].fill_(self.max_keys)
        L = self.parts.n_layers if last is None else last
        spans = [(first, L)] if before_layer is None else [(i, i + 1) for i in range(first, L)]
        rotate = rotation is not None
        for key in [(lo, hi, a, nk, rotate) for lo, hi in spans]:
            if key not in self.graphs:
                self.graphs[key] = self._capture(*key)
        if rotate:
            io["rcos"][:n_tokens].copy_(rotation[0])
            io["rsin"][:n_tokens].copy_(rotation[1])
        for lo, hi in spans:
            if before_layer is not None:
                before_layer(lo)
            self.graphs[lo, hi, a, nk, rotate].replay()
        return io["h"][:, :n]
