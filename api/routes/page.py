"""The web page at `/`: ask in two modes side by side (streamed), see the sources and timings,
upload a document and follow its job. One static file, no CDN; it calls the same REST API."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["page"])
PAGE = Path(__file__).resolve().parent.parent / "static" / "index.html"


@lru_cache(maxsize=1)
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> HTMLResponse:
    return HTMLResponse(_page())
