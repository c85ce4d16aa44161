"""Turn files on disk into `Document`s.

Loading never crashes on a bad input: a binary file, a file that is not UTF-8, an unknown
extension or a malformed JSONL line is skipped with a warning that names it, so one odd file
in a large corpus does not stop an indexing run.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md"}
JSONL_SUFFIXES = {".jsonl"}


@dataclass
class Document:
    """One unit of text the user indexes; `id` is stable across runs so re-indexing is incremental."""

    id: str
    text: str
    source: str
    metadata: dict = field(default_factory=dict)


def load_path(path: str | Path) -> Iterator[Document]:
    """Yield the documents in a file, or in every non-hidden file under a directory (recursive, sorted).

    Ids are paths relative to the given root (the bare file name when a single file is given),
    so the same corpus moved elsewhere keeps its ids.
    """
    root = Path(path)
    if root.is_file():
        yield from _load_file(root, root.name)
        return
    if not root.is_dir():
        raise FileNotFoundError(f"no such file or directory: {root}")
    # Hidden entries (.git, .DS_Store, editor swap files) are never corpus content.
    files = [p for p in root.rglob("*")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    # Sorting on the relative posix path makes the order the same on every platform.
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    for file in files:
        yield from _load_file(file, file.relative_to(root).as_posix())


def _load_file(file: Path, rel: str) -> Iterator[Document]:
    suffix = file.suffix.lower()
    if suffix not in TEXT_SUFFIXES | JSONL_SUFFIXES:
        log.warning("skipping %s: unsupported extension %r", file, suffix)
        return
    text = _read_text(file)
    if text is None:
        return
    if suffix in TEXT_SUFFIXES:
        yield Document(id=rel, text=text, source=str(file), metadata={})
    else:
        yield from _parse_jsonl(text, file, rel)


def _read_text(file: Path) -> str | None:
    """Read a file as UTF-8, or return None (with a warning) for binary or undecodable bytes."""
    try:
        data = file.read_bytes()
    except OSError as e:
        log.warning("skipping %s: cannot read (%s)", file, e)
        return None
    # A NUL byte never occurs in UTF-8 text but is common in binary formats that might
    # otherwise decode by accident.
    if b"\x00" in data:
        log.warning("skipping %s: looks binary (contains NUL bytes)", file)
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        log.warning("skipping %s: not valid UTF-8 (%s)", file, e)
        return None
    return text.removeprefix("\ufeff")


class JsonlError(ValueError):
    """A JSONL line that is not a JSON object. `line` and `reason` let a caller word the error
    for its own audience (an HTTP answer names the line differently from a command's stderr)."""

    def __init__(self, where: str, line: int, reason: str):
        super().__init__(f"{where}:{line}: {reason}")
        self.line, self.reason = line, reason


def jsonl_objects(text: str, where: str) -> list[tuple[int, dict]]:
    """Every non-blank line of `text` as (line number, JSON object); a line that is not one is a
    JsonlError naming `where:line` (for files a user hands a command, unlike a corpus scan,
    which skips such lines)."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise JsonlError(where, n, f"not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise JsonlError(where, n, "expected a JSON object")
        rows.append((n, obj))
    return rows


def _parse_jsonl(text: str, file: Path, rel: str) -> Iterator[Document]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            log.warning("skipping %s line %d: invalid JSON (%s)", file, lineno, e)
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            log.warning("skipping %s line %d: expected an object with a string 'text'", file, lineno)
            continue
        doc_id = obj.get("id")
        if doc_id is None or doc_id == "":
            doc_id = f"{rel}#{lineno}"
        metadata = {k: v for k, v in obj.items() if k not in ("id", "text")}
        yield Document(id=str(doc_id), text=obj["text"], source=f"{file}:{lineno}", metadata=metadata)
