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

import functools
import itertools
from dataclasses import dataclass

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
    def _offsets(self, H: int, T: int, D: int) -> dict[str, int]:
        if self.name == "int8":
            o = {"ks": 0, "kz": _up(4 * H * D), "vs": 2 * _up(4 * H * D)}
            o["q"] = o["vs"] + _up(4 * H * T)
        else:  # fp8
            o = {"s": 0, "q": _up(4 * 2 * H)}
        o["end"] = _up(o["q"] + 2 * H * T * D)
        return o

    def layer_nbytes(self, H: int, T: int, D: int) -> int:
        if not self.quantized:
            return 2 * H * T * D * self.storage.itemsize
        return self._offsets(H, T, D)["end"]

    # -- a request's chunks packed: each chunk's stored layer row, one after another -----------
    # A streamed layer of a request is its chunks' rows side by side in one pinned row: each is
    # copied there as stored (one memcpy, like a float entry), one host→device copy moves the
    # layer, and decode_packed turns it into [2, H, ΣT, D] with a fixed handful of kernels
    # (gathers by a per-request index), however many chunks there are.
    def packed_nbytes(self, H: int, D: int, lengths: tuple[int, ...]) -> int:
        return sum(self.layer_nbytes(H, T, D) for T in lengths)

    def packed_index(self, H: int, D: int, lengths: tuple[int, ...], device: torch.device | str) -> dict:
        """Where decode_packed finds things in a packed row: each chunk's values (bytes, or
        elements of a float format) and scales (float32 units) as host ints, and `chunk_of`, each
        token's chunk, on `device`. Kept per layout (a corpus chunked to one token budget has few):
        building it costs a streamed request ~0.5 ms of host time on the GPU machine, with a
        host→device copy, and the Triton decode adds its tables to it once (store/quant_triton.py).
        Read-only: every request with these chunk lengths shares it."""
        return _packed_index(self, H, D, tuple(lengths), str(torch.device(device)))

    # -- encode / decode ----------------------------------------------------------------------
    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        """[L, 2, H, T, D] → uint8 [L, layer_nbytes] on kv's device."""
        L, _, H, T, D = kv.shape
        if not self.quantized:
            x = kv
            if self.storage == torch.float16 and kv.dtype != torch.float16:
                x = kv.float().clamp(-65504.0, 65504.0)
            return x.to(self.storage).contiguous().view(torch.uint8).reshape(L, -1)
        o = self._offsets(H, T, D)
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
        written into `out` (any [n, 2, H, T, D] view) when given. Every element is q·s + z (int8
        keys) or q·s, a multiply and then an add, as in decode_packed, so that a chunk decodes to
        the same bits alone or packed with others."""
        if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != self.layer_nbytes(H, T, D):
            raise ValueError(f"raw rows must be uint8 [n, {self.layer_nbytes(H, T, D)}], got "
                             f"{raw.dtype} {tuple(raw.shape)}")
        n = raw.shape[0]
        if not self.quantized:
            x = raw.contiguous().view(self.storage).view(n, 2, H, T, D)
            if out is None:
                return x if dtype == self.storage else x.to(dtype)
            return out.copy_(x)
        if out is None:
            out = torch.empty((n, 2, H, T, D), dtype=dtype, device=raw.device)
        if T == 0 or n == 0:
            return out
        raw = raw.contiguous()
        o = self._offsets(H, T, D)
        f32 = lambda a, b, *shape: raw[:, a:b].view(torch.float32).view(n, *shape)  # noqa: E731
        if self.name == "fp8":
            s = f32(o["s"], o["s"] + 8 * H, 2, H)
            q = raw[:, o["q"]:o["q"] + 2 * H * T * D].view(torch.float8_e4m3fn).view(n, 2, H, T, D)
            out.copy_(q.float().mul_(s[..., None, None]))
            return out
        ks = f32(o["ks"], o["ks"] + 4 * H * D, H, D)
        kz = f32(o["kz"], o["kz"] + 4 * H * D, H, D)
        vs = f32(o["vs"], o["vs"] + 4 * H * T, H, T)
        m = H * T * D
        kq = raw[:, o["q"]:o["q"] + m].view(n, H, T, D)
        vq = raw[:, o["q"] + m:o["q"] + 2 * m].view(torch.int8).view(n, H, T, D)
        out[:, 0].copy_(kq.float().mul_(ks[:, :, None]).add_(kz[:, :, None]))
        out[:, 1].copy_(vq.float().mul_(vs[..., None]))
        return out

    def decode_packed_rows(self, rows: torch.Tensor, H: int, D: int, lengths: tuple[int, ...],
                           out: torch.Tensor, index: dict | None = None) -> torch.Tensor:
        """Several layers' packed rows (uint8 [n, packed_nbytes]) → `out` [n, 2, H, ΣT, D]: as
        decode_packed layer by layer, in one Triton launch on CUDA where it applies (a lookahead
        probe's layers arrive together, and each launch is host time on the prefill's path)."""
        lengths = tuple(lengths)
        if rows.dim() != 2 or out.dim() != 5 or rows.shape[0] != out.shape[0]:
            raise ValueError(f"rows [n, width] and out [n, 2, H, S, D] must match, got {tuple(rows.shape)} "
                             f"and {tuple(out.shape)}")
        if len(lengths) > 1 and rows.is_cuda and self.quantized \
                and rows.shape[1] == self.packed_nbytes(H, D, lengths):
            from store import quant_triton
            ix = index if index is not None else self.packed_index(H, D, lengths, rows.device)
            if quant_triton.decode(self, rows, H, D, lengths, out, ix):
                return out
        for i in range(rows.shape[0]):
            self.decode_packed(rows[i], H, D, lengths, out[i], index)
        return out

    def decode_packed(self, row: torch.Tensor, H: int, D: int, lengths: tuple[int, ...], out: torch.Tensor,
                      index: dict | None = None, kernel: bool = True) -> torch.Tensor:
        """One packed layer row (uint8 [packed_nbytes]) of chunks `lengths` → `out` [2, H, ΣT, D]
        (any view, any float dtype, on row's device). `index`: packed_index's, when the same
        layout decodes many layers. A fixed handful of kernels whatever the chunk count: the
        chunks' values joined by one cat, their scales per chunk then per token; on CUDA one
        Triton kernel where it is available (`kernel`), with the same result."""
        lengths = tuple(lengths)
        want = self.packed_nbytes(H, D, lengths)
        if row.dtype != torch.uint8 or row.dim() != 1 or row.numel() != want:
            raise ValueError(f"a packed row must be uint8 [{want}], got {row.dtype} {tuple(row.shape)}")
        if len(lengths) == 1:
            return self.decode(row[None], H, lengths[0], D, out.dtype, out=out[None])[0]
        ix = index if index is not None else self.packed_index(H, D, lengths, row.device)
        if kernel and row.is_cuda and self.quantized:  # one launch per layer (store/quant_triton.py)
            from store import quant_triton
            if quant_triton.decode(self, row, H, D, lengths, out, ix):
                return out
        S, c = sum(lengths), len(lengths)
        # the values, [k/v · head, token, D], chunk after chunk along the tokens: one cat
        values = row if self.quantized else row.view(self.storage)
        q = torch.cat([values[o:o + 2 * H * t * D].view(2 * H, t, D) for o, t in zip(ix["q"], lengths)],
                      dim=1).view(2, H, S, D)
        if not self.quantized:
            return out.copy_(q)
        f32 = row.view(torch.float32)
        per_chunk = lambda name, n: torch.stack([f32[o:o + n] for o in ix[name]])  # noqa: E731
        if self.name == "fp8":
            s = per_chunk("s", 2 * H).view(c, 2, H).index_select(0, ix["chunk_of"]).permute(1, 2, 0)  # [2, H, S]
            return out.copy_(q.view(torch.float8_e4m3fn).float().mul_(s[..., None]))
        ks = per_chunk("ks", H * D).view(c, H, D).index_select(0, ix["chunk_of"]).transpose(0, 1)  # [H, S, D]
        kz = per_chunk("kz", H * D).view(c, H, D).index_select(0, ix["chunk_of"]).transpose(0, 1)
        vs = torch.cat([f32[o:o + H * t].view(H, t) for o, t in zip(ix["vs"], lengths)], dim=1)  # [H, S]
        out[0].copy_(q[0].float().mul_(ks).add_(kz))
        out[1].copy_(q[1].view(torch.int8).float().mul_(vs[..., None]))
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

# What a data dir's store holds when told nothing (recorded by store.backend.open_kv_store, however
# the data dir is first filled): the smallest format whose answers measured as close to `full` as
# the unquantized store's (README, Results, "Quantized chunk KV").
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


def bytes_per_token(fmt: str | KVFormat, n_layers: int, n_kv_heads: int, head_dim: int,
                    n_tokens: int = 256) -> float:
    """Stored payload bytes per token of a chunk of `n_tokens` (per-chunk scales amortized)."""
    f = kv_format(fmt)
    return n_layers * f.layer_nbytes(n_kv_heads, n_tokens, head_dim) / max(1, n_tokens)


@functools.lru_cache(maxsize=64)
def _packed_index(fmt: KVFormat, H: int, D: int, lengths: tuple[int, ...], device: str) -> dict:
    bases = [0, *itertools.accumulate(fmt.layer_nbytes(H, t, D) for t in lengths)][:-1]
    # (not torch.repeat_interleave: on the CPU it takes milliseconds for a few thousand ids)
    chunk_of = torch.tensor([j for j, T in enumerate(lengths) for _ in range(T)], dtype=torch.int64)
    pin = torch.device(device).type == "cuda"
    out: dict = {"chunk_of": (chunk_of.pin_memory() if pin else chunk_of).to(device, non_blocking=pin)}
    # host ints: slicing by them queues no copy back from the device
    if not fmt.quantized:
        out["q"] = [b // fmt.storage.itemsize for b in bases]
        return out
    out["q"] = [b + fmt._offsets(H, t, D)["q"] for b, t in zip(bases, lengths)]
    for name in ("s",) if fmt.name == "fp8" else ("ks", "kz", "vs"):
        out[name] = [(b + fmt._offsets(H, t, D)[name]) // 4 for b, t in zip(bases, lengths)]
    return out
