"""Fast stand-ins for the tokenizer and embedder, for tests anywhere in ragblend.

They have the same interface as the real ones but need no model, so tests of everything built
on retrieval run in milliseconds.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

_WORD = re.compile(r"\w+")


class WhitespaceTokenizer:
    """One token per whitespace-separated word; ids are stable hashes of the words."""

    name = "whitespace"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [_stable_int(w) % 50_000 for w in text.split()]


class CharTokenizer:
    """One token per non-whitespace character, to exercise cuts inside long words."""

    name = "chars"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text if not c.isspace()]


class HashEmbedder:
    """Deterministic bag-of-words embedder with the `Embedder` interface.

    Each lowercased word maps to a hash-seeded random unit vector; a text is the normalized sum
    of its words' vectors. Texts sharing words are therefore close, which is enough for tests
    that a query finds the chunk it was taken from.
    """

    def __init__(self, dim: int = 32, name: str = "hash-bow"):
        self._dim, self._name = dim, name
        self._cache: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def name(self) -> str:
        return self._name

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _WORD.findall(text.lower()) or [text]
            for w in words:
                out[row] += self._word(w)
            out[row] /= max(float(np.linalg.norm(out[row])), 1e-12)
        return out

    def _word(self, word: str) -> np.ndarray:
        if word not in self._cache:
            rng = np.random.default_rng(_stable_int(word))
            v = rng.standard_normal(self._dim).astype(np.float32)
            self._cache[word] = v / np.linalg.norm(v)
        return self._cache[word]


def _stable_int(s: str) -> int:
    """A hash that, unlike hash(), is the same in every process."""
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")
