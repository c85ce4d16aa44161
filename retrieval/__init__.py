"""Text → chunks → vectors → chunk ids. Nothing outside this package sees FAISS or SQL."""
from .chunking import Chunk, chunk_text
from .corpus import Corpus, Hit, content_hash
from .embed import Embedder, default_embedder_path
from .index import VectorIndex
from .loaders import Document, load_path
from .registry import Registry

__all__ = [
    "Chunk", "chunk_text", "Corpus", "Hit", "content_hash", "Embedder", "default_embedder_path",
    "VectorIndex", "Document", "load_path", "Registry",
]
