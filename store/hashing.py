"""Chunk identity: the key under which a chunk's KV is stored.

A chunk's KV depends on the model (weights, config, dtype), on everything the chunk attended
to (the fixed prefix) and on its own tokens. The hash covers all three, so a KV computed under
any other model, prefix or tokenization is never found, rather than found and silently wrong.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np

# Bump when the encoding below changes: old keys then miss instead of colliding with new ones.
_HASH_VERSION = 1
# blake2b's personalization keeps these digests disjoint from any other blake2b use.
_PERSON = b"ragblend.chunk"

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _ids_bytes(ids: Sequence[int], what: str) -> bytes:
    """Length-prefixed int32 little-endian ids; the length prefix keeps fields unambiguous."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a flat sequence of token ids, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"{what} must hold integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < _INT32_MIN or arr.max() > _INT32_MAX):
        raise ValueError(f"{what} holds an id outside int32")
    return struct.pack("<Q", arr.size) + arr.astype("<i4").tobytes()


def chunk_hash(fingerprint: str, prefix_ids: Sequence[int], chunk_ids: Sequence[int]) -> str:
    """Hex blake2b-256 of (version, fingerprint, prefix ids, chunk ids).

    Every field is length-prefixed, so no two different inputs share an encoding (moving an id
    from the prefix to the chunk, say, changes the hash).
    """
    fp = fingerprint.encode("utf-8")
    h = hashlib.blake2b(digest_size=32, person=_PERSON)
    h.update(struct.pack("<H", _HASH_VERSION))
    h.update(struct.pack("<Q", len(fp)) + fp)
    h.update(_ids_bytes(prefix_ids, "prefix_ids"))
    h.update(_ids_bytes(chunk_ids, "chunk_ids"))
    return h.hexdigest()


# Another personalization: a chunk's KV computed behind other chunks (neighbour-aware entries) can
# never share a digest with its plain entry, nor with the plain entry of any other chunk.
_PERSON_CONTEXT = b"ragblend.ctxkv"


def context_chunk_hash(fingerprint: str, prefix_ids: Sequence[int], context: Sequence[Sequence[int]],
                       chunk_ids: Sequence[int]) -> str:
    """Hex blake2b-256 of (version, fingerprint, prefix ids, each context chunk's ids, chunk ids):
    the key of a chunk's KV computed with `context` (its nearest neighbours, in order) between the
    prefix and itself. Each context chunk is length-prefixed and their count is encoded, so
    ([a, b], c) and ([a], b + c) differ; an empty context is refused (that is the plain key)."""
    if not context:
        raise ValueError("a context key needs at least one context chunk; use chunk_hash")
    fp = fingerprint.encode("utf-8")
    h = hashlib.blake2b(digest_size=32, person=_PERSON_CONTEXT)
    h.update(struct.pack("<H", _HASH_VERSION))
    h.update(struct.pack("<Q", len(fp)) + fp)
    h.update(_ids_bytes(prefix_ids, "prefix_ids"))
    h.update(struct.pack("<Q", len(context)))
    for ids in context:
        h.update(_ids_bytes(ids, "context ids"))
    h.update(_ids_bytes(chunk_ids, "chunk_ids"))
    return h.hexdigest()
