"""A CUDA stream that waits for the host without the host waiting: cuStreamWaitValue32 on a flag
in pinned memory. The KV streamed from the store arrives layer by layer on reader threads; with
this the whole prefill is queued at once and each layer's copy starts on the GPU the moment its
flag is written, while the host thread that would otherwise poll sits idle (on a busy host, a
polling thread is slowed by the readers and slows them in turn).

Reached through ctypes: torch has no binding. Where the driver lacks it, `available()` is False
and the caller waits on the host instead.
"""
from __future__ import annotations

import ctypes
import functools

import torch

_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: wait until (int32)*addr >= value


@functools.cache
def _driver():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    wait = next((getattr(lib, n) for n in ("cuStreamWaitValue32_v2", "cuStreamWaitValue32") if hasattr(lib, n)), None)
    device_ptr = getattr(lib, "cuMemHostGetDevicePointer_v2", None)
    if wait is None or device_ptr is None:
        return None
    wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    wait.restype = ctypes.c_int
    device_ptr.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
    device_ptr.restype = ctypes.c_int
    return wait, device_ptr


def device_address(pinned: torch.Tensor) -> int:
    """The device-side address of a pinned host tensor (the same number under UVA)."""
    out = ctypes.c_uint64()
    rc = _driver()[1](ctypes.byref(out), ctypes.c_void_p(pinned.data_ptr()), 0)
    if rc != 0:
        raise RuntimeError(f"cuMemHostGetDevicePointer failed ({rc})")
    return out.value


def wait_geq(stream: torch.cuda.Stream, address: int, value: int) -> None:
    """Work queued on `stream` after this starts once the int32 at device `address` is ≥ value."""
    rc = _driver()[0](ctypes.c_void_p(stream.cuda_stream), address, value, _GEQ)
    if rc != 0:
        raise RuntimeError(f"cuStreamWaitValue32 failed ({rc})")


@functools.cache
def available() -> bool:
    """Whether streams can wait on host flags here: tried once, on a flag that is already set."""
    if not torch.cuda.is_available() or _driver() is None:
        return False
    try:
        flag = torch.ones(1, dtype=torch.int32, pin_memory=True)
        stream = torch.cuda.Stream()
        wait_geq(stream, device_address(flag), 1)
        stream.synchronize()
        return True
    except Exception:
        return False
