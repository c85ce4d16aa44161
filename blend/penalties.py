"""Repetition control over a batch of logits rows, with OpenAI's and vLLM's semantics:

- `frequency_penalty` f: logit − f · (times the token was generated so far);
- `presence_penalty` p: logit − p · (1 if the token was generated so far);
- `repetition_penalty` r (vLLM, after CTRL): a token seen in the prompt *or* the answer so far has
  its logit divided by r when positive and multiplied by r when not.

vLLM applies r first, then f and p; so does this. Neutral values (f = p = 0, r = 1) leave a row
unchanged bit for bit, so rows that ask for nothing pay nothing beyond the batch's one kernel.

The decode step calls `penalize` once per step on its [B, vocab] logits; the counts come from
`token_counts`, built on the logits' device from each row's answer tokens so far (one host→device
copy of the ids and one scatter-add per step, whatever the batch).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def token_counts(rows: Sequence[Sequence[int]], vocab: int, device: torch.device | str) -> torch.Tensor:
    """[len(rows), vocab] int32: how often each token id occurs in each row."""
    counts = torch.zeros(len(rows), vocab, dtype=torch.int32, device=device)
    lengths = [len(r) for r in rows]
    if sum(lengths):
        flat = torch.tensor([t for r in rows for t in r], dtype=torch.long, device=device)
        row = torch.repeat_interleave(torch.arange(len(rows), device=device),
                                      torch.tensor(lengths, device=device))
        counts.index_put_((row, flat), torch.ones_like(flat, dtype=torch.int32), accumulate=True)
    return counts


def penalize(logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor,
             repetition: torch.Tensor, prompt_seen: torch.Tensor | None = None) -> torch.Tensor:
    """The penalized logits (a new tensor). `logits` [B, V] float; `counts` [B, V]: each token's
    count in the row's answer so far; `frequency`, `presence`, `repetition` [B] float: the row's
    values; `prompt_seen` [B, V] bool: tokens of the row's prompt (only `repetition` reads it)."""
    counts = counts.to(logits.dtype)
    seen = counts > 0
    if prompt_seen is not None:
        seen = seen | prompt_seen
    r = repetition[:, None].to(logits.dtype)
    out = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    out = out - frequency[:, None].to(logits.dtype) * counts
    return out - presence[:, None].to(logits.dtype) * (counts > 0).to(logits.dtype)
