"""Each chunk's nearest other chunks of the corpus, by the cosine similarity of their embeddings:
the context neighbour-aware chunk KV is computed behind (store/neighbours.py). Exact and blockwise
(a corpus of N chunks costs N² dot products, in blocks that bound memory)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_BLOCK = 4096


def nearest(embeddings: np.ndarray, n: int, keys: Sequence[str] | None = None) -> list[list[int]]:
    """For every row, the indices of the `n` most similar other rows, most similar first. Rows
    with the same key as the row (the same chunk text indexed twice) are never its neighbours,
    nor are two rows of one key both neighbours of a third. `embeddings` are normalized."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be [N, d], got shape {emb.shape}")
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    N = len(emb)
    keys = list(keys) if keys is not None else [str(i) for i in range(N)]
    if len(keys) != N:
        raise ValueError(f"{len(keys)} keys for {N} embeddings")
    out: list[list[int]] = []
    if n == 0 or N < 2:
        return [[] for _ in range(N)]
    for lo in range(0, N, _BLOCK):
        sims = emb[lo:lo + _BLOCK] @ emb.T
        for r, row in enumerate(sims):
            i = lo + r
            picked = _pick(row, keys, i, n, min(N, 4 * n + 4))
            if len(picked) < n and len(set(keys)) > len(picked) + 1:  # many duplicates: every row
                picked = _pick(row, keys, i, n, N)
            out.append(picked)
    return out


def _pick(row: np.ndarray, keys: list[str], i: int, n: int, k: int) -> list[int]:
    """The n best of the k most similar rows (ties by index), skipping row i's key and repeats."""
    cand = np.argpartition(-row, k - 1)[:k] if k < len(row) else np.arange(len(row))
    cand = sorted((int(j) for j in cand), key=lambda j: (-row[j], j))
    picked: list[int] = []
    seen = {keys[i]}
    for j in cand:
        if keys[j] not in seen:
            seen.add(keys[j])
            picked.append(j)
            if len(picked) == n:
                break
    return picked
