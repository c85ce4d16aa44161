"""The formats chunk KV is stored in, and their exact byte sizes.

A format turns one chunk's KV [L, 2, H, T, D] into L rows of bytes (one per layer, each covered
by its own CRC32 in the entry header) and back. The float formats are the tensor's own bytes,
as in format version 1; the quantized ones keep their scales beside the values in the same row:

| format | bytes per element | layer row | error bound, per element |
|---|---|---|---|
| float32 | 4 | the tensor | 0 (from a float32 model) |
| bfloat16 | 2 | the tensor | ≤ 2⁻⁸·\\|x\\| |
| float16 | 2 | the tensor | ≤ 2⁻¹¹·\\|x\\| + 2⁻²⁵ (\\|x\\| ≤ 65504, clamped above) |
| fp8 (e4m3) | 1 | scales [2, H] f32, then k and v as e4m3 of x/s | ≤ 2⁻⁴·\\|x\\| + 2⁻¹⁰·s, s = amax/448 per (layer, k or v, head) |
| int8 | 1 | key scale and offset [H, D] f32, value scale [H, T] f32, then k as uint8, v as int8 | keys ≤ s/2, s = (max − min)/255 per (layer, head, channel) over the chunk's tokens; values ≤ s/2, s = amax/127 per (layer, head, token) |

int8 is KIVI's split: keys have a few large channels (so one scale per channel, asymmetric
since a channel's keys need not centre on zero), values are spread per token (one scale per
token). Dequantization runs wherever the row is: on the GPU after the host→device copy of the
quantized bytes, or on the CPU. Quantizing is deterministic, so a chunk recomputed and
written back decodes to the very same tensor as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_ALIGN = 16  # every array inside a quantized row starts 16-byte aligned (views, vector loads)
FP8_MAX = 448.0


def _up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class KVFormat:
    name: str
    code: int             # the header's format byte
    storage: torch.dtype  # the element type of the stored values
    quantized: bool

    @property
    def natural_dtype(self) -> torch.dtype:
        """What the entry decodes to when nobody asks for a dtype."""
        return torch.float32 if self.quantized else self.storage

    # -- sizes ------------------------------------------------------------------------------
    # A layer row holds one or more chunks side by side (`lengths`: each one's tokens). A stored
    # entry is one chunk; a request's streamed layer is its chunks packed into one row, so that
    # one host→device copy and one decode call serve the whole layer, whatever the chunk count.
    # With one chunk the two layouts are the same bytes.
    def _offsets(self, H: int, D: int, lengths: tuple[int, ...]) -> dict[str, int]:
        n, S = len(lengths), sum(lengths)
        if self.name == "int8":
            o = {"ks": 0, "kz": _up(4 * n * H * D), "vs": 2 * _up(4 * n * H * D)}
            o["q"] = o["vs"] + _up(4 * H * S)
        else:  # fp8
            o = {"s": 0, "q": _up(4 * 2 * n * H)}
        o["end"] = _up(o["q"] + 2 * H * S * D)
        return o

    def layer_nbytes(self, H: int, T: int, D: int) -> int:
        return self.packed_nbytes(H, D, (T,))

    def packed_nbytes(self, H: int, D: int, lengths: tuple[int, ...]) -> int:
        if not self.quantized:
            return 2 * H * sum(lengths) * D * self.storage.itemsize
        return self._offsets(H, D, tuple(lengths))["end"]

    def pack(self, src: np.ndarray, H: int, D: int, lengths: tuple[int, ...], j: int, dst: np.ndarray) -> None:
        """Place chunk j's stored layer row `src` (uint8) into the packed row `dst` (uint8, of
        packed_nbytes) of chunks `lengths`. Host-side, on the reader's threads; numpy's strided
        copies release the GIL."""
        lengths = tuple(lengths)
        T, S, at = lengths[j], sum(lengths), sum(lengths[:j])
        if not self.quantized:
            b = D * self.storage.itemsize
            dst.reshape(2 * H, S, b)[:, at:at + T] = src.reshape(2 * H, T, b)
            return
        so, do = self._offsets(H, D, (T,)), self._offsets(H, D, lengths)
        if self.name == "fp8":
            dst[do["s"] + 8 * H * j:do["s"] + 8 * H * (j + 1)] = src[so["s"]:so["s"] + 8 * H]
            dst[do["q"]:do["q"] + 2 * H * S * D].reshape(2 * H, S, D)[:, at:at + T] = \
                src[so["q"]:so["q"] + 2 * H * T * D].reshape(2 * H, T, D)
            return
        for name in ("ks", "kz"):
            dst[do[name] + 4 * H * D * j:do[name] + 4 * H * D * (j + 1)] = src[so[name]:so[name] + 4 * H * D]
        dst[do["vs"]:do["vs"] + 4 * H * S].reshape(H, 4 * S)[:, 4 * at:4 * (at + T)] = \
            src[so["vs"]:so["vs"] + 4 * H * T].reshape(H, 4 * T)
        m, M = H * T * D, H * S * D
        for part in (0, 1):  # keys, then values
            dst[do["q"] + part * M:do["q"] + (part + 1) * M].reshape(H, S, D)[:, at:at + T] = \
                src[so["q"] + part * m:so["q"] + (part + 1) * m].reshape(H, T, D)

    # -- encode / decode ----------------------------------------------------------------------
    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        """[L, 2, H, T, D] → uint8 [L, layer_nbytes] on kv's device."""
        L, _, H, T, D = kv.shape
        if not self.quantized:
            x = kv
            if self.storage == torch.float16 and kv.dtype != torch.float16:
                x = kv.float().clamp(-65504.0, 65504.0)
            return x.to(self.storage).contiguous().view(torch.uint8).reshape(L, -1)
        o = self._offsets(H, D, (T,))
        raw = torch.zeros(L, o["end"], dtype=torch.uint8, device=kv.device)
        if T == 0:
            return raw
        x = kv.float()
        if self.name == "fp8":
            s = x.abs().amax(dim=(3, 4)) / FP8_MAX  # [L, 2, H]
            s = torch.where(s > 0, s, torch.ones_like(s))
            q = (x / s[..., None, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            raw[:, o["s"]:o["s"] + 8 * H] = s.reshape(L, -1).view(torch.uint8)
            raw[:, o["q"]:o["q"] + 2 * H * T * D] = q.reshape(L, -1).view(torch.uint8)
            return raw
        k, v = x[:, 0], x[:, 1]                       # [L, H, T, D]
        kmin, kmax = k.amin(dim=2), k.amax(dim=2)     # [L, H, D]
        ks = (kmax - kmin) / 255.0
        ks = torch.where(ks > 0, ks, torch.ones_like(ks))
        kq = torch.round((k - kmin[:, :, None]) / ks[:, :, None]).clamp(0, 255).to(torch.uint8)
        vs = v.abs().amax(dim=3) / 127.0              # [L, H, T]
        vs = torch.where(vs > 0, vs, torch.ones_like(vs))
        vq = torch.round(v / vs[..., None]).clamp(-127, 127).to(torch.int8)
        raw[:, o["ks"]:o["ks"] + 4 * H * D] = ks.reshape(L, -1).view(torch.uint8)
        raw[:, o["kz"]:o["kz"] + 4 * H * D] = kmin.reshape(L, -1).view(torch.uint8)
        raw[:, o["vs"]:o["vs"] + 4 * H * T] = vs.reshape(L, -1).view(torch.uint8)
        n = H * T * D
        raw[:, o["q"]:o["q"] + n] = kq.reshape(L, -1)
        raw[:, o["q"] + n:o["q"] + 2 * n] = vq.reshape(L, -1).view(torch.uint8)
        return raw

    def decode(self, raw: torch.Tensor, H: int, T: int, D: int, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [n, layer_nbytes] (rows contiguous) → [n, 2, H, T, D] in `dtype` on raw's device;
        written into `out` (any [n, 2, H, T, D] view) when given."""
        return self.decode_packed(raw, H, D, (T,), dtype, out)

    def decode_packed(self, raw: torch.Tensor, H: int, D: int, lengths: tuple[int, ...], dtype: torch.dtype,
                      out: torch.Tensor | None = None, chunk_of: torch.Tensor | None = None) -> torch.Tensor:
        """Packed rows uint8 [n, packed_nbytes] of chunks `lengths` → [n, 2, H, ΣT, D] in `dtype`
        on raw's device (into `out` when given). A handful of kernels per call, however many
        chunks. `chunk_of` ([ΣT] long on raw's device: each token's chunk) may be passed in when
        the same layout decodes many times. Every element is `q·s + z` (int8 keys) or `q·s`,
        computed as separate multiply and add, so it rounds the same whichever layout or device
        path produced it: a chunk decodes to the same bits alone or packed with others."""
        lengths = tuple(lengths)
        n, S = raw.shape[0], sum(lengths)
        want = self.packed_nbytes(H, D, lengths)
        if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != want:
            raise ValueError(f"raw rows must be uint8 [n, {want}], got {raw.dtype} {tuple(raw.shape)}")
        if not self.quantized:
            x = raw.contiguous().view(self.storage).view(n, 2, H, S, D)
            if out is None:
                return x if dtype == self.storage else x.to(dtype)
            return out.copy_(x)
        if out is None:
            out = torch.empty((n, 2, H, S, D), dtype=dtype, device=raw.device)
        if S == 0 or n == 0:
            return out
        raw = raw.contiguous()
        o, c = self._offsets(H, D, lengths), len(lengths)
        f32 = lambda a, b, *shape: raw[:, a:b].view(torch.float32).view(n, *shape)  # noqa: E731
        if chunk_of is None and c > 1:
            chunk_of = torch.repeat_interleave(torch.arange(c), torch.tensor(lengths)).to(raw.device)
        if self.name == "fp8":
            s = f32(o["s"], o["s"] + 8 * c * H, c, 2, H)
            q = raw[:, o["q"]:o["q"] + 2 * H * S * D].view(torch.float8_e4m3fn).view(n, 2, H, S, D)
            s = s[:, 0] if c == 1 else s.index_select(1, chunk_of).permute(0, 2, 3, 1)  # [n, 2, H, (S)]
            out.copy_(q.float().mul_(s[..., None] if c > 1 else s[..., None, None]))
            return out
        ks = f32(o["ks"], o["ks"] + 4 * c * H * D, c, H, D)
        kz = f32(o["kz"], o["kz"] + 4 * c * H * D, c, H, D)
        vs = f32(o["vs"], o["vs"] + 4 * H * S, H, S)
        m = H * S * D
        kq = raw[:, o["q"]:o["q"] + m].view(n, H, S, D)
        vq = raw[:, o["q"] + m:o["q"] + 2 * m].view(torch.int8).view(n, H, S, D)
        # per-chunk scales → per token: a broadcast for one chunk, a gather for several
        if c == 1:
            ks_t, kz_t = ks[:, 0, :, None], kz[:, 0, :, None]                                  # [n, H, 1, D]
        else:
            ks_t, kz_t = (x.index_select(1, chunk_of).movedim(1, 2) for x in (ks, kz))          # [n, H, S, D]
        out[:, 0].copy_(kq.float().mul_(ks_t).add_(kz_t))
        out[:, 1].copy_(vq.float().mul_(vs[..., None]))
        return out

    def roundtrip(self, kv: torch.Tensor) -> torch.Tensor:
        """What a store in this format hands back for `kv`, without the bytes leaving the device."""
        if not self.quantized and kv.dtype == self.storage:
            return kv
        _, _, H, T, D = kv.shape
        return self.decode(self.encode(kv), H, T, D, kv.dtype)

    def error_bound(self, kv: torch.Tensor) -> torch.Tensor:
        """The bound on |decode(encode(kv)) − kv| this format guarantees, element by element (in
        exact arithmetic; float32 rounding of the scale arithmetic adds ~1e-7 relative)."""
        x = kv.float()
        if self.name == "float32":
            return torch.zeros_like(x)
        if self.name == "bfloat16":
            return x.abs() * 2.0 ** -8
        if self.name == "float16":
            return x.abs() * 2.0 ** -11 + 2.0 ** -25
        if self.name == "fp8":
            s = (x.abs().amax(dim=(3, 4), keepdim=True) / FP8_MAX)
            return x.abs() * 2.0 ** -4 + s * 2.0 ** -10
        k, v = x[:, 0], x[:, 1]
        ks = (k.amax(dim=2, keepdim=True) - k.amin(dim=2, keepdim=True)) / 255.0
        vs = v.abs().amax(dim=3, keepdim=True) / 127.0
        return torch.stack([ks.expand_as(k), vs.expand_as(v)], dim=1) / 2


FORMATS: dict[str, KVFormat] = {f.name: f for f in (
    KVFormat("bfloat16", 1, torch.bfloat16, False),
    KVFormat("float16", 2, torch.float16, False),
    KVFormat("float32", 3, torch.float32, False),
    KVFormat("fp8", 4, torch.float8_e4m3fn, True),
    KVFormat("int8", 5, torch.int8, True),
)}
BY_CODE: dict[int, KVFormat] = {f.code: f for f in FORMATS.values()}
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
            "fp8_e4m3": "fp8", "float8_e4m3fn": "fp8", "e4m3": "fp8"}

# What `ragblend index` stores when told nothing: the smallest format whose answers measured as
# close to `full` as the unquantized store's (README, Results, "Quantized chunk KV").
DEFAULT_FORMAT = "int8"


def kv_format(name: str | KVFormat | torch.dtype) -> KVFormat:
    """A format by name (or alias), or the float format of a dtype."""
    if isinstance(name, KVFormat):
        return name
    if isinstance(name, torch.dtype):
        for f in FORMATS.values():
            if not f.quantized and f.storage == name:
                return f
        raise TypeError(f"unsupported kv dtype {name}; use bfloat16, float16 or float32")
    key = str(name).strip().lower().removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        raise ValueError(f"unknown KV format {name!r}; choose from {', '.join(FORMATS)}")
    return FORMATS[key]


def default_format(model_dtype: torch.dtype) -> KVFormat:
    """The default for a model: DEFAULT_FORMAT, and never wider than bf16 for a float32 model."""
    return FORMATS[DEFAULT_FORMAT]


def bytes_per_token(fmt: str | KVFormat, n_layers: int, n_kv_heads: int, head_dim: int,
                    n_tokens: int = 256) -> float:
    """Stored payload bytes per token of a chunk of `n_tokens` (per-chunk scales amortized)."""
    f = kv_format(fmt)
    return n_layers * f.layer_nbytes(n_kv_heads, n_tokens, head_dim) / max(1, n_tokens)
