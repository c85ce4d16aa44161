"""Neighbour-aware chunk KV (FusionRAG-style): a chunk's KV computed behind its nearest
neighbours is its own entry under a key that covers that context, is never served for another
chunk or context, and changes nothing of blend's exactness (r = 1 equals full)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from blend.select import SELECTIONS
from blend.shapes import TINY_ARCHS
from blend.spec import BlendConfig
from retrieval.neighbours import nearest
from store import KVStore
from store.chunkkv import ChunkRef
from store.hashing import chunk_hash, context_chunk_hash
from store.neighbours import NeighbourKV
from store.tiers import ChunkKVCache

from tests.test_blend import make_layout
from tests.test_tiers import PREFIX, SHAPE, Counting, kv_of


def test_the_context_key_differs_from_the_plain_key_and_from_every_other_context():
    c, a, b = [5, 6, 7], [1, 2], [3]
    plain = chunk_hash("fp", PREFIX, c)
    keys = {plain, context_chunk_hash("fp", PREFIX, [a, b], c), context_chunk_hash("fp", PREFIX, [a + b], c),
            context_chunk_hash("fp", PREFIX, [b, a], c), context_chunk_hash("fp", PREFIX, [a], b + c),
            context_chunk_hash("fp", PREFIX, [a], c), context_chunk_hash("fp2", PREFIX, [a], c)}
    assert len(keys) == 7
    # nor does a context key equal the plain key of the context and the chunk laid end to end
    assert context_chunk_hash("fp", PREFIX, [a], c) != chunk_hash("fp", PREFIX + a, c)
    with pytest.raises(ValueError, match="at least one context chunk"):
        context_chunk_hash("fp", PREFIX, [], c)


class InContext:
    """A compute-in-context callback that records its calls; the KV depends on the context."""

    def __init__(self):
        self.calls: list[tuple[list[int], list[int]]] = []

    def __call__(self, ids: list[int], context: list[int]) -> torch.Tensor:
        self.calls.append((list(ids), list(context)))
        return kv_of(list(context) + list(ids))[:, :, :, len(context):] + 1000.0


def test_a_neighbour_aware_entry_is_never_used_for_a_chunk_whose_key_differs(tmp_path):
    store = KVStore(tmp_path / "kv")
    plain, ctx = Counting(), InContext()
    cache = ChunkKVCache(SHAPE, PREFIX, plain, device=torch.device("cpu"), store=store, compute_in_context=ctx)
    c, n1, n2 = (5, 6, 7), (8, 9), (10, 11, 12)
    key, computed = cache.ensure(ChunkRef(c, (n1,)))
    assert computed and ctx.calls == [(list(c), list(n1))] and store.contains(key)
    assert store.get_meta(key)["context_tokens"] == 2 and store.get_meta(key)["position"] == len(PREFIX) + 2
    # the plain chunk is not served the neighbour-aware entry: its own is computed
    got = cache.fetch([list(c)])[0]
    assert plain.calls == [list(c)] and got.start == len(PREFIX) and torch.equal(got.kv, kv_of(list(c)))
    # nor is the chunk behind another neighbour, nor another chunk behind the same one
    other = cache.fetch([ChunkRef(c, (n2,)), ChunkRef((5, 6, 8), (n1,))])
    assert ctx.calls[1:] == [(list(c), list(n2)), ([5, 6, 8], list(n1))]
    assert not torch.equal(other[0].kv, cache.fetch([ChunkRef(c, (n1,))])[0].kv)
    # the exact chunk behind the exact context is read from the store, at the position it had
    fresh = ChunkKVCache(SHAPE, PREFIX, Counting(), device=torch.device("cpu"), store=store,
                         compute_in_context=InContext())
    back = fresh.fetch([ChunkRef(c, (n1,))])[0]
    assert fresh.compute_in_context.calls == [] and fresh.compute.calls == []
    assert back.start == len(PREFIX) + len(n1)
    assert torch.equal(back.kv, kv_of(list(n1) + list(c))[:, :, :, 2:] + 1000.0)


def test_the_rules_ask_for_the_neighbour_entry_always_or_only_with_a_neighbour_retrieved():
    a, b, c, far = (1, 2), (3, 4), (5, 6), (7, 8)
    table = {a: [b], b: [far], c: [b]}
    cache = ChunkKVCache(SHAPE, PREFIX, Counting(), device=torch.device("cpu"))
    # the first chunk, exact right after the prompt head, keeps its plain entry under both rules
    always = NeighbourKV(cache, lambda ids: table.get(ids, []), "always").refs([c, a, b])
    assert always == [ChunkRef(c), ChunkRef(a, (b,)), ChunkRef(b, (far,))]
    retrieved = NeighbourKV(cache, lambda ids: table.get(ids, []), "retrieved").refs([c, a, b])
    assert retrieved == [ChunkRef(c), ChunkRef(a, (b,)), ChunkRef(b)]
    with pytest.raises(ValueError, match="neighbour rule"):
        NeighbourKV(cache, lambda ids: [], "sometimes")


def test_nearest_neighbours_are_the_most_similar_other_chunks_never_itself_or_a_copy():
    emb = np.array([[1, 0], [0.9, 0.1], [0.9, 0.1], [0, 1], [0.6, 0.8]], dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    got = nearest(emb, 2, keys=["a", "b", "b", "d", "e"])
    assert got[0] == [1, 4]        # b once (its copy skipped), then e
    assert got[1] == [0, 4]        # never its own copy (row 2)
    assert got[3] == [4, 1]
    assert nearest(emb, 0) == [[]] * 5


def _neighbour_source(engine, layout, rule="always"):
    """Every chunk of `layout` behind the next one (the last behind a chunk from outside it)."""
    outside = [7, 8, 9, 10]
    table = {tuple(c): [layout.chunks[i + 1] if i + 1 < len(layout.chunks) else outside]
             for i, c in enumerate(layout.chunks)}
    cache = engine.memory_cache(layout)
    return NeighbourKV(cache, lambda ids: table.get(ids, []), rule)


def _run(engine, layout, mode, kv, ratio=1.0, **cfg):
    return engine.prefill(layout, mode, engine.load_chunks(layout, mode, kv), BlendConfig(ratio=ratio, **cfg))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_blend_at_ratio_one_with_neighbour_kv_equals_full(tiny_engines, arch):
    engine = tiny_engines[arch]
    layout = make_layout()
    full = _run(engine, layout, "full", engine.memory_cache(layout))
    kv = _neighbour_source(engine, layout)
    for selection in SELECTIONS:
        for later in ((), (2,)):
            blend = _run(engine, layout, "blend", kv, selection=selection, later_checks=later)
            assert (blend.logits - full.logits).abs().max().item() < 1e-4, (selection, later)
    # the option changes the stale KV: reuse over it is not reuse over the plain entries
    plain = _run(engine, layout, "reuse", engine.memory_cache(layout))
    assert (_run(engine, layout, "reuse", kv).logits - plain.logits).abs().max().item() > 1e-4


def test_a_neighbour_aware_entry_holds_the_chunk_rows_of_a_prefill_behind_its_neighbours(tiny_engines):
    from blend.prefill import compute_kv

    engine = tiny_engines["tiny-llama"]
    layout = make_layout()
    c, n = layout.chunks[2], layout.chunks[1] + layout.chunks[0]
    got = engine.compute_chunk(layout.prefix, c, n)
    whole = compute_kv(engine.parts, engine.prefix_kv(layout.prefix), n + c)
    assert got.start == layout.n_prefix + len(n)
    assert torch.allclose(got.kv, whole[:, :, :, len(n):], atol=1e-6)


@pytest.mark.real  # random:tiny-smol speaks the bundled tokenizer
def test_the_index_option_stores_an_entry_per_chunk_behind_its_neighbours_and_serves_it_by_the_rule(tmp_path):
    from api.index_plan import plan_index
    from api.neighbour_index import build, context_keys, recorded
    from api.service import RagService
    from blend.engine import Engine
    from blend.loader import load_model
    from blend.spec import QuerySpec
    from retrieval import Document
    from retrieval.testing import HashEmbedder

    engine = Engine(load_model("random:tiny-smol"))
    svc = RagService(tmp_path / "data", engine=engine, embedder=HashEmbedder(), chunk_tokens=32,
                     neighbour_rule="always")
    try:
        docs = [Document(f"d{i}", f"The {w} lives in the {p}. " * 6, "api") for i, (w, p) in
                enumerate([("okapi", "forest"), ("heron", "river"), ("ibex", "mountains")])]
        plan = plan_index(svc, docs, neighbours=2)
        assert plan.neighbour_chunks == plan.new_chunks and plan.neighbour_bytes > 0
        assert "each ~3× a chunk's prefill" in plan.describe()
        svc.index_documents(docs)
        before = len(list(svc.store.keys()))
        report = build(svc, 2)
        table = recorded(svc.data_dir)
        n_chunks = svc.corpus.registry.count_chunks()
        assert report["neighbour_entries"] == len(table) == n_chunks and report["neighbour_kv_computed"] == n_chunks
        assert len(list(svc.store.keys())) == before + n_chunks
        assert all(len(v["context"]) == 2 and k not in v["context"] for k, v in table.items())
        assert context_keys(svc.data_dir) <= set(svc.store.keys())
        # an unchanged corpus computes nothing the second time
        assert build(svc, 2)["neighbour_kv_computed"] == 0
        assert svc.load_neighbours()
        hits = svc.retrieve("Where does the heron live?", 3).hits
        layout = svc.layout("Where does the heron live?", hits)
        refs = svc.source.refs(layout.chunks)
        assert not refs[0].context and all(r.context for r in refs[1:])
        assert svc.answer("Where does the heron live?", hits, QuerySpec(max_tokens=2)).run().token_ids
        # turning it off drops the entries
        assert build(svc, 0)["neighbour_kv_deleted"] == n_chunks and len(list(svc.store.keys())) == before
        assert not svc.load_neighbours()
    finally:
        svc.close()


def test_nearest_of_some_rows_is_what_the_full_computation_gives_them():
    rng = np.random.default_rng(7)
    emb = rng.standard_normal((300, 24)).astype(np.float32)
    emb[17] = emb[3]  # an exact tie, broken by index either way
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keys = [str(i) for i in range(300)]
    keys[40] = keys[41]  # the same chunk text twice
    full = nearest(emb, 2, keys=keys)
    rows = [299, 0, 3, 40, 41, 150]
    assert nearest(emb, 2, keys=keys, rows=rows) == [full[r] for r in rows]
    assert nearest(emb, 2, keys=keys, rows=[]) == [] and nearest(emb, 0, rows=[1, 2]) == [[], []]
    with pytest.raises(IndexError):
        nearest(emb, 2, rows=[300])


def animal_doc(doc_id: str, animal: str, place: str, paragraphs: int = 2):
    """One chunk a paragraph at chunk_tokens 32. By the hash embedder a chunk is nearest the same
    sentence about other animals, and the third sentence (only a 3-paragraph document has it)
    nearest its own document's other two: an upload's chunks have neighbours in both."""
    from retrieval import Document

    lines = [f"The {animal} lives in the {place}; the {place} is home to the {animal} all year.",
             f"Every morning the {animal} leaves the {place}, and the {animal} comes back to the {place} at night.",
             f"Old stories say the {animal} found the {place}, and no {animal} ever left the {place} again."]
    return Document(doc_id, "\n\n".join(lines[:paragraphs]), "api")


ANIMALS = [("okapi", "forest"), ("heron", "river"), ("ibex", "mountains"), ("puffin", "cliffs")]


@pytest.mark.real  # random:tiny-smol speaks the bundled tokenizer
def test_a_running_service_serves_the_table_another_process_writes(tmp_path):
    """`ragblend index` run beside a server rewrites neighbours.json (replaced whole, as
    neighbour_index._write does): the server's next query reads the new table, not the one it
    started with — records added, records gone, the file removed — with no restart."""
    import json
    import os

    from api.neighbour_index import NEIGHBOURS_FILE, build, recorded
    from api.service import RagService
    from blend.engine import Engine
    from blend.loader import load_model
    from retrieval.testing import HashEmbedder

    svc = RagService(tmp_path / "data", engine=Engine(load_model("random:tiny-smol")), embedder=HashEmbedder(),
                     chunk_tokens=32, neighbour_rule="always")
    try:
        svc.index_documents([animal_doc(f"d{i}", *a) for i, a in enumerate(ANIMALS[:3])])
        assert svc.neighbours is None
        table_path = svc.data_dir / NEIGHBOURS_FILE
        build(svc, 2)  # writes the table and the entries; the service was not told
        served = svc.neighbours
        hits = svc.retrieve("Where does the heron live?", 3).hits
        refs = svc.source.refs(svc.layout("Where does the heron live?", hits).chunks)
        assert svc.neighbours is not served and svc.neighbours is not None
        assert not refs[0].context and all(r.context for r in refs[1:])  # as in the test above
        # another process un-records one chunk (an atomic replace, like every writer)
        table = recorded(svc.data_dir)
        gone = next(iter(table))
        tmp = svc.data_dir / ".neighbours.other"
        tmp.write_text(json.dumps({k: v for k, v in table.items() if k != gone}))
        os.replace(tmp, table_path)
        assert svc.source.neighbours is svc.neighbours and gone not in svc.neighbours.table
        assert len(svc.neighbours.table) == len(table) - 1
        same = svc.source
        assert svc.source is same  # unchanged on disk: nothing reloaded
        table_path.unlink()
        assert svc.source is svc.kv and svc.neighbours is None
    finally:
        svc.close()


@pytest.mark.real  # random:tiny-smol speaks the bundled tokenizer
def test_an_upload_records_only_its_chunks_and_a_delete_unrecords_every_entry_behind_a_gone_chunk(tmp_path):
    """RagService's upload step (index_neighbours, api/neighbour_index.extend) and forget, in process:
    the REST test below checks the same through a server."""
    from api.datadir import record_index
    from api.neighbour_index import build, context_keys, recorded
    from api.service import IndexReport, RagService
    from blend.engine import Engine
    from blend.loader import load_model
    from retrieval.testing import HashEmbedder

    svc = RagService(tmp_path / "data", engine=Engine(load_model("random:tiny-smol")), embedder=HashEmbedder(),
                     chunk_tokens=32)
    try:
        reg = svc.corpus.registry
        keys_of = lambda doc_id: [c["kv_key"] for c in reg.chunks_of(doc_id)]  # noqa: E731
        svc.index_documents([animal_doc(f"d{i}", *a) for i, a in enumerate(ANIMALS[:3])])
        # N = 0 recorded: the upload step does nothing
        record_index(svc.data_dir, neighbours=0)
        nothing = IndexReport()
        svc.index_neighbours(nothing)
        assert (nothing.neighbour_chunks, nothing.neighbour_kv_computed) == (0, 0) and recorded(svc.data_dir) == {}
        build(svc, 2)
        record_index(svc.data_dir, neighbours=2)
        assert svc.load_neighbours()
        before, n_entries = recorded(svc.data_dir), len(svc.store)
        # an upload: its chunks get entries behind their nearest of the corpus (its own chunks
        # included), every other record is kept as it was, and the running service serves them
        report = IndexReport()
        svc.index_document(animal_doc("d3", *ANIMALS[3], paragraphs=3), report)
        svc.index_neighbours(report)
        table, new = recorded(svc.data_dir), keys_of("d3")
        assert report.neighbour_chunks == report.neighbour_kv_computed == len(new) == 3
        assert {k: v for k, v in table.items() if k not in new} == before
        assert all(len(table[k]["context"]) == 2 and svc.store.contains(table[k]["key"]) for k in new)
        assert any(set(table[k]["context"]) & set(new) for k in new)  # its own chunks are in the pool
        assert len(svc.store) == n_entries + 2 * len(new) and svc.neighbours.table == table
        # again: nothing to compute
        again = IndexReport()
        svc.index_neighbours(again)
        assert (again.neighbour_chunks, again.neighbour_kv_computed, again.neighbour_kv_deleted) == (0, 0, 0)
        # a delete un-records the gone chunks and every chunk computed behind one of them, and
        # drops their entries, before the next upload step gives those chunks new ones
        victim = next(k for k in table if k not in new and any(k in v["context"] for v in table.values()))
        doc_id = next(d["doc_id"] for d in reg.list_documents() if victim in keys_of(d["doc_id"]))
        gone = keys_of(doc_id)
        behind = {k for k, v in table.items() if set(v["context"]) & set(gone)} - set(gone)
        assert behind
        assert svc.delete_document(doc_id)
        after = recorded(svc.data_dir)
        assert not set(after) & (set(gone) | behind)
        assert all(not set(v["context"]) & set(gone) for v in after.values())
        assert svc.neighbours.table == after and not any(svc.store.contains(table[k]["key"]) for k in set(gone) | behind)
        assert context_keys(svc.data_dir) <= set(svc.store.keys())
        refill = IndexReport()
        svc.index_neighbours(refill)
        final = recorded(svc.data_dir)
        assert refill.neighbour_chunks == len(behind) and set(final) == set(svc.corpus.registry.kv_keys_in_use())
        assert all(set(v["context"]) <= set(final) for v in final.values())
        # replacing a document forgets its old chunks the same way
        replaced = IndexReport()
        svc.index_document(animal_doc("d3", "walrus", "ice", paragraphs=2), replaced)
        assert replaced.neighbour_kv_deleted >= 3 and not set(recorded(svc.data_dir)) & set(new)
    finally:
        svc.close()


def _complete(http, question: str) -> dict:
    """A greedy answer over the 3 chunks `question` retrieves, with its first token's top 5 (the
    engine's own distribution: blend's prefill over the served chunk KV)."""
    r = http.post("/v1/completions", json={"prompt": question, "top_k": 3, "max_tokens": 4, "temperature": 0,
                                           "logprobs": 5, "mode": "blend", "ratio": 0.15})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return {"text": choice["text"], "first": choice["logprobs"]["top_logprobs"][0]}


@pytest.mark.real  # random:tiny-smol speaks the bundled tokenizer
@pytest.mark.slow  # two `ragblend index` runs and two servers: ~25 s
def test_an_api_upload_gets_the_neighbour_entries_a_cli_index_gives_its_chunks(tmp_path):
    """A data dir indexed with --neighbours 2, then a document uploaded through the REST API: a
    failed neighbour step records nothing and leaves only entries `store gc` drops; the job that
    succeeds records its chunks' entries and the server serves them at once; and those records
    (so the answers over them) are what `ragblend index` of the same documents gives."""
    from api.neighbour_index import context_keys, recorded, temp_path
    from retrieval.registry import Registry
    from store import KVStore
    from tests.conftest import run_cli
    from tests.test_api import index, launch, wait_job
    from tests.test_hardening import TINY, cli

    old, both = tmp_path / "old", tmp_path / "both"
    for folder, n in ((old, 3), (both, 4)):
        folder.mkdir()
        for i, a in enumerate(ANIMALS[:n]):
            (folder / f"d{i}.txt").write_text(animal_doc("-", *a, paragraphs=3 if i == 3 else 2).text)
    upload = {"id": "d3", "text": (both / "d3.txt").read_text()}
    args = [*TINY, "--chunk-tokens", "32", "--neighbours", "2"]
    A, B = tmp_path / "A" / "data", tmp_path / "B" / "data"
    done = cli("index", str(old), "--data-dir", str(A), *args)
    assert done.returncode == 0, done.stderr
    before = recorded(A)
    question = "Where does the puffin live?"

    def store_keys() -> set[str]:
        with KVStore(A / "kv", readonly=True) as store:
            return set(store.keys())

    def registry_keys(doc_id: str | None = None) -> list[str]:
        reg = Registry(A / "corpus" / "registry.sqlite")
        try:
            return [c["kv_key"] for c in reg.chunks_of(doc_id)] if doc_id else sorted(reg.kv_keys_in_use())
        finally:
            reg.close()

    server = launch(tmp_path / "A")
    try:
        http = server.http
        # (c) the neighbour step fails at its last write (its temp file's path is taken by a directory,
        # as a full disk would fail it): the job fails, neighbours.json is as it was, the document is
        # committed (one commit per document, as ever) and served plain, its computed entries are
        # unreferenced, and `store gc` drops exactly those
        blocker = temp_path(A, server.proc.pid)
        blocker.mkdir()
        failed = wait_job(http, http.post("/v1/documents", json=upload).json()["job_id"])
        assert failed["status"] == "failed" and "neighbour-aware entries" in failed["error"], failed
        assert failed["report"]["neighbour_chunks"] == 0 and recorded(A) == before
        new = registry_keys("d3")
        assert len(new) == 3 and http.get("/v1/documents/d3").json()["n_chunks"] == 3
        unreferenced = store_keys() - set(registry_keys()) - context_keys(A)
        assert len(unreferenced) == 3 and context_keys(A) <= store_keys()
        hits = http.post("/v1/query", json={"question": question, "top_k": 3, "max_tokens": 1}).json()["chunks"]
        assert {h["doc_id"] for h in hits} == {"d3"}  # the query is over the new chunks
        plain = _complete(http, question)
        gc = run_cli("store", "gc", "--data-dir", str(A), "--json")
        assert gc.returncode == 0 and json.loads(gc.stdout)["removed"] == 3, gc.stderr
        assert store_keys() == set(registry_keys()) | context_keys(A)
        blocker.rmdir()
        # (a) submitted again: the document is unchanged, and its chunks get their entries, recorded
        # and in the store; the records of the chunks indexed before are kept as they were
        rep = index(http, **upload)["report"]
        assert rep["unchanged"] == 1 and rep["neighbour_chunks"] == rep["neighbour_kv_computed"] == 3
        table = recorded(A)
        assert set(table) == set(before) | set(new) and {k: table[k] for k in before} == before
        assert {table[k]["key"] for k in new} <= store_keys() and store_keys() == set(registry_keys()) | context_keys(A)
        # served without a restart: the same query, two of its three chunks now neighbour-aware
        served = _complete(http, question)
        assert served["first"] != pytest.approx(plain["first"], abs=1e-4)
    finally:
        server.stop()
    # (b) `ragblend index` of the four documents with the same N records the same entries for the
    # upload's chunks (it found their neighbours in the same corpus, by the same computation), so
    # the answer over them is the same. Its records of the older chunks may differ (a new chunk can
    # be nearer than one of their neighbours): an upload leaves those as they are, by design.
    done = cli("index", str(both), "--data-dir", str(B), *args)
    assert done.returncode == 0, done.stderr
    by_cli = recorded(B)
    assert {k: by_cli[k] for k in new} == {k: table[k] for k in new}
    assert set(by_cli) == set(table)
    server = launch(tmp_path / "B")
    try:
        again = _complete(server.http, question)
    finally:
        server.stop()
    assert again["text"] == served["text"] and again["first"] == pytest.approx(served["first"], abs=1e-5)
