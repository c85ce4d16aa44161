"""Which chunk tokens blend recomputes: a score per chunk token at the check layer, and the top
⌈r·C⌉ of it. Every selector spends the same budget; the question's tokens always flow on.

| selection | score of chunk token t                                                        |
| value     | ‖v_fresh − v_cached‖² (CacheBlend's HKVD)                                     |
| key       | ‖k_fresh − k_cached‖², keys after RoPE (LMCache)                              |
| attention | attention mass the question's queries put on t (InfoFlow-KV, ProphetKV)       |
| first     | −(offset of t in its chunk): the first tokens of every chunk (EPIC)           |
| hybrid    | attention × value deviation: how much of t's error the question reads        |
| lookahead | value deviation × the question's attention on t at the next layers, estimated |
|           | from their cached keys (blend/lookahead.py)                                   |

The first chunk sits where its KV was computed (right after the prefix), so its cached KV is
exact and recomputing it changes nothing: no selector spends budget on it while others remain.
Everything here stays on the device (no host sync), except the guard, which must decide a size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blend.spec import SELECTIONS

# The guard's ladder of ratios; past the last one it recomputes everything (= a full prefill).
GUARD_STEPS = (0.15, 0.3, 0.5)


def deviation(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance per token, summed over heads and head dims: [1, H, T, D] → [T]."""
    diff = fresh.float() - cached.float()
    return diff.square().sum(dim=(0, 1, 3))


def n_selected(ratio: float, n_chunk_tokens: int) -> int:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return min(n_chunk_tokens, math.ceil(ratio * n_chunk_tokens - 1e-9))


def select_tokens(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (ascending) of the ⌈ratio·C⌉ chunk tokens with the largest score."""
    k = n_selected(ratio, score.numel())
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    return torch.topk(score, k, sorted=False).indices.sort().values


@dataclass
class CheckLayer:
    """What the check layer computed for the active tokens (positions start, start+1, …):
    rotated queries and keys, values, and the layer's cache holding the cached chunk K/V at their
    places. Chunk tokens are active indices lo…hi-1; those after hi are the question."""
    q: torch.Tensor            # [1, Hq, T, D]
    k: torch.Tensor            # [1, Hkv, T, D]
    v: torch.Tensor            # [1, Hkv, T, D]
    cached: torch.Tensor       # [2, Hkv, N, D]
    lo: int
    hi: int
    start: int
    chunk_lengths: list[int]   # the chunks' token counts, in order (they tile lo…hi)
    scale: float               # the attention's softmax scale
    ahead: torch.Tensor | None = None  # [C] the question's attention at the next layers (lookahead)

    def value_deviation(self) -> torch.Tensor:
        s, lo, hi = self.start, self.lo, self.hi
        return deviation(self.v[:, :, lo:hi], self.cached[1][None, :, s + lo:s + hi])

    def key_deviation(self) -> torch.Tensor:
        s, lo, hi = self.start, self.lo, self.hi
        return deviation(self.k[:, :, lo:hi], self.cached[0][None, :, s + lo:s + hi])

    def question_attention(self) -> torch.Tensor:
        """[C] attention mass of every question query and head on each chunk token, under the
        causal softmax over all active keys (fresh: up to the check layer every token is exact)."""
        q = self.q[0, :, self.hi:].float()                    # [Hq, Tq, D]
        k = self.k[0].float()                                 # [Hkv, T, D]
        (hq, tq, d), (hkv, t) = q.shape, k.shape[:2]
        # GQA without repeating K: query head h reads KV head h // (Hq/Hkv), so the query heads of
        # one KV head stack into one batch row. One scaled batched matmul: [Hkv, g·Tq, T].
        scores = torch.baddbmm(k.new_zeros(()), q.reshape(hkv, (hq // hkv) * tq, d), k.transpose(1, 2),
                               beta=0.0, alpha=self.scale)
        # The only keys a question token may not see are the question tokens after it.
        tail = scores.view(hkv, hq // hkv, tq, t)[..., t - tq:]
        pos = torch.arange(tq, device=q.device)
        tail.masked_fill_(pos[None, :] > pos[:, None], float("-inf"))
        return scores.softmax(dim=-1)[..., self.lo:self.hi].sum(dim=(0, 1))

    def offsets(self) -> torch.Tensor:
        """[C] each chunk token's offset in its own chunk."""
        starts, pos = [], 0
        for n in self.chunk_lengths:
            starts.append(pos)
            pos += n
        device = self.k.device
        idx = torch.arange(self.hi - self.lo, device=device)
        # from pinned memory the copy is queued like a kernel; from pageable memory it would wait
        first = torch.tensor(starts, pin_memory=device.type == "cuda").to(device, non_blocking=True)
        return idx - first[torch.bucketize(idx, first, right=True) - 1]


def score(selection: str, check: CheckLayer) -> torch.Tensor:
    """[C] float32, larger = recompute first; the first chunk (exact already) ranks last."""
    if selection == "value":
        s = check.value_deviation()
    elif selection == "key":
        s = check.key_deviation()
    elif selection == "attention":
        s = check.question_attention()
    elif selection == "first":
        s = -check.offsets().float()
    elif selection == "hybrid":
        s = check.question_attention() * check.value_deviation()
    elif selection == "lookahead":
        if check.ahead is None:
            raise ValueError("lookahead selection needs the probed attention (CheckLayer.ahead)")
        s = check.ahead * check.value_deviation()
    else:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    exact = check.chunk_lengths[0] if len(check.chunk_lengths) > 1 else 0
    if exact:
        s = s.clone()
        s[:exact] = float("-inf")
    return s


def missed_share(check: CheckLayer, chosen: torch.Tensor) -> torch.Tensor:
    """The guard's estimate of how far a blend will be from `full`: the share of the question's
    attention-weighted value error (attention × value deviation, summed over chunk tokens) that
    the tokens left cached carry, scaled by the attention mass on the chunks. 0 when nothing is
    left out. With the lookahead probe at hand, the attention it estimates for the next layers
    stands in for the check layer's own. A 0-dim tensor on the device."""
    reads = check.ahead if check.ahead is not None else check.question_attention()
    err = reads * check.value_deviation()
    left = torch.ones_like(err, dtype=torch.bool)
    left[chosen] = False
    return (err * left).sum()


def guard_ratio(check: CheckLayer, selection: str, ratio: float, bound: float) -> tuple[float, torch.Tensor]:
    """The smallest ratio of `ratio` and then GUARD_STEPS above it whose estimate is ≤ bound; 1.0
    (everything recomputed) when none is. Returns (ratio, its estimate); syncs once per step."""
    s = score(selection, check)
    for r in (ratio, *(g for g in GUARD_STEPS if g > ratio)):
        est = missed_share(check, select_tokens(s, r))
        if float(est) <= bound:
            return r, est
    return 1.0, torch.zeros((), device=s.device)
