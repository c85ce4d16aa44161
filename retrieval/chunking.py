"""Cut a document into chunks measured in the LLM's tokens.

Chunks never overlap, so each chunk's precomputed KV is reusable on its own. Cuts prefer
paragraph boundaries (blank lines), then sentence ends, then whitespace between words, and
only as a last resort a hard cut inside a run of characters. Paragraphs are packed greedily up
to `max_tokens`. The result is a pure function of (text, tokenizer, max_tokens).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Protocol

_PARAGRAPH_SEP = re.compile(r"\n[ \t\r\f\v]*\n\s*")
# A sentence ends at . ! ? (optionally followed by a closing quote or bracket) before whitespace;
# a single line break inside a paragraph (lists, verse, code) is treated as a sentence end too.
_SENTENCE_SEP = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]\u201d\u2019])\s+|\s*\n\s*")
_WORD_SEP = re.compile(r"\s+")


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


Counter = Callable[[int, int], int]  # token count of text[a:b]


@dataclass
class Chunk:
    """A span `text == document[start:end]` whose KV is cached as one unit."""

    doc_id: str
    index: int
    text: str
    start: int
    end: int
    n_tokens: int


def chunk_text(doc_id: str, text: str, tokenizer: Tokenizer, max_tokens: int = 384) -> list[Chunk]:
    """Split `text` into chunks of at most `max_tokens` tokens of `tokenizer`."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")

    def count(a: int, b: int) -> int:
        return len(tokenizer.encode(text[a:b], add_special_tokens=False))

    units = list(_units(text, 0, len(text), count, max_tokens, level=0))
    spans = _pack(units, count, max_tokens)
    return [
        Chunk(doc_id=doc_id, index=i, text=text[a:b], start=a, end=b, n_tokens=n)
        for i, (a, b, n) in enumerate(spans)
    ]


def _split(text: str, a: int, b: int, sep: re.Pattern[str]) -> list[tuple[int, int]]:
    """Non-empty, whitespace-trimmed spans of text[a:b] between matches of `sep`."""
    out: list[tuple[int, int]] = []
    pos = a
    for m in sep.finditer(text, a, b):
        out.append((pos, m.start()))
        pos = m.end()
    out.append((pos, b))
    trimmed = []
    for s, e in out:
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if s < e:
            trimmed.append((s, e))
    return trimmed


_LEVELS = (_PARAGRAPH_SEP, _SENTENCE_SEP, _WORD_SEP)


def _units(text: str, a: int, b: int, count: Counter, max_tokens: int, level: int):
    """Yield (start, end, n_tokens) pieces that each fit, splitting coarsest-first."""
    if level == len(_LEVELS):
        yield from _hard_cut(text, a, b, count, max_tokens)
        return
    for s, e in _split(text, a, b, _LEVELS[level]):
        n = count(s, e)
        if n <= max_tokens:
            yield (s, e, n)
        else:
            yield from _units(text, s, e, count, max_tokens, level + 1)


def _hard_cut(text: str, a: int, b: int, count: Counter, max_tokens: int):
    """Cut a run with no usable boundary at the longest prefix that fits.

    The window grows geometrically before the binary search so that each count covers about
    one chunk's worth of text, not the whole run (a megabyte without spaces stays linear).
    """
    while a < b:
        if count(a, a + 1) > max_tokens:
            raise ValueError(f"max_tokens={max_tokens} is smaller than one character's tokens")
        lo, hi = a + 1, min(b, a + 4 * max_tokens)  # text[a:lo] fits; find the last end that does
        while hi < b and count(a, hi) <= max_tokens:
            lo, hi = hi, min(b, a + 2 * (hi - a))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(a, mid) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        yield (a, lo, count(a, lo))
        a = lo


def _pack(units: list[tuple[int, int, int]], count: Counter, max_tokens: int) -> list[tuple[int, int, int]]:
    """Greedily merge consecutive units into spans of at most `max_tokens` tokens.

    Tokenizers pre-split on whitespace, so a joined span has at least as many tokens as its
    parts (the seams may add some, e.g. "\\n\\n"). The sum of the parts is therefore an
    optimistic bound used to pick the longest candidate; the candidate is then counted exactly
    and shortened unit by unit until it fits. A single unit always fits, so this terminates.
    """
    spans: list[tuple[int, int, int]] = []
    i = 0
    while i < len(units):
        j, est = i + 1, units[i][2]
        while j < len(units) and est + units[j][2] <= max_tokens:
            est += units[j][2]
            j += 1
        while True:
            start, end = units[i][0], units[j - 1][1]
            n = units[i][2] if j == i + 1 else count(start, end)
            if n <= max_tokens:
                break
            j -= 1
        spans.append((start, end, n))
        i = j
    return spans
