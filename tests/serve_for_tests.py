"""`ragblend serve FLAGS…` as the API tests run it: the same command, flags and uvicorn server,
with the hash bag-of-words embedder handed in (click's context object), so that no embedding
model is loaded. Never part of the product: it lives with the tests."""
from __future__ import annotations

import sys

from api.cli import app
from retrieval.testing import HashEmbedder

if __name__ == "__main__":
    app(["serve", *sys.argv[1:]], obj={"embedder": HashEmbedder()})
