"""What a document id and a document's metadata may be, checked at every door (the REST API, the
CLI's JSONL files): one set of rules, each answer naming the rule that was broken.

Metadata is bounded because it is stored and sent back on every `GET /v1/documents`: nesting
deep enough to break a JSON parser or serializer (Python's ~1000 levels, pydantic's ~250), or
sheer size, must be refused when it comes in, not discovered when every list request fails.
"""
from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

MAX_ID_CHARS = 256
MAX_ID_BYTES = 1024  # UTF-8
MAX_METADATA_DEPTH = 32  # {"a": 1} is depth 1
MAX_METADATA_KEYS = 1000  # keys of every object inside, together
MAX_METADATA_BYTES = 64 * 1024  # as compact JSON

_SEGMENT_SPLIT = re.compile(r"[/\\]")


def _unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): no UTF-8 form, so it cannot be stored or sent
        return True
    return False


def text_problem(text: str) -> str | None:
    """None if `text` can be tokenized, stored and sent back as UTF-8; else what is wrong."""
    return "must be valid Unicode (no lone UTF-16 surrogates such as \\ud800)" if _unencodable(text) else None


def id_problem(doc_id: str) -> str | None:
    """None for an acceptable document id, else the rule it breaks. Ids are opaque strings, never
    joined to a path, but they must print and log cleanly, and look like no path trick."""
    if not doc_id:
        return "must not be empty"
    if len(doc_id) > MAX_ID_CHARS:
        return f"at most {MAX_ID_CHARS} characters, got {len(doc_id)}"
    if _unencodable(doc_id):
        return "must be valid Unicode (no lone UTF-16 surrogates)"
    if len(doc_id.encode("utf-8")) > MAX_ID_BYTES:
        return f"at most {MAX_ID_BYTES} bytes of UTF-8"
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in doc_id):
        return "must not contain control characters (newlines, tabs, NUL)"
    if any(seg in (".", "..") for seg in _SEGMENT_SPLIT.split(doc_id)):
        return "must not contain '.' or '..' path segments"
    return None


def metadata_problem(metadata: Any) -> str | None:
    """None for acceptable metadata (a JSON object within the limits), else the limit it breaks.
    Walks the value without recursion, so any depth is safe to check."""
    if not isinstance(metadata, dict):
        return "must be a JSON object"
    keys = 0
    stack: list[tuple[Any, int]] = [(metadata, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_METADATA_DEPTH:
                return f"nested deeper than {MAX_METADATA_DEPTH} levels"
            keys += len(value)
            if keys > MAX_METADATA_KEYS:
                return f"more than {MAX_METADATA_KEYS} keys in all"
            for k, v in value.items():
                if not isinstance(k, str) or _unencodable(k):
                    return "keys must be valid Unicode strings"
                stack.append((v, depth + 1))
        elif isinstance(value, list):
            if depth > MAX_METADATA_DEPTH:
                return f"nested deeper than {MAX_METADATA_DEPTH} levels"
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            if _unencodable(value):
                return "strings must be valid Unicode (no lone UTF-16 surrogates)"
        elif isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                return "numbers must be finite (no NaN or Infinity)"
        elif isinstance(value, int) and not isinstance(value, bool):
            if not -2**63 <= value < 2**64:
                return "integers must fit in 64 bits"
        elif value is not None and not isinstance(value, bool):
            return f"holds a {type(value).__name__}, which is not JSON"
    size = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        return f"at most {MAX_METADATA_BYTES} bytes as JSON, got {size}"
    return None


def loads(text: str | bytes) -> Any:
    """json.loads that reports nesting too deep for the parser as a ValueError, not RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None
