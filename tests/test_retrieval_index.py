"""VectorIndex: exact and approximate search, removal, persistence."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval import VectorIndex


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_flat_search_returns_exact_top_k():
    data, queries = unit_vectors(500, 16), unit_vectors(20, 16, seed=1)
    ids = np.arange(500, dtype=np.int64) * 3 + 7  # ids need not be positions
    index = VectorIndex(16, "flat")
    index.add(ids, data)
    scores, found = index.search(queries, 10)
    sims = queries @ data.T
    expected = np.argsort(-sims, axis=1)[:, :10]
    np.testing.assert_array_equal(found, ids[expected])
    np.testing.assert_allclose(scores, np.take_along_axis(sims, expected, axis=1), atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_removed_ids_never_come_back_from_search(kind: str):
    data = unit_vectors(300, 16)
    index = VectorIndex(16, kind)
    index.add(np.arange(300), data)
    gone = np.arange(0, 300, 7)  # below the compaction threshold, so hnsw keeps tombstones
    assert index.remove(gone) == len(gone)
    assert index.remove(gone) == 0 and len(index) == 300 - len(gone)
    _, found = index.search(data[gone], 5)
    assert not np.isin(found, gone).any()
    assert (found >= 0).all()  # k live results despite the removed nearest neighbours


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_removed_id_can_be_added_again_with_a_new_vector(kind: str):
    data = unit_vectors(50, 8)
    index = VectorIndex(8, kind)
    index.add(np.arange(50), data)
    index.remove([3])
    index.add([3], data[10:11])
    _, found = index.search(data[3:4], 50)
    assert list(found[0]).count(3) == 1 and len(index) == 50
    assert set(index.search(data[10:11], 2)[1][0]) == {3, 10}


def test_hnsw_compacts_when_tombstones_exceed_a_quarter():
    index = VectorIndex(8, "hnsw")
    index.add(np.arange(100), unit_vectors(100, 8))
    index.remove(np.arange(30))
    assert len(index) == 70 and index._index.ntotal == 70  # rebuilt without the dead vectors


def test_add_rejects_duplicate_ids():
    index = VectorIndex(4)
    index.add([1, 2], unit_vectors(2, 4))
    with pytest.raises(ValueError, match="duplicate"):
        index.add([2], unit_vectors(1, 4))
    with pytest.raises(ValueError, match="dim"):
        index.add([9], unit_vectors(1, 5))


def test_search_fills_missing_slots_with_minus_one():
    index = VectorIndex(4)
    scores, ids = index.search(unit_vectors(2, 4), 3)
    assert (ids == -1).all() and np.isneginf(scores).all()
    index.add([5], unit_vectors(1, 4))
    _, ids = index.search(unit_vectors(1, 4), 3)
    assert ids.tolist() == [[5, -1, -1]]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_save_load_round_trip_keeps_results_tombstones_and_meta(tmp_path: Path, kind: str):
    data, queries = unit_vectors(400, 16), unit_vectors(10, 16, seed=2)
    index = VectorIndex(16, kind, ef_search=80)
    index.add(np.arange(400) + 1000, data)
    index.remove(np.arange(1000, 1040))
    index.meta = {"generation": 12}
    before = index.search(queries, 8)
    index.save(tmp_path / "i.bin")
    loaded = VectorIndex.load(tmp_path / "i.bin")
    assert (loaded.kind, loaded.dim, loaded.ef_search, len(loaded), loaded.meta) == (kind, 16, 80, 360, {"generation": 12})
    after = loaded.search(queries, 8)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0])
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away


def test_load_rejects_a_corrupt_file(tmp_path: Path):
    index = VectorIndex(8)
    index.add(np.arange(20), unit_vectors(20, 8))
    index.save(tmp_path / "i.bin")
    raw = bytearray((tmp_path / "i.bin").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "i.bin").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        VectorIndex.load(tmp_path / "i.bin")
    (tmp_path / "i.bin").write_bytes(bytes(raw[:30]))
    with pytest.raises(ValueError):
        VectorIndex.load(tmp_path / "i.bin")


def test_hnsw_recall_at_10_against_flat_is_above_0_9():
    data, queries = unit_vectors(5000, 64), unit_vectors(200, 64, seed=3)
    flat, hnsw = VectorIndex(64, "flat"), VectorIndex(64, "hnsw")
    for index in (flat, hnsw):
        index.add(np.arange(5000), data)
    _, truth = flat.search(queries, 10)
    _, approx = hnsw.search(queries, 10)
    recall = np.mean([len(set(t) & set(a)) / 10 for t, a in zip(truth, approx)])
    assert recall > 0.9, recall
