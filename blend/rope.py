"""RoPE's cos/sin, the check that a model's RoPE can be re-rotated exactly, and the re-rotation
of cached keys to new positions.

Rotations compose, R(a)R(b) = R(a+b), so a key cached at position p moves to p+Δ by one more
rotation by Δ: exact up to rounding. That holds for rope types whose frequencies do not depend on
the sequence length and that do not scale cos/sin (default, linear, llama3); others are refused.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

BLENDABLE_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModel(ValueError):
    """The engine cannot reuse KV for this model without changing its answers."""


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def check_blendable(model: torch.nn.Module, n_tokens: int | None = None) -> None:
    """Raise UnsupportedModel where reusing repositioned KV would silently change the answer."""
    config = model.config
    kind = rope_type(config)
    if kind not in BLENDABLE_ROPE_TYPES:
        raise UnsupportedModel(f"rope type {kind!r} depends on position or scales attention; "
                               f"KV reuse supports {', '.join(BLENDABLE_ROPE_TYPES)} (use mode 'full')")
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None:
        raise UnsupportedModel(f"{type(model).__name__} has no rotary embedding; KV reuse needs RoPE")
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise UnsupportedModel("rope attention scaling != 1 does not compose; use mode 'full'")
    window = getattr(config, "sliding_window", None)
    sliding = any(t == "sliding_attention" for t in (getattr(config, "layer_types", None) or []))
    if getattr(config, "use_sliding_window", True) is False:
        window, sliding = None, False
    if (window or sliding) and (n_tokens is None or window is None or n_tokens > window):
        raise UnsupportedModel(f"sliding-window attention (window {window}) over a {n_tokens}-token prompt "
                               "is not blendable; use mode 'full'")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, D] for integer positions (any sign), computed like transformers does (fp32)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def delta_cos_sin(inv_freq: torch.Tensor, deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, D] (fp32) of a per-token shift. The angle is formed in float64 so that the only
    rounding left is that of the cached keys themselves."""
    angle = deltas.to(torch.float64)[:, None] * inv_freq.to(deltas.device, torch.float64)[None, :]
    emb = torch.cat((angle, angle), dim=-1)
    return emb.cos().float(), emb.sin().float()


def _rotate_(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    k = keys.float()
    keys.copy_(k * cos + rotate_half(k) * sin)


@functools.cache
def _rotate_compiled() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    try:
        return torch.compile(_rotate_, dynamic=True)
    except Exception:  # no compiler available: stay eager
        return _rotate_


@functools.cache
def _log_eager_fallback() -> None:
    """Once per process; later failures fall back as well, silently."""
    log.warning("compiled key rotation failed; rotating these keys eagerly", exc_info=True)


def rotate_keys_(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place: keys [..., T, D] (any strides) rotated by per-token cos/sin [T, D]. On CUDA the
    eager form makes ~8 passes over the keys; a compiled kernel makes one. A compiled call that
    fails falls back to the eager form for that call only, so one odd input does not cost every
    later call the fast path."""
    if keys.device.type == "cuda":
        try:
            return _rotate_compiled()(keys, cos, sin)
        except Exception:
            _log_eager_fallback()
    _rotate_(keys, cos, sin)


def rerotate_keys(keys: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys [..., T, D] moved by `delta` positions (a new tensor)."""
    out = keys.clone()
    if delta:
        cos, sin = delta_cos_sin(inv_freq, torch.full((keys.shape[-2],), delta, device=keys.device))
        rotate_keys_(out, cos, sin)
    return out
