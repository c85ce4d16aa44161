"""Retrieval quality on questions with known answers: hits@1, hits@5 and MRR for dense, BM25,
hybrid (RRF) and, given a local cross-encoder, hybrid + rerank. A question is answered at rank r
when the r-th chunk holds its `contains` phrase (whitespace and case aside), so a passage that
several documents share counts wherever it is found. Prints one table, writes one JSON.

    python -m retrieval.bench_quality PATH... --questions QUESTIONS.jsonl --tokenizer DIR
        [--chunk-tokens 256] [--reranker DIR] [--out results.json]

QUESTIONS.jsonl: `{"question": ..., "contains": "a phrase of the passage that answers it"}` a line.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from retrieval import Corpus, Embedder, chunk_text
from retrieval.loaders import jsonl_objects, load_roots
from retrieval.search import SearchOptions

DEPTH = 10  # ranks looked at: MRR counts a hit past it as 0


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def build(paths: list[Path], data_dir: Path, tokenizer, chunk_tokens: int) -> Corpus:
    corpus = Corpus(data_dir, Embedder())
    with corpus.bulk():
        for doc in load_roots(paths):
            chunks = chunk_text(doc.id, doc.text, tokenizer, chunk_tokens)
            corpus.upsert(doc, chunks, [f"{doc.id}#{c.index}" for c in chunks],
                          corpus.embedder.encode([c.text for c in chunks]), params=f"chunk_tokens={chunk_tokens}")
    return corpus


def rank_of(hits, phrase: str) -> int | None:
    want = _norm(phrase)
    return next((r for r, h in enumerate(hits, 1) if want in _norm(h.text)), None)


def score(corpus: Corpus, questions: list[dict], options: SearchOptions, reranker=None) -> dict:
    ranks = [rank_of(corpus.search(q["question"], DEPTH, options, reranker), q["contains"]) for q in questions]
    return {"hits@1": float(np.mean([r == 1 for r in ranks])),
            "hits@5": float(np.mean([r is not None and r <= 5 for r in ranks])),
            "mrr": float(np.mean([1.0 / r if r else 0.0 for r in ranks])), "ranks": ranks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", type=Path, nargs="+", help="files or directories, read as `ragblend index` reads them")
    ap.add_argument("--questions", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True, help="a Hugging Face tokenizer directory (the LLM's)")
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--reranker", type=Path, help="a local CrossEncoder directory (adds hybrid + rerank)")
    ap.add_argument("--out", type=Path, default=Path("retrieval-quality.json"))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    questions = [obj for _, obj in jsonl_objects(args.questions.read_text(encoding="utf-8"), str(args.questions))]
    modes = {"dense": SearchOptions(retrieval="dense"), "bm25": SearchOptions(retrieval="bm25"),
             "hybrid": SearchOptions(retrieval="hybrid")}
    reranker = None
    if args.reranker:
        from retrieval.rerank import CrossEncoderReranker

        reranker = CrossEncoderReranker(args.reranker)
        modes["hybrid + rerank"] = SearchOptions(retrieval="hybrid", rerank=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = build(args.paths, Path(tmp), tokenizer, args.chunk_tokens)
        n_chunks = len(corpus)
        rows = {name: score(corpus, questions, opts, reranker) for name, opts in modes.items()}
        corpus.close()
    print(f"{len(questions)} questions · {len(args.paths)} paths, {n_chunks} chunks of ≤{args.chunk_tokens} tokens\n")
    print("| retrieval | hits@1 | hits@5 | MRR@10 |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['hits@1']:.3f} | {r['hits@5']:.3f} | {r['mrr']:.3f} |")
    args.out.write_text(json.dumps({"paths": [str(p) for p in args.paths], "questions": str(args.questions),
                                    "chunk_tokens": args.chunk_tokens, "n_chunks": n_chunks, "results": rows},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
