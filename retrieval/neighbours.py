"""Each chunk's nearest other chunks of the corpus, by the cosine similarity of their embeddings:
the context neighbour-aware chunk KV is computed behind (store/neighbours.py). Exact and blockwise
(a full build over N chunks costs N² dot products, in blocks that bound memory; an upload's k new
chunks, k × N)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_BLOCK = 2048  # rows per block: a block's similarities are 2048 × N float64


def nearest(embeddings: np.ndarray, n: int, keys: Sequence[str] | None = None,
            rows: Sequence[int] | None = None) -> list[list[int]]:
    """For every row, the indices of the `n` most similar other rows, most similar first. Rows
    with the same key as the row (the same chunk text indexed twice) are never its neighbours,
    nor are two rows of one key both neighbours of a third. `embeddings` are normalized.
    `rows`: only those rows' neighbours (still among all rows), in that order — what an upload
    needs for its new chunks, at len(rows) × N dot products instead of N²; each row's answer is
    the one it gets without `rows`."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be [N, d], got shape {emb.shape}")
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    N = len(emb)
    keys = list(keys) if keys is not None else [str(i) for i in range(N)]
    if len(keys) != N:
        raise ValueError(f"{len(keys)} keys for {N} embeddings")
    wanted = np.arange(N) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(wanted) and not (0 <= wanted.min() and wanted.max() < N):
        raise IndexError(f"rows must be in [0, {N}), got {wanted.min()}…{wanted.max()}")
    out: list[list[int]] = []
    if n == 0 or N < 2:
        return [[] for _ in wanted]
    # In float64 (float32 products are exact there, the sums' rounding is ~1e-16) and rounded back
    # to float32: a row's similarities are then the same bits whichever rows it is computed with
    # (a float32 BLAS call's blocking and kernel depend on the batch's shape, and a 1-ulp change
    # can reorder a tie), so an upload's few rows pick the neighbours a full build picks
    emb64 = emb.astype(np.float64)
    for lo in range(0, len(wanted), _BLOCK):
        block = wanted[lo:lo + _BLOCK]
        sims = (emb64[block] @ emb64.T).astype(np.float32)
        for i, row in zip(block.tolist(), sims):
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
