"""Neighbour-aware chunk KV at query time (FusionRAG-style): a chunk whose KV was also computed
behind its nearest neighbours of the corpus (an index option) is served from that entry when the
rule says so, else from its plain entry. The neighbour-aware entry already carries some of the
cross-chunk attention a RAG prompt needs, which plain per-chunk KV lacks.

Rules (measured in README, "Token selection"):
- `always`: the neighbour-aware entry for every chunk that has one;
- `retrieved`: only where at least one of the chunk's neighbours is in the same request (the
  context it was computed with is then partly really there); the plain entry otherwise.
Under either rule the request's first chunk gets its plain entry: right after the prompt head it is
exact there (blend then never spends budget on it), which no entry computed behind others is.

The entry is found by a key that covers its context (store.hashing.context_chunk_hash), so it is
never served for another chunk, nor for this chunk behind other neighbours."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from store.chunkkv import ArrivingKV, ChunkKV, ChunkRef
from store.tiers import Chunk, ChunkKVCache

NEIGHBOUR_RULES = ("always", "retrieved")
DEFAULT_NEIGHBOUR_RULE = "always"
MAX_NEIGHBOURS = 2  # FusionRAG's range; each costs one more chunk's prefill per chunk when indexing

# A chunk's token ids → its neighbours' token ids (nearest first) as recorded at index time, or ().
Neighbours = Callable[[tuple[int, ...]], Sequence[Sequence[int]]]


def check_rule(rule: str) -> str:
    if rule not in NEIGHBOUR_RULES:
        raise ValueError(f"the neighbour rule must be one of {', '.join(NEIGHBOUR_RULES)}, got {rule!r}")
    return rule


class NeighbourKV:
    """A ChunkKVSource over a ChunkKVCache that asks for each chunk's neighbour-aware entry where
    the rule allows it (see the module docstring)."""

    def __init__(self, cache: ChunkKVCache, neighbours: Neighbours, rule: str = DEFAULT_NEIGHBOUR_RULE):
        self.cache, self.neighbours, self.rule = cache, neighbours, check_rule(rule)

    def refs(self, chunks: Sequence[Chunk]) -> list[ChunkRef]:
        """What to ask the cache for: each chunk with its context, or plain."""
        ids = [ChunkRef.of(c).ids for c in chunks]
        present = set(ids)
        out = []
        for i, c in enumerate(ids):
            context = tuple(tuple(int(t) for t in n) for n in self.neighbours(c)) if i else ()
            used = bool(context) and (self.rule == "always" or any(n in present for n in context))
            out.append(ChunkRef(c, context) if used else ChunkRef(c))
        return out

    def fetch(self, chunks: Sequence[Chunk], layers: Sequence[int] | None = None) -> list[ChunkKV] | ArrivingKV:
        return self.cache.fetch(self.refs(chunks), layers)

    def refetch(self, chunks: Sequence[Chunk]) -> list[ChunkKV]:
        return self.cache.refetch(self.refs(chunks))
