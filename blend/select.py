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
| question  | the question's attention on t at the last layers, from a `reuse` pass over the |
|           | stale KV (InfoFlow-KV, blend/question.py)                                      |
| question- | that attention × value deviation: lookahead's product with the attention the   |
| value     | question really pays at the last layers in place of the probe's estimate       |

With several check layers (gradual filtering), the first keeps a wider set and each later one
keeps the best of the tokens still flowing, rescored where the score can be taken afresh there
(value and key deviation; lookahead's deviation factor); `gradual_counts` sizes the sets.

The first chunk sits where its KV was computed (right after the prefix), so its cached KV is
exact and recomputing it changes nothing: no selector spends budget on it while others remain.
Everything here stays on the device (no host sync).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blend.spec import GRADUAL_WIDEN, SELECTIONS


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
    return top_tokens(score, n_selected(ratio, score.numel()))


def top_tokens(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the k largest scores."""
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    if k >= score.numel():
        return torch.arange(score.numel(), device=score.device)
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
    asked: torch.Tensor | None = None  # [C] the question pass's score (question selection)

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
    elif selection in ("question", "question-value"):
        if check.asked is None:
            raise ValueError(f"{selection} selection needs the question pass's scores (CheckLayer.asked)")
        s = check.asked if selection == "question" else check.asked * check.value_deviation()
    else:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    exact = check.chunk_lengths[0] if len(check.chunk_lengths) > 1 else 0
    if exact:
        s = s.clone()
        s[:exact] = float("-inf")
    return s


def gradual_counts(n_chunk_tokens: int, ratio: float, check_layers: tuple[int, ...], n_layers: int,
                   widen: float = GRADUAL_WIDEN) -> list[int]:
    """How many chunk tokens flow on from each check layer, non-increasing, such that the chunk
    tokens' attention and MLP computed from the first check layer on are exactly those of a single
    check there at `ratio`: n·(L−c₁) token-layers, n = ⌈ratio·C⌉. (A later check layer still
    projects Q/K/V for the wider set it narrows.) The first keeps up to `widen`·n, the middle ones
    step down linearly towards n, the last takes what is left. Where the layer spans admit no exact
    split at that width, the widening shrinks until one does (at none: n at every check)."""
    n = n_selected(ratio, n_chunk_tokens)
    checks = list(check_layers)
    ends = checks[1:] + [n_layers]
    spans = [b - a for a, b in zip(checks, ends)]
    budget = n * (n_layers - checks[0])
    m = len(checks)
    if m == 1 or spans[-1] <= 0:
        return [n] * m
    for first in range(min(n_chunk_tokens, math.ceil(widen * n)), n - 1, -1):
        counts = [round(first + (n - first) * j / (m - 1)) for j in range(m - 1)]
        rest = budget - sum(c * s for c, s in zip(counts, spans))
        if rest >= 0 and rest % spans[-1] == 0 and rest // spans[-1] <= counts[-1]:
            return counts + [rest // spans[-1]]
    return [n] * m


def narrow(selection: str, first: CheckLayer, first_score: torch.Tensor, idx: torch.Tensor,
           fresh_k: torch.Tensor, fresh_v: torch.Tensor, cached: torch.Tensor, positions: torch.Tensor,
           keep: int) -> torch.Tensor:
    """At a later check layer: indices into the flowing chunk tokens (chunk indices `idx`, ascending,
    at `positions`; fresh K/V [1, H, n, D] of this layer; `cached` its [2, H, N, D] cache) of the
    `keep` to carry on, ascending. Value and key deviation are measured afresh at this layer, and
    the deviation factor of lookahead and question-value (their attention factor stays); the other
    selections keep their first check's ranking."""
    if selection == "value":
        s = deviation(fresh_v, cached[1][None, :, positions])
    elif selection == "key":
        s = deviation(fresh_k, cached[0][None, :, positions])
    elif selection == "lookahead":
        s = deviation(fresh_v, cached[1][None, :, positions]) * first.ahead[idx]
    elif selection == "question-value":
        s = deviation(fresh_v, cached[1][None, :, positions]) * first.asked[idx]
    else:
        s = first_score[idx]
    exact = first.chunk_lengths[0] if len(first.chunk_lengths) > 1 else 0
    if exact:
        s = s.masked_fill(idx < exact, float("-inf"))
    return top_tokens(s, keep)
