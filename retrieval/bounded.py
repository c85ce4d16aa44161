"""A time and memory budget per file: rich formats (PDF, DOCX, HTML, reStructuredText) are parsed
in a worker process of their own, so that a parse that runs away (a decompression bomb the
format limits did not foresee, markup that makes a parser quadratic, a parser bug that loops)
costs one file its budget and is reported as that file's skip reason, instead of holding or
killing the whole indexing run. Plain text and JSONL are read in the calling process: their
cost is linear in the file's size.

The worker is a plain `python -m retrieval.bounded` child speaking JSON lines over its pipes
(never pickle: its answers are data, and it parsed hostile input). It is started on the first
rich file, reused for the next, and killed and started afresh when a file overruns.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from .formats import Extracted, Unreadable, extract

FILE_SECONDS = 60.0            # wall time one file may take to parse
FILE_MEMORY_BYTES = 2 << 30    # address space of the worker that parses it


class BoundedExtractor:
    """`extract(path)` as retrieval.formats does it, under the budget; raises Unreadable for a
    file the parser refuses, one that overruns its time or memory, or one that kills the parser."""

    def __init__(self, seconds: float = FILE_SECONDS, memory_bytes: int = FILE_MEMORY_BYTES):
        self.seconds, self.memory_bytes = seconds, memory_bytes
        self._proc: subprocess.Popen | None = None
        self._buffer = b""

    def __enter__(self) -> "BoundedExtractor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def extract(self, path: Path) -> Extracted:
        proc = self._worker()
        try:
            proc.stdin.write(json.dumps({"path": str(path)}).encode() + b"\n")
            proc.stdin.flush()
        except OSError:
            self._kill()
            raise Unreadable(f"the parser process died before reading it (exit code {proc.poll()})") from None
        line = self._read_line(proc, time.monotonic() + self.seconds)
        if line is None:
            code = proc.poll()
            self._kill()
            if code is None:
                raise Unreadable(f"refused: not parsed within the {self.seconds:g} s budget per file")
            raise Unreadable(f"the parser died on it (exit code {code}; past the "
                             f"{self.memory_bytes >> 20} MiB memory budget per file?)")
        answer = json.loads(line)
        if "unreadable" in answer:
            raise Unreadable(answer["unreadable"])
        return Extracted(answer["text"], answer["kind"], answer["encoding"], tuple(map(tuple, answer.get("pages", ()))))

    def close(self) -> None:
        self._kill()

    # -- the worker process ------------------------------------------------------------------
    def _worker(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "retrieval.bounded", str(self.memory_bytes)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                cwd=Path(__file__).resolve().parents[1])
            self._buffer = b""
        return self._proc

    def _read_line(self, proc: subprocess.Popen, deadline: float) -> bytes | None:
        """One answer line, or None at the deadline or if the worker dies first."""
        fd = proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            data = os.read(fd, 1 << 20)
            if not data:  # EOF: the worker died
                proc.wait()
                return None
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass


def _serve(memory_bytes: int) -> None:
    """The worker's loop: a path a line in, an answer a line out."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    for line in sys.stdin.buffer:
        path = json.loads(line)["path"]
        try:
            got = extract(path)
            answer = {"text": got.text, "kind": got.kind, "encoding": got.encoding, "pages": list(got.pages)}
        except Unreadable as e:
            answer = {"unreadable": str(e)}
        except MemoryError:
            answer = {"unreadable": f"refused: past the {memory_bytes >> 20} MiB memory budget per file"}
        except RecursionError:
            answer = {"unreadable": "refused: nested too deeply for the parser"}
        except Exception as e:  # a parser's own failure on a hostile file: the file's reason
            answer = {"unreadable": f"the parser failed ({type(e).__name__}: {e})"}
        # ensure_ascii: lone surrogates travel as \\ud800 escapes; the caller checks the text
        sys.stdout.buffer.write(json.dumps(answer).encode() + b"\n")
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
