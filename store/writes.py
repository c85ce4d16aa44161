"""Store writes pipelined behind the chunk compute, for indexing.

Writing a chunk's KV is device work (quantize, copy the rows to the host: store.serialize.stage_kv)
then host work alone: a CRC32 per layer and the store's put (an LMDB write transaction, or a
Redis SET). Done in line, the device idles through the host part of every chunk; for a 7B model
that part was as long as the chunk's prefill (run1 of 2026-12-07: 5,388 tokens/s with the int8
encode against 17,592 for the prefill alone). Here it runs on one writer thread while the next
chunk computes; at most `depth` staged entries wait (each is one chunk's encoded KV in host
memory, 17 MB of int8 for a 7B chunk of 512 tokens).

The staged entries' host buffers are kept for the next ones of the same length (`buffer`): a
fresh bytearray pays its zeroing and page faults on first touch, in line, before the writer
takes over. On the dev machine's CPU a 7B chunk's entry staged in 33.7 ms fresh against 11.4 ms
into a kept buffer (bf16, 67 MB), 366 against 352 ms (int8, 34 MB, the CPU's quantization
dominating) (docs/results/cpu/fleet/stage_buffer.py).

`PipelinedWrites.drain` returns only once every write is done and raises the first that failed,
so whoever commits after it (a document's registry row) still finds every entry it references in
the store: the crash rule of indexing holds (at most unreferenced entries, never a row without
its KV).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class PipelinedWrites:
    def __init__(self, depth: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-write")
        self._room = threading.BoundedSemaphore(depth)
        self._futures: list[Future] = []
        self._depth = depth
        self._free: list[bytearray] = []  # buffers of finished writes, newest last
        self._free_lock = threading.Lock()
        self.keys: set[str] = set()  # written or in flight: a chunk seen twice is computed once
        self.reused = 0

    def buffer(self, n: int) -> bytearray:
        """A host buffer of `n` bytes for the next staged entry: a finished write's, if one has
        that length (its old bytes are all overwritten), else a new one."""
        with self._free_lock:
            for i in range(len(self._free) - 1, -1, -1):
                if len(self._free[i]) == n:
                    self.reused += 1
                    return self._free.pop(i)
        return bytearray(n)

    def submit(self, key: str, write: Callable[[], object], buffer: bytearray | None = None) -> None:
        """Queue `write` (the entry's host work); waits while `depth` are queued. Raises the
        failure of an earlier write as soon as it is known. `buffer`, the staged entry, is kept
        for a later one once the write is done (nothing may hold it past `write`)."""
        self._raise_failed()
        self._room.acquire()
        self.keys.add(key)

        def run() -> object:
            try:
                return write()
            finally:
                if buffer is not None:
                    with self._free_lock:
                        self._free.append(buffer)
                        del self._free[:-(self._depth + 1)]  # at most depth + 1 kept
                self._room.release()
        self._futures.append(self._pool.submit(run))

    def _raise_failed(self) -> None:
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()

    def drain(self, raise_error: bool = True) -> None:
        """Wait for every queued write; raise the first failure (unless `raise_error` is False:
        the caller is already failing). The thread and the kept buffers stay for the next batch
        of writes (the next document); `keys` starts over, those written being in the store."""
        futures, self._futures = self._futures, []
        self.keys = set()
        error = None
        for f in futures:
            e = f.exception()
            error = error or e
        if error is not None and raise_error:
            raise error

    def close(self) -> None:
        """Wait for what is queued (a failure is not raised) and stop the thread."""
        self.drain(raise_error=False)
        self._pool.shutdown(wait=True)
