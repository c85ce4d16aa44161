"""What a search asks beyond the question, and the steps between the indexes' candidates and the
k chunks a prompt gets:

- **filters** (`Filter`): by document id or id prefix, source path glob, metadata key = value;
  turned into SQL over the registry's documents, so they apply *before* the top-k cut, on the
  flat and the HNSW index alike (FAISS searches only the allowed ids) and on BM25;
- **retrieval** `dense` (FAISS), `bm25` (SQLite FTS5 over the chunk text) or `hybrid`: both lists
  fused by reciprocal rank fusion (Cormack et al., 2009: score = Σ 1 / (RRF_K + rank));
- **dedupe**: identical chunk text (the same passage in two documents, or a file indexed by the CLI
  and uploaded again) fills one slot;
- **rerank** (optional): a cross-encoder over the fused candidates;
- **MMR** (optional): maximal marginal relevance over the candidates' embeddings;
- **min_score**: a floor on the dense cosine similarity every hit carries, whatever ranked it.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

RETRIEVALS = ("dense", "bm25", "hybrid")
DEFAULT_RETRIEVAL = "dense"
RRF_K = 60            # the constant of the RRF paper, also Elasticsearch's and OpenSearch's default
CANDIDATES_MIN = 20   # each list contributes at least this many candidates before fusion and dedupe
CANDIDATES_PER_K = 4  # ... or this many per slot asked for
_META_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class BadSearch(ValueError):
    """A search the corpus cannot run as asked (the caller's fault); `field` names what to change."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Filter:
    """Documents a search may draw from; every given condition must hold (an empty Filter
    allows all). `doc_ids`: exact ids (any of them); `doc_prefix`: ids that start with it;
    `source`: a glob over the document's source (its file path, `upload:NAME` for uploads);
    `metadata`: key → value, each equal to the document's metadata value (JSON scalars)."""
    doc_ids: tuple[str, ...] = ()
    doc_prefix: str | None = None
    source: str | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in self.metadata.items():
            if not _META_KEY.match(key):
                raise BadSearch("filter", f"metadata key {key!r}: letters, digits, '_', '-' and '.' only (1–64)")
            if not isinstance(value, (str, int, float, bool)):
                raise BadSearch("filter", f"metadata {key!r}: a string, number or boolean, got {value!r}")

    @property
    def empty(self) -> bool:
        return not (self.doc_ids or self.doc_prefix or self.source or self.metadata)

    def sql(self) -> tuple[str, list]:
        """A WHERE condition over `documents d`, and its parameters."""
        terms, args = [], []
        if self.doc_ids:
            terms.append(f"d.doc_id IN ({','.join('?' * len(self.doc_ids))})")
            args += list(self.doc_ids)
        if self.doc_prefix:
            terms.append("substr(d.doc_id, 1, ?) = ?")
            args += [len(self.doc_prefix), self.doc_prefix]
        if self.source:
            terms.append("d.source GLOB ?")
            args.append(self.source)
        for key, value in self.metadata.items():
            terms.append(f"json_extract(d.metadata, '$.\"{key}\"') = ?")
            args.append(value)
        return " AND ".join(terms) or "1", args

    @classmethod
    def parse(cls, pairs: Sequence[str]) -> Filter:
        """`KEY=VALUE` strings (the CLI's `--filter`): doc_id (repeatable), doc_prefix, source, or
        any other key for a metadata value (read as JSON when it parses: 2024, true; else text)."""
        ids, prefix, source, meta = [], None, None, {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise BadSearch("filter", f"expected KEY=VALUE, got {pair!r}")
            if key == "doc_id":
                ids.append(value)
            elif key == "doc_prefix":
                prefix = value
            elif key == "source":
                source = value
            else:
                try:
                    parsed = json.loads(value)
                except ValueError:
                    parsed = value
                meta[key] = parsed if isinstance(parsed, (int, float, bool, str)) else value
        return cls(tuple(ids), prefix, source, meta)


@dataclass(frozen=True)
class SearchOptions:
    """How to search, besides the question and k. `min_score`: the least cosine similarity a hit
    may have (None: no floor); `mmr`: MMR's λ in (0, 1], relevance against novelty (None: off)."""
    min_score: float | None = None
    filter: Filter = field(default_factory=Filter)
    retrieval: str = DEFAULT_RETRIEVAL
    rerank: bool = False
    mmr: float | None = None

    def __post_init__(self) -> None:
        if self.retrieval not in RETRIEVALS:
            raise BadSearch("retrieval", f"must be one of {', '.join(RETRIEVALS)}, got {self.retrieval!r}")
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:
            raise BadSearch("min_score", f"must be in [-1, 1] (a cosine similarity), got {self.min_score}")
        if self.mmr is not None and not 0.0 < self.mmr <= 1.0:
            raise BadSearch("mmr", f"must be in (0, 1], got {self.mmr}")


def candidates_for(k: int) -> int:
    return max(CANDIDATES_MIN, CANDIDATES_PER_K * k)


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[int]:
    """Reciprocal rank fusion of ranked id lists: ids by Σ 1 / (k + rank), rank from 1; ties
    keep the order in which the ids first appear."""
    score: dict[int, float] = {}
    for ranking in rankings:
        for rank, i in enumerate(ranking, 1):
            score[i] = score.get(i, 0.0) + 1.0 / (k + rank)
    return sorted(score, key=lambda i: -score[i])


def text_key(text: str) -> str:
    """What makes two chunks the same passage: their text, whitespace aside."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


def dedupe(ids: Sequence[int], texts: dict[int, str]) -> list[int]:
    """`ids` in order, each passage's first occurrence only."""
    seen, out = set(), []
    for i in ids:
        key = text_key(texts[i])
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out


def mmr_order(query: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> list[int]:
    """Indices into `vectors` (unit rows) picked by maximal marginal relevance: each next pick
    maximizes λ·sim(query) − (1 − λ)·max sim(picked)."""
    relevance = vectors @ query
    picked: list[int] = []
    rest = list(range(len(vectors)))
    while rest and len(picked) < k:
        if picked:
            redundancy = (vectors[rest] @ vectors[picked].T).max(axis=1)
        else:
            redundancy = np.zeros(len(rest))
        best = int(np.argmax(lam * relevance[rest] - (1 - lam) * redundancy))
        picked.append(rest.pop(best))
    return picked


def fts_query(text: str) -> str | None:
    """An FTS5 MATCH expression: any of the text's words, each quoted (so that no word is read
    as FTS5 syntax); None when it has none."""
    words = re.findall(r"\w+", text)
    return " OR ".join('"' + w + '"' for w in dict.fromkeys(words)) or None
