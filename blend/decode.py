"""Decoding from a prefilled cache: greedy or sampled, tokens yielded as they come."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import DynamicCache

from blend.prefill import PrefillResult
from blend.spec import Sampling


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest head of the distribution whose mass reaches top_p
        drop = sorted_p.cumsum(0) - sorted_p >= sampling.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def hf_cache(kv: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    for i in range(kv.shape[0]):
        cache.update(kv[i, 0][None], kv[i, 1][None], i)
    return cache


@torch.inference_mode()
def decode(model: torch.nn.Module, prefill: PrefillResult, max_tokens: int,
           sampling: Sampling = Sampling(), stop_ids: frozenset[int] = frozenset()) -> Iterator[int]:
    """Yield up to `max_tokens` tokens; a stop token ends the stream and is not yielded."""
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator().manual_seed(sampling.seed)
    token = pick(prefill.logits, sampling, generator)
    if max_tokens <= 0 or token in stop_ids:
        return
    yield token
    if max_tokens == 1:  # no decode cache to build (nor its cost after the first token)
        return
    device = prefill.kv.device
    cache = hf_cache(prefill.kv)
    pos = prefill.n_tokens
    for _ in range(max_tokens - 1):
        out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache,
                    position_ids=torch.tensor([[pos]], device=device), use_cache=True)
        pos += 1
        token = pick(out.logits[0, -1], sampling, generator)
        if token in stop_ids:
            return
        yield token
