"""Reading the `--chunks FILE` of `ragblend ask`: JSONL `{"text": ...}` lines or blank-line blocks."""
from __future__ import annotations

from pathlib import Path

from retrieval.loaders import jsonl_objects


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
        chunks = []
        for n, obj in jsonl_objects(raw, str(path)):
            if not isinstance(obj.get("text"), str):
                raise ValueError(f'{path}:{n}: expected an object with a "text" string')
            chunks.append(obj["text"])
    else:
        chunks = [block.strip() for block in raw.split("\n\n")]
    chunks = [c for c in chunks if c.strip()]
    if not chunks:
        raise ValueError(f"{path} holds no chunks")
    return chunks
