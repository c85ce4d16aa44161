"""One chunk's KV as raw bytes: a small checked header, then the tensor layer-major.

Layout (little-endian):

    magic "RBKV" | version u16 | format u8 | reserved u8 | L, H, T, D u32 | fp_len u16
    | key_len u16 | fingerprint utf-8 | key ascii | crc32 of each layer's bytes, L x u32
    | zero pad | header crc32 u32 | layer 0 bytes | layer 1 bytes | ... | layer L-1 bytes

The key (the chunk hash the entry is stored under) sits inside the checked header since version
2, so a valid entry found under another chunk's key (swapped, or copied by a careless tool, on a
shared tier that any replica writes) is refused and recomputed instead of silently answering
with another chunk's KV. Version 1 entries (no key) are refused the same way and recomputed.

The header is padded to 64 bytes so the payload starts aligned (LMDB stores large values
page-aligned), which keeps a later zero-copy / pinned read possible. Each layer is one
contiguous span with its own crc, so a reader can verify and copy only the layers it needs,
and a loader can stream layer i+1 while layer i computes. Never pickle: the bytes are data,
not code, and are readable from any language.

The format byte names how a layer's bytes encode it (store/quant.py): bf16, fp16 and fp32 are
the tensor's own bytes (unchanged since the first version); fp8 and int8 rows hold their scales
beside the quantized values, and the layer's crc covers all of them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures import wait as futures_wait
from typing import NamedTuple

import numpy as np
import torch

from store.quant import BY_CODE, KVFormat, kv_format

try:  # the same CRC-32 as zlib's, 3× faster (SIMD); the checksum is on every cold read's path
    from zlib_ng.zlib_ng import crc32, crc32_combine
except ImportError:  # pragma: no cover - zlib-ng is a dependency; a bare environment still reads
    from zlib import crc32
    crc32_combine = None

MAGIC = b"RBKV"
FORMAT_VERSION = 2
_ALIGN = 64
_FIXED_V1 = struct.Struct("<4sHBBIIIIH")   # read only far enough to say what it is
_FIXED = struct.Struct("<4sHBBIIIIHH")
_U32 = struct.Struct("<I")



class CorruptEntry(Exception):
    """The stored bytes are not a valid entry (magic, version, length or checksum)."""


class WrongKey(CorruptEntry):
    """A valid entry bound to another key than the one it was read under (or to none)."""


class FingerprintMismatch(Exception):
    """The entry is valid but was computed for another model; using it would be wrong."""


class KVHeader(NamedTuple):
    fmt: KVFormat
    shape: tuple[int, int, int, int, int]  # (L, 2, H, T, D)
    fingerprint: str
    layer_crcs: tuple[int, ...]
    payload_offset: int
    layer_nbytes: int
    key: str = ""  # the chunk hash the entry was written for

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the entry decodes to by default (its own, for a float format)."""
        return self.fmt.natural_dtype

    @property
    def nbytes(self) -> int:
        return self.payload_offset + self.shape[0] * self.layer_nbytes

    def raw_shape(self, n_layers: int | None = None) -> tuple[int, int]:
        return (self.shape[0] if n_layers is None else n_layers, self.layer_nbytes)


def _byte_view(buf: bytes | memoryview) -> memoryview:
    mv = memoryview(buf)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def _header_len(fp_len: int, n_layers: int, key_len: int = 0, fixed: int = _FIXED.size) -> int:
    raw = fixed + fp_len + key_len + 4 * n_layers + 4
    return -(-raw // _ALIGN) * _ALIGN


def entry_nbytes(fmt: str | KVFormat, fingerprint: str, n_layers: int, n_kv_heads: int, n_tokens: int,
                 head_dim: int, key_len: int = 64) -> int:
    """The exact length of an entry (header and payload): what indexing a chunk will store
    (`key_len`: a chunk hash's 64 hex digits)."""
    f = kv_format(fmt)
    return (_header_len(len(fingerprint.encode("utf-8")), n_layers, key_len)
            + n_layers * f.layer_nbytes(n_kv_heads, n_tokens, head_dim))


def encode_kv(kv: torch.Tensor, fingerprint: str, fmt: str | KVFormat | None = None, key: str = "") -> bytearray:
    """Serialize `kv` of shape [L, 2, H_kv, T, D] in `fmt` (default: its own dtype, bit-exactly;
    bf16, fp16 or fp32), bound to `key` (the chunk hash it is stored under; stores always pass
    it). Quantization runs on kv's device; only the encoded rows come back. A bytearray (every
    store's writes take one; it is not copied again into bytes)."""
    return seal_kv(stage_kv(kv, fingerprint, fmt, key))


def stage_kv(kv: torch.Tensor, fingerprint: str, fmt: str | KVFormat | None = None, key: str = "",
             alloc: Callable[[int], bytearray] | None = None) -> bytearray:
    """encode_kv's device part: the rows quantized on kv's device and copied into the entry's host
    buffer, the header's fields written; the checksums are left to seal_kv (host work alone,
    which a writer thread can do while the device computes the next chunk). `alloc(n)` gives the
    buffer (one kept from an earlier entry: every byte of it is written here or by seal_kv)."""
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise ValueError(f"kv must have shape [L, 2, H, T, D], got {tuple(kv.shape)}")
    if not kv.dtype.is_floating_point or kv.dtype.itemsize < 2:
        raise TypeError(f"unsupported kv dtype {kv.dtype}; use bfloat16, float16 or float32")
    f = kv_format(kv.dtype) if fmt is None else kv_format(fmt)
    fp = fingerprint.encode("utf-8")
    if len(fp) > 0xFFFF:
        raise ValueError("fingerprint longer than 65535 utf-8 bytes")
    kb = key.encode("ascii")
    if len(kb) > 0xFFFF:
        raise ValueError("key longer than 65535 bytes")
    n_layers, _, n_heads, n_tokens, head_dim = kv.shape
    # Viewing as bytes (not converting) is what makes a float format round-trip bit-exactly.
    payload = f.encode(kv.detach())  # uint8 [L, layer_nbytes], on kv's device
    head_len = _header_len(len(fp), n_layers, len(kb))
    # One host buffer, written once: the encoded rows are copied straight into it from the device
    # (no intermediate host tensor, no final bytes() copy). Fresh host memory costs its page
    # faults, so each avoided copy of a 7B model's 34 MB entry is ~10 ms of the precompute.
    total = head_len + payload.numel()
    out = alloc(total) if alloc is not None else bytearray(total)
    if len(out) != total:
        raise ValueError(f"a buffer of {len(out)} bytes for an entry of {total}")
    rows = np.frombuffer(out, dtype=np.uint8, offset=head_len).reshape(n_layers, -1)
    if payload.numel():
        torch.from_numpy(rows).copy_(payload)
    _FIXED.pack_into(out, 0, MAGIC, FORMAT_VERSION, f.code, 0,
                     n_layers, n_heads, n_tokens, head_dim, len(fp), len(kb))
    pos = _FIXED.size
    out[pos:pos + len(fp)] = fp
    pos += len(fp)
    out[pos:pos + len(kb)] = kb
    pos += len(kb) + 4 * n_layers
    out[pos:head_len - 4] = bytes(head_len - 4 - pos)  # the padding, zeros (a kept buffer holds old bytes)
    return out


def seal_kv(out: bytearray) -> bytearray:
    """A staged entry's checksums, in place: one CRC32 per layer's rows, then the header's."""
    _, _, _, _, n_layers, _, _, _, n_fp, n_kb = _FIXED.unpack_from(out, 0)
    head_len = _header_len(n_fp, n_layers, n_kb)
    rows = np.frombuffer(out, dtype=np.uint8, offset=head_len).reshape(n_layers, -1) if n_layers else None
    pos = _FIXED.size + n_fp + n_kb
    for i in range(n_layers):
        _U32.pack_into(out, pos + 4 * i, crc32(rows[i]))
    _U32.pack_into(out, head_len - 4, crc32(memoryview(out)[:head_len - 4]))
    return out


def header_span(buf: bytes | memoryview) -> int:
    """The length of the header that begins `buf` (at least its fixed part): what a ranged read
    (a remote store's GETRANGE) must fetch before the header can be verified."""
    mv = _byte_view(buf)
    if len(mv) >= _FIXED_V1.size and _FIXED_V1.unpack_from(mv, 0)[1] == 1:  # read_header says why not
        fixed = _FIXED_V1.unpack_from(mv, 0)
        return _header_len(fixed[8], fixed[4], 0, _FIXED_V1.size)
    if len(mv) < _FIXED.size:
        raise CorruptEntry(f"entry of {len(mv)} bytes is shorter than the fixed header")
    fixed = _FIXED.unpack_from(mv, 0)
    return _header_len(fixed[8], fixed[4], fixed[9])


def read_header(buf: bytes | memoryview, total: int | None = None, expect_key: str | None = None) -> KVHeader:
    """Parse and verify the header and the total length, without touching the payload. `buf` may
    be only the entry's first bytes (header_span of them) when `total`, the entry's length as the
    store reports it, is given. With `expect_key`, an entry bound to another key is WrongKey."""
    mv = _byte_view(buf)
    if len(mv) >= _FIXED_V1.size:
        magic, version = _FIXED_V1.unpack_from(mv, 0)[:2]
        if magic == MAGIC and version != FORMAT_VERSION:
            raise CorruptEntry(f"format version {version}, not {FORMAT_VERSION} (an entry from before they were "
                               "bound to their key, or from a newer ragblend)")
    if len(mv) < _FIXED.size:
        raise CorruptEntry(f"entry of {len(mv)} bytes is shorter than the fixed header")
    magic, version, code, _, n_layers, n_heads, n_tokens, head_dim, fp_len, key_len = \
        _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CorruptEntry(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    head_len = _header_len(fp_len, n_layers, key_len)
    if len(mv) < head_len:
        raise CorruptEntry(f"entry of {len(mv)} bytes is shorter than its {head_len}-byte header")
    (head_crc,) = _U32.unpack_from(mv, head_len - 4)
    if crc32(mv[:head_len - 4]) != head_crc:
        raise CorruptEntry("header checksum mismatch")
    if code not in BY_CODE:
        raise CorruptEntry(f"unknown format code {code}")
    fmt = BY_CODE[code]
    layer_nbytes = fmt.layer_nbytes(n_heads, n_tokens, head_dim)
    expected = head_len + n_layers * layer_nbytes
    if (len(mv) if total is None else total) != expected:
        raise CorruptEntry(f"entry is {len(mv) if total is None else total} bytes, its header says {expected} "
                           "(truncated or extended)")
    fp_start = _FIXED.size
    key_start = fp_start + fp_len
    crc_start = key_start + key_len
    try:
        fingerprint = bytes(mv[fp_start:key_start]).decode("utf-8")
        key = bytes(mv[key_start:crc_start]).decode("ascii")
    except UnicodeDecodeError as e:
        raise CorruptEntry(f"fingerprint or key is not text: {e}") from None
    if expect_key is not None and key != expect_key:
        raise WrongKey(f"entry was written for chunk {key[:16] or '(none)'}…, read under {expect_key[:16]}…")
    crcs = struct.unpack_from(f"<{n_layers}I", mv, crc_start)
    return KVHeader(fmt, (n_layers, 2, n_heads, n_tokens, head_dim), fingerprint, crcs,
                    head_len, layer_nbytes, key)


def open_entry(buf: bytes | memoryview, expect_fingerprint: str | None = None,
               expect_key: str | None = None) -> tuple[memoryview, KVHeader]:
    """The entry's bytes and its verified header; raises FingerprintMismatch for another model's,
    WrongKey for one bound to another key than `expect_key`."""
    mv = _byte_view(buf)
    head = read_header(mv, expect_key=expect_key)
    if expect_fingerprint is not None and head.fingerprint != expect_fingerprint:
        raise FingerprintMismatch(
            f"entry was computed for fingerprint {head.fingerprint!r}, "
            f"expected {expect_fingerprint!r}")
    return mv, head


def byte_rows(out: torch.Tensor, head: KVHeader, n_layers: int | None = None) -> np.ndarray:
    """`out` as one row of bytes per layer, after checking it can hold the entry's layers: either
    raw rows (uint8 [n, layer_nbytes], any format) or, for a float format, a tensor of its dtype
    shaped [n, 2, H, T, D]."""
    n = head.shape[0] if n_layers is None else n_layers
    shape = (n, *head.shape[1:])
    if not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError("out must be a contiguous CPU tensor")
    if out.dtype == torch.uint8 and tuple(out.shape) == head.raw_shape(n):
        return out.numpy()
    if head.fmt.quantized or tuple(out.shape) != shape or out.dtype != head.fmt.storage:
        raise ValueError(f"out must be uint8 {head.raw_shape(n)}"
                         + ("" if head.fmt.quantized else f" or {head.fmt.storage} of shape {shape}"))
    # Through numpy: torch.frombuffer warns on LMDB's read-only buffers.
    return out.view(torch.uint8).numpy().reshape(n, head.layer_nbytes)


def to_kv(raw: torch.Tensor, head: KVHeader, dtype: torch.dtype | None = None,
          device: torch.device | str | None = None) -> torch.Tensor:
    """Raw rows of an entry (uint8 [n, layer_nbytes], as read) → KV [n, 2, H, T, D] in `dtype`
    (default: the entry's own) on `device` (default: where the rows are). The quantized bytes
    move, then decode there: on a GPU the host→device copy carries the small format. A float
    entry already in `dtype` on its device is a view of the rows, not a copy."""
    _, _, H, T, D = head.shape
    if device is not None and raw.device != torch.device(device):
        raw = raw.to(device, non_blocking=raw.is_pinned())
    return head.fmt.decode(raw, H, T, D, head.dtype if dtype is None else dtype)


def layer_span(mv: memoryview, head: KVHeader, i: int) -> memoryview:
    """Layer i's bytes within an entry's buffer."""
    start = head.payload_offset + i * head.layer_nbytes
    return mv[start:start + head.layer_nbytes]


def layer_ok(span: memoryview | bytes, head: KVHeader, i: int) -> bool:
    """Whether `span` is layer i's bytes as written: its length and its checksum."""
    return len(span) == head.layer_nbytes and crc32(span) == head.layer_crcs[i]


def copy_layer(mv: memoryview, head: KVHeader, i: int, dst: np.ndarray | Callable[[np.ndarray], None]) -> None:
    """Verify layer i's checksum and copy its bytes to `dst`, any byte array of the layer's size,
    strided or not, or hand them (uint8, read-only) to `dst` to place (crc32 and the copy release
    the GIL, so layers copy in parallel on a pool)."""
    span = layer_span(mv, head, i)
    if not layer_ok(span, head, i):
        raise CorruptEntry(f"checksum mismatch in layer {i}")
    src = np.frombuffer(span, dtype=np.uint8)
    if callable(dst):
        dst(src)
    else:
        dst[...] = src.reshape(dst.shape)


def finish(jobs: list[Future]) -> None:
    """Wait for every job, then raise the first failure: a job still copying out of an LMDB
    buffer must not outlive the transaction that keeps the buffer mapped."""
    futures_wait(jobs)
    for job in jobs:
        job.result()


def decode_kv(buf: bytes | memoryview, *, expect_fingerprint: str | None = None,
              layers: range | list[int] | None = None, out: torch.Tensor | None = None,
              pool: Executor | None = None, pending: list[Future] | None = None,
              dtype: torch.dtype | None = None, expect_key: str | None = None) -> torch.Tensor:
    """Rebuild [len(layers), 2, H, T, D] from `buf`, verifying only the layers read.

    The result owns its memory, so `buf` may be an LMDB buffer that dies with its transaction.
    `out` (e.g. a pinned staging tensor: raw uint8 rows, or for a float format a tensor of its
    dtype and shape) is filled instead of a new tensor, and returned as filled; `pool` verifies
    and copies the layers in parallel, which is what makes a cold read of a 7B model's chunk KV
    fast enough to serve from. With `pending`, the layer jobs are appended to it instead of
    awaited: the caller waits (while `buf` is still alive), so several entries' layers share the
    pool at once. Without `out`, the KV comes back decoded to `dtype` (default: the entry's own;
    float32 for a quantized entry).
    """
    mv, head = open_entry(buf, expect_fingerprint, expect_key)
    n_layers = head.shape[0]
    wanted = list(range(n_layers)) if layers is None else [int(i) for i in layers]
    for i in wanted:
        if not 0 <= i < n_layers:
            raise IndexError(f"layer {i} out of range for an entry of {n_layers} layers")
    decode = out is None and (head.fmt.quantized or (dtype is not None and dtype != head.fmt.storage))
    if decode and pending is not None:
        raise ValueError("decoding a quantized entry needs its layers first: pass raw rows as out")
    if out is None:
        out = (torch.empty(head.raw_shape(len(wanted)), dtype=torch.uint8) if decode
               else torch.empty((len(wanted), *head.shape[1:]), dtype=head.fmt.storage))
    dst = byte_rows(out, head, len(wanted))
    if pool is None:
        for j, i in enumerate(wanted):
            copy_layer(mv, head, i, dst[j])
    else:
        jobs = [pool.submit(copy_layer, mv, head, i, dst[j]) for j, i in enumerate(wanted)]
        if pending is not None:
            pending.extend(jobs)
        else:
            finish(jobs)  # re-raises CorruptEntry of any layer, once none is still reading `buf`
    return to_kv(out, head, dtype) if decode else out
