"""`ragblend ARGS…` as the CLI tests run it: the same commands, with the hash bag-of-words
embedder handed in (click's context object), so that no embedding model is loaded. Never part
of the product: it lives with the tests."""
from __future__ import annotations

import sys

from api.cli import app
from retrieval.testing import HashEmbedder

if __name__ == "__main__":
    app(sys.argv[1:], obj={"embedder": HashEmbedder()})
