"""Reading the `--chunks FILE` of `ragblend ask`: JSONL `{"text": ...}` lines or blank-line blocks."""
from __future__ import annotations

import logging
from pathlib import Path

from retrieval.loaders import jsonl_objects
from retrieval.rules import text_problem

log = logging.getLogger(__name__)


def read_chunks(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"chunks file not found: {path}")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    stripped = raw.lstrip()
    if path.suffix == ".jsonl" or stripped.startswith("{"):
        # A bad line is skipped with a warning naming it; only a file with no chunk at all fails.
        chunks = []
        for n, obj in jsonl_objects(raw, str(path), on_error=lambda e: log.warning("skipping %s", e)):
            problem = 'expected an object with a "text" string' if not isinstance(obj.get("text"), str) \
                else text_problem(obj["text"])
            if problem:
                log.warning("skipping %s:%d: %s", path, n, problem)
                continue
            chunks.append(obj["text"])
    else:
        chunks = [block.strip() for block in raw.split("\n\n")]
    chunks = [c for c in chunks if c.strip()]
    if not chunks:
        raise ValueError(f"{path} holds no chunks")
    return chunks
