"""FAISS inner-product index over unit vectors, keyed by int64 chunk ids.

Kinds:
- "flat": exact search (IndexFlatIP in IndexIDMap2); removal is native.
- "hnsw": approximate search (IndexHNSWFlat, METRIC_INNER_PRODUCT, in IndexIDMap2). HNSW cannot
  remove vectors, so a removed id becomes a tombstone that searches skip through an IDSelector
  (filtered inside the graph walk, so k live results come back without over-fetching). When
  tombstones exceed a quarter of the stored vectors, or a tombstoned id is added again, the
  graph is rebuilt from the live vectors, which keeps memory and search cost bounded.

`save` writes one self-checking file (header, tombstones, serialized FAISS index, CRC32) to a
temporary name and renames it into place, so a reader sees the old file or the new, never half.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import faiss
import numpy as np

KINDS = ("flat", "hnsw")
_MAGIC = b"RBVIDX1\n"
_COMPACT_FRACTION = 0.25


class VectorIndex:
    """Maps chunk ids to vectors; `search` ranks by inner product (= cosine on unit vectors)."""

    def __init__(self, dim: int, kind: str = "flat", *, hnsw_m: int = 32, ef_search: int = 64,
                 ef_construction: int = 40):
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
        self.dim, self.kind = int(dim), kind
        self.hnsw_m, self.ef_search, self.ef_construction = hnsw_m, ef_search, ef_construction
        self.meta: dict = {}  # caller's data saved with the index (e.g. the registry generation)
        self._index = self._new_faiss()
        self._tombstones: set[int] = set()
        self._selector = None  # cached IDSelector over the tombstones; None when there are none
        self._live: set[int] = set()

    def _new_faiss(self) -> faiss.IndexIDMap2:
        if self.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        hnsw = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self.ef_construction
        return faiss.IndexIDMap2(hnsw)

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, chunk_id: int) -> bool:
        return int(chunk_id) in self._live

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Add vectors under new ids; an id that is already present is an error."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0 and len(vecs) == 0:
            return
        vecs = self._as_matrix(vecs)
        if len(ids) != len(vecs):
            raise ValueError(f"{len(ids)} ids for {len(vecs)} vectors")
        id_list = ids.tolist()
        if len(set(id_list)) != len(id_list) or not self._live.isdisjoint(id_list):
            raise ValueError("duplicate ids: remove an id before adding it again")
        if not self._tombstones.isdisjoint(id_list):
            self._compact()  # the dead copy must go before the id can name a new vector
        self._index.add_with_ids(vecs, ids)
        self._live.update(id_list)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids (unknown ids are ignored); returns how many were removed."""
        present = [i for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist() if i in self._live]
        if not present:
            return 0
        self._live.difference_update(present)
        if self.kind == "flat":
            self._index.remove_ids(faiss.IDSelectorBatch(np.array(present, dtype=np.int64)))
        else:
            self._tombstones.update(present)
            if len(self._tombstones) > _COMPACT_FRACTION * self._index.ntotal:
                self._compact()
            else:
                self._refresh_selector()
        return len(present)

    def search(self, vecs: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k per query: (scores [n, k] float32, ids [n, k] int64); missing slots are (-inf, -1).
        `allowed`: only these ids compete (a filter), inside FAISS's search, so the k are the best
        allowed ones on the flat and the HNSW index alike."""
        queries = self._as_matrix(vecs)
        if k <= 0 or len(self._live) == 0 or (allowed is not None and len(allowed) == 0):
            return (np.full((len(queries), max(k, 0)), -np.inf, dtype=np.float32),
                    np.full((len(queries), max(k, 0)), -1, dtype=np.int64))
        selector, keep = self._selector, []
        if allowed is not None:
            batch = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            keep.append(batch)  # the selectors hold raw pointers: keep their operands alive
            selector = batch if selector is None else faiss.IDSelectorAnd(batch, selector)
        params = None
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
        elif selector is not None:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        scores, ids = self._index.search(queries, k, params=params)
        scores[ids < 0] = -np.inf
        if allowed is not None and self.kind == "hnsw":
            live = np.array(sorted(self._live.intersection(allowed.tolist())), dtype=np.int64)
            if (ids >= 0).sum(axis=1).min() < min(k, len(live)):
                # A filter that leaves few ids can cut HNSW's graph walk short: score them exactly.
                return self._exact(queries, k, live)
        return scores, ids

    def _exact(self, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-k over `ids` (live ids of this index)."""
        vecs = np.stack([self._index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, self.dim))
        sims = queries @ vecs.T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out = np.full((len(queries), k), -1, dtype=np.int64)
        n = order.shape[1]
        scores[:, :n] = np.take_along_axis(sims, order, axis=1)
        out[:, :n] = ids[order]
        return scores, out

    def ids(self) -> np.ndarray:
        """All live ids, sorted."""
        return np.array(sorted(self._live), dtype=np.int64)

    def save(self, path: str | Path) -> None:
        """Write atomically: temp file, fsync, rename over `path`."""
        path = Path(path)
        header = json.dumps({"kind": self.kind, "dim": self.dim, "hnsw_m": self.hnsw_m,
                             "ef_search": self.ef_search, "ef_construction": self.ef_construction,
                             "meta": self.meta}).encode()
        tomb = np.array(sorted(self._tombstones), dtype=np.int64).tobytes()
        body = (struct.pack("<QQ", len(header), len(tomb)) + header + tomb
                + faiss.serialize_index(self._index).tobytes())
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(_MAGIC + struct.pack("<I", zlib.crc32(body)) + body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "VectorIndex":
        """Read a file written by `save`; raises ValueError if it is truncated or corrupt."""
        data = Path(path).read_bytes()
        if len(data) < len(_MAGIC) + 20 or not data.startswith(_MAGIC):
            raise ValueError(f"{path}: not a ragblend vector index")
        (crc,) = struct.unpack_from("<I", data, len(_MAGIC))
        body = memoryview(data)[len(_MAGIC) + 4:]
        if zlib.crc32(body) != crc:
            raise ValueError(f"{path}: checksum mismatch (corrupt or truncated)")
        n_header, n_tomb = struct.unpack_from("<QQ", body, 0)
        header = json.loads(bytes(body[16:16 + n_header]))
        tomb = np.frombuffer(body[16 + n_header:16 + n_header + n_tomb], dtype=np.int64)
        raw = np.frombuffer(body[16 + n_header + n_tomb:], dtype=np.uint8)
        index = cls(header["dim"], header["kind"], hnsw_m=header["hnsw_m"],
                    ef_search=header["ef_search"], ef_construction=header["ef_construction"])
        index.meta = header["meta"]
        index._index = faiss.deserialize_index(np.array(raw))  # already downcast; keep the owner
        index._tombstones = set(tomb.tolist())
        index._live = set(faiss.vector_to_array(index._index.id_map).tolist()) - index._tombstones
        index._refresh_selector()
        return index

    def _as_matrix(self, vecs: np.ndarray) -> np.ndarray:
        m = np.ascontiguousarray(vecs, dtype=np.float32)
        if m.ndim == 1:
            m = m.reshape(1, -1)
        if m.ndim != 2 or m.shape[1] != self.dim:
            raise ValueError(f"expected vectors of dim {self.dim}, got shape {np.shape(vecs)}")
        return m

    def _refresh_selector(self) -> None:
        if not self._tombstones:
            self._batch = self._selector = None
            return
        # The Not-selector holds a raw pointer to the batch, so both stay referenced here.
        self._batch = faiss.IDSelectorBatch(np.array(sorted(self._tombstones), dtype=np.int64))
        self._selector = faiss.IDSelectorNot(self._batch)

    def _compact(self) -> None:
        """Rebuild the FAISS index from live vectors only, dropping tombstones."""
        stored_ids = faiss.vector_to_array(self._index.id_map)
        vecs = self._index.index.reconstruct_n(0, self._index.ntotal)
        keep = ~np.isin(stored_ids, np.array(sorted(self._tombstones), dtype=np.int64))
        self._index = self._new_faiss()
        if keep.any():
            self._index.add_with_ids(np.ascontiguousarray(vecs[keep]), np.ascontiguousarray(stored_ids[keep]))
        self._tombstones.clear()
        self._refresh_selector()
