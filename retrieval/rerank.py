"""An optional cross-encoder reranker: sentence-transformers' `CrossEncoder` loaded from a local
directory (nothing is downloaded), scoring each (question, passage) pair jointly. It reorders
the fused candidates of a search (retrieval/search.py); it is slower than the bi-encoder, so it
sees only those, never the corpus."""
from __future__ import annotations

from pathlib import Path

import numpy as np


class CrossEncoderReranker:
    def __init__(self, path: str | Path, device: str = "cpu"):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no cross-encoder in {path} (a directory with config.json, the weights and "
                                    "a tokenizer, as CrossEncoder.save writes it)")
        from sentence_transformers import CrossEncoder

        self.path = path
        self.model = CrossEncoder(str(path), device=device, local_files_only=True)

    def scores(self, query: str, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.float32)
        out = self.model.predict([(query, t) for t in texts], show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)[:, -1]

    def rank(self, query: str, texts: list[str], ids: list[int]) -> list[int]:
        """`ids` (one per text) from the most to the least relevant."""
        order = np.argsort(-self.scores(query, texts), kind="stable")
        return [ids[i] for i in order]
