"""Progress of long work in tokens (not documents: one large file would sit at 0/1 for minutes),
with the rate and the time left. A bar (tqdm) on a terminal; elsewhere (a log, CI) a plain
line every `every_s` seconds and one at the end."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TokenProgress:
    def __init__(self, total_tokens: int, what: str, *, file: TextIO | None = None, every_s: float = 10.0,
                 tty: bool | None = None):
        self.total, self.what, self.every_s = max(0, int(total_tokens)), what, every_s
        self.file = file or sys.stderr
        self.done = 0
        self.t0 = self._last = time.perf_counter()
        tty = self.file.isatty() if tty is None else tty
        self._bar = None
        if tty and self.total:
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, unit="tok", unit_scale=True, desc=what, file=self.file,
                             dynamic_ncols=True)

    def update(self, chunks: int = 0, tokens: int = 0) -> None:
        """`progress(chunks, tokens)` as RagService.index_documents calls it, after each chunk."""
        self.done += tokens
        if self._bar is not None:
            self._bar.update(tokens)
            return
        now = time.perf_counter()
        if self.total and now - self._last >= self.every_s:
            self._last = now
            self.file.write(self.line() + "\n")
            self.file.flush()

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = _eta(left) if left != float("inf") else "?"
        return (f"{self.what}: {self.done}/{self.total} tokens ({pct:.0f}%), {rate:.0f} tokens/s, "
                f"elapsed {_eta(elapsed)}, ETA {eta}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.total:
            self.file.write(self.line().replace(", ETA 0:00", "") + "\n")
            self.file.flush()
