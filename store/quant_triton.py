"""A packed quantized layer (store.quant's packed layout) decoded on the GPU in one kernel launch.

The torch path (KVFormat.decode_packed) takes about a dozen small kernels per layer, each queued by
the host between the stream's flag waits; for a streamed request that is several hundred launches
on the critical path. Here one Triton program per (token, head) reads its chunk's offsets from
small per-request tables and writes keys and values straight into the fused cache. It computes
exactly what the torch path does (a multiply, then an add, each rounded: fp fusion is off), and
its first use on a device is checked against the torch path bit for bit; a mismatch or any error
turns it off for the process (the torch path is always correct).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

try:  # the GPU image ships Triton; the CPU wheel does not (and needs no kernel)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

_state: dict = {"ok": triton is not None, "checked": set()}

if triton is not None:
    @triton.jit
    def _int8_layer(row, out, chunk_of, tok, q_off, t_of, ks_off, kz_off, vs_off,
                    s_kv, s_h, s_s, s_row, s_l, H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
        s = tl.program_id(0)
        h = tl.program_id(1)
        layer = tl.program_id(2).to(tl.int64)  # of several rows decoded at once (0 for one)
        row += layer * s_row
        out += layer * s_l
        j = tl.load(chunk_of + s)
        t = tl.load(tok + s)
        T = tl.load(t_of + j)
        q = tl.load(q_off + j)
        d = tl.arange(0, BLOCK_D)
        m = d < D
        f32 = row.to(tl.pointer_type(tl.float32))
        kq = tl.load(row + q + (h * T + t) * D + d, mask=m, other=0).to(tl.float32)
        vq = tl.load(row + q + ((H + h) * T + t) * D + d, mask=m, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        ks = tl.load(f32 + tl.load(ks_off + j) + h * D + d, mask=m, other=0.0)
        kz = tl.load(f32 + tl.load(kz_off + j) + h * D + d, mask=m, other=0.0)
        vs = tl.load(f32 + tl.load(vs_off + j) + h * T + t)
        k = kq * ks
        k = k + kz
        v = vq * vs
        o = out + h * s_h + s * s_s + d
        tl.store(o, k.to(out.dtype.element_ty), mask=m)
        tl.store(o + s_kv, v.to(out.dtype.element_ty), mask=m)

    @triton.jit
    def _fp8_layer(row, out, chunk_of, tok, q_off, t_of, s_off,
                   s_kv, s_h, s_s, s_row, s_l, H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
        s = tl.program_id(0)
        ph = tl.program_id(1)  # k/v · head
        layer = tl.program_id(2).to(tl.int64)
        row += layer * s_row
        out += layer * s_l
        j = tl.load(chunk_of + s)
        t = tl.load(tok + s)
        T = tl.load(t_of + j)
        q = tl.load(q_off + j)
        d = tl.arange(0, BLOCK_D)
        m = d < D
        f32 = row.to(tl.pointer_type(tl.float32))
        x = tl.load(row + q + (ph * T + t) * D + d, mask=m, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        x = x * tl.load(f32 + tl.load(s_off + j) + ph)
        p = ph // H
        o = out + p * s_kv + (ph - p * H) * s_h + s * s_s + d
        tl.store(o, x.to(out.dtype.element_ty), mask=m)


def tables(fmt_name: str, index: dict, lengths: tuple[int, ...], device: torch.device) -> dict:
    """The kernel's per-request tables on `device` (from packed_index's host ints)."""
    tok = torch.tensor([t for T in lengths for t in range(T)], dtype=torch.int64)
    host = {"tok": tok, "t_of": torch.tensor(lengths, dtype=torch.int64)}
    for name in ("q", "s") if fmt_name == "fp8" else ("q", "ks", "kz", "vs"):
        host[name] = torch.tensor(index[name], dtype=torch.int64)
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in host.items()}


def _launch(fmt_name: str, row: torch.Tensor, H: int, D: int, out: torch.Tensor, index: dict, tab: dict) -> None:
    """One launch: a packed row into `out` [2, H, S, D], or rows [n, width] into out [n, 2, H, S, D]."""
    rows = row if row.dim() == 2 else row[None]
    outs = out if out.dim() == 5 else out[None]
    n, S = rows.shape[0], outs.shape[3]
    s_l, s_kv, s_h, s_s, s_d = outs.stride()
    if s_d != 1 or rows.stride(1) != 1:
        raise ValueError("the decoded layer's last dimension and the rows must be contiguous")
    block = triton.next_power_of_2(D)
    s_row = rows.stride(0)
    if fmt_name == "int8":
        _int8_layer[(S, H, n)](rows, outs, index["chunk_of"], tab["tok"], tab["q"], tab["t_of"], tab["ks"], tab["kz"],
                               tab["vs"], s_kv, s_h, s_s, s_row, s_l, H=H, D=D, BLOCK_D=block, enable_fp_fusion=False)
    else:
        _fp8_layer[(S, 2 * H, n)](rows, outs, index["chunk_of"], tab["tok"], tab["q"], tab["t_of"], tab["s"],
                                  s_kv, s_h, s_s, s_row, s_l, H=H, D=D, BLOCK_D=block, enable_fp_fusion=False)


def _self_check(fmt, H: int, D: int, dtype: torch.dtype, device: torch.device) -> None:
    """The kernel against the torch path on a small random layout, on a stream of its own (the
    caller's may be waiting on a host flag); raises on any difference."""
    lengths = (3, 5, 1)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.cuda.stream(torch.cuda.Stream(device)):
        kvs = [(torch.randn(1, 2, H, T, D, generator=g) * 3).to(device) for T in lengths]
        row = torch.cat([fmt.encode(kv) for kv in kvs], dim=1)[0]
        index = fmt.packed_index(H, D, lengths, device)
        want = fmt.decode_packed(row, H, D, lengths, torch.empty(2, H, sum(lengths), D, dtype=dtype, device=device),
                                 index, kernel=False)
        got = torch.full_like(want, float("nan"))
        _launch(fmt.name, row, H, D, got, index, tables(fmt.name, index, lengths, device))
        if not torch.equal(want, got):
            raise RuntimeError(f"it differs from the torch decode by up to {(want.float() - got.float()).abs().max()}")


def decode(fmt, row: torch.Tensor, H: int, D: int, lengths: tuple[int, ...], out: torch.Tensor,
           index: dict) -> bool:
    """Decode with the kernel when it can be used here (checked against the torch path the first
    time per format, shape and dtype); False: the caller decodes with torch. `row` may be several
    layers' rows [n, width] (out [n, 2, H, S, D]): still one launch."""
    if not (_state["ok"] and row.is_cuda and fmt.name in ("int8", "fp8") and out.stride(-1) == 1):
        return False
    try:
        key = (fmt.name, H, D, out.dtype, row.device)
        if key not in _state["checked"]:
            _self_check(fmt, H, D, out.dtype, row.device)
            _state["checked"].add(key)
        tab = index.get("triton")
        if tab is None:
            tab = index["triton"] = tables(fmt.name, index, lengths, row.device)
        _launch(fmt.name, row, H, D, out, index, tab)
        return True
    except Exception as e:  # any failure: the torch path from now on
        log.warning("the Triton %s decode is off (%s); decoding with torch", fmt.name, e)
        _state["ok"] = False
        return False
