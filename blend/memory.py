"""How much device memory the decode slots get: what is free once the weights are loaded, less
what the rest of serving needs at its peak, times a share (the setting `kv_memory_share`).

vLLM sizes its KV cache the same way (a profiling run, then `gpu_memory_utilization` of what is
left); here the peak is estimated rather than profiled: the prefill's working memory for the
longest prompt a slot takes (its fused cache twice — a whole prefill's and a spread one's — and
one layer's activations over it), the decode graphs' outputs for every batch and key bucket, the
hot tier's byte budget, and a fixed margin for the allocator and cuBLAS workspaces.
"""
from __future__ import annotations

import torch

from blend.batch import BATCH_BUCKETS, KEY_STEP, KVSlots
from blend.forward import ModelParts
from blend.spec import CPU_KV_MB

MARGIN = 1 << 30          # allocator fragmentation, cuBLAS/cuDNN workspaces, compiled kernels
CPU_KV_BYTES = CPU_KV_MB << 20  # decode memory on CPU, where nothing is measured


def prefill_peak(parts: ModelParts, config, slot_tokens: int) -> int:
    """Bytes a prefill of a `slot_tokens` prompt holds at once, besides the weights."""
    itemsize = torch.finfo(parts.dtype).bits // 8
    hidden = parts.embed.weight.shape[1]
    inter = int(getattr(config, "intermediate_size", 4 * hidden))
    heads = int(getattr(config, "num_attention_heads", 1))
    caches = 2 * slot_tokens * KVSlots.bytes_per_token(parts)
    # one layer's activations: hidden states and residuals, q/k/v/o, the MLP's three projections
    acts = slot_tokens * (6 * hidden + heads * parts.head_dim * 2 + 3 * inter) * itemsize
    return caches + acts


def graph_outputs(vocab: int, slot_tokens: int, max_batch: int = BATCH_BUCKETS[-1]) -> int:
    """The float32 logits each captured decode graph keeps, for every batch and key bucket."""
    buckets = sum(b for b in BATCH_BUCKETS if b <= max_batch)
    return buckets * (-(-slot_tokens // KEY_STEP)) * vocab * 4


def decode_kv_bytes(parts: ModelParts, config, slot_tokens: int, share: float, reserved: int = 0) -> int:
    """Decode KV memory: on CUDA, `share` of the free device memory (measured now, after the
    weights) less the prefill's peak, the graphs' outputs, `reserved` bytes (the hot tier's
    budget) and a margin; on CPU, CPU_KV_BYTES."""
    if not 0 < share <= 1:
        raise ValueError(f"the memory share must be in (0, 1], got {share}")
    if parts.device.type != "cuda":
        return CPU_KV_BYTES
    free, _ = torch.cuda.mem_get_info(parts.device)
    need = prefill_peak(parts, config, slot_tokens) + graph_outputs(int(config.vocab_size), slot_tokens)
    return max(0, int((free - need - reserved - MARGIN) * share))
