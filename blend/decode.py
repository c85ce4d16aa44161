"""Decoding one prefilled prompt on its own: the batched decode step (blend/batch.py) with one
slot, so that a request decoded alone and one decoded in a batch run the same code."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from blend.batch import DecodeBatch, KVSlots
from blend.forward import model_parts
from blend.prefill import PrefillResult
from blend.sequence import pick
from blend.spec import Sampling


@torch.inference_mode()
def decode(model: torch.nn.Module, prefill: PrefillResult, max_tokens: int,
           sampling: Sampling = Sampling(), stop_ids: frozenset[int] = frozenset(),
           graphs: bool = False) -> Iterator[int]:
    """Yield up to `max_tokens` tokens; a stop token ends the stream and is not yielded."""
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    token = pick(prefill.logits, sampling, generator)
    if max_tokens <= 0 or token in stop_ids:
        return
    yield token
    if max_tokens == 1:  # no decode memory to set up (nor its cost after the first token)
        return
    parts = model_parts(model)
    batch = DecodeBatch(parts, KVSlots(parts, 1, prefill.n_tokens + max_tokens), graphs=graphs)
    slot = batch.slots.take(prefill.kv)
    for _ in range(max_tokens - 1):
        token = pick(batch.step({slot: token})[slot], sampling, generator)
        if token in stop_ids:
            return
        yield token
