"""POST /v1/query: retrieve, blend the chunks' cached KVs, answer; blocking or as server-sent events."""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse

from api.answering import answer, finish_reason, pieces, start, submit, while_queued
from api.deps import ServiceDep, SettingsDep, WorkerDep
from api.errors import ApiError
from api.schemas import (BlendFields, ChunkOut, ErrorOut, PromptTokensDetails, QueryRequest,
                         QueryResponse, Timings, Usage)
from api.worker import QueryParams, Started
from blend.spec import DEFAULT_MAX_TOKENS, QuerySpec, Sampling
from api.settings import Settings
from blend.engine import Answer
from retrieval.corpus import Hit

router = APIRouter(prefix="/v1", tags=["query"])
log = logging.getLogger(__name__)
INTERNAL = "internal server error (logged on the server)"

QUERY_ERRORS = {
    400: {"model": ErrorOut, "description": "the prompt does not fit the model's context"},
    409: {"model": ErrorOut, "description": "the index is empty"},
    413: {"model": ErrorOut, "description": "request body too large"},
    422: {"model": ErrorOut, "description": "a field is invalid (the message names it)"},
    503: {"model": ErrorOut, "description": "the model's queue is full; see Retry-After"},
}
STREAM_DOC = ("With `stream: true` the answer comes as server-sent events: `event: token` with "
              "`{\"text\": piece}` as pieces are decoded, then one `event: done` whose data is the "
              "whole response below (answer, chunks, timings); a failure after the first byte is an "
              "`event: error` with `{\"detail\", \"status\"}`.")


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def query_response(started: Started, ans: Answer, max_tokens: int) -> QueryResponse:
    return QueryResponse(
        answer=ans.text,
        chunks=[chunk_out(h) for h in started.hits], covered=bool(started.hits),
        timings=Timings(queue_ms=round(started.queue_ms, 3), retrieve_ms=round(started.retrieve_ms, 3),
                        kv_load_ms=round(ans.kv_load_ms, 3), prefill_ms=round(ans.prefill_ms, 3),
                        ttft_ms=round(ans.ttft_ms, 3), per_token_ms=round(ans.per_token_ms, 3)),
        mode=ans.mode, ratio=ans.ratio, requested_ratio=ans.requested_ratio, selection=ans.selection,
        recomputed_tokens=ans.recomputed_tokens, cached_tokens=ans.cached_tokens, total_tokens=ans.total_tokens,
        completion_tokens=len(ans.token_ids), finish_reason=finish_reason(ans, max_tokens), usage=usage(ans))


def chunk_out(hit: Hit) -> ChunkOut:
    """A source as the responses show it: the passage, its place in its document, its page."""
    return ChunkOut(doc_id=hit.doc_id, chunk_id=hit.chunk_id, chunk=hit.index + 1, doc_chunks=hit.doc_chunks,
                    page=hit.page, score=round(hit.score, 6), text=hit.text)


def usage(ans: Answer) -> Usage:
    """OpenAI's usage, with the prompt tokens whose KV was reused as `cached_tokens`."""
    return Usage(prompt_tokens=ans.total_tokens, completion_tokens=len(ans.token_ids),
                 total_tokens=ans.total_tokens + len(ans.token_ids),
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=ans.cached_tokens))


def query_params(body: BlendFields, question: str, top_k: int, max_tokens: int, sampling: Sampling,
                 settings: Settings) -> QueryParams:
    """The body's settings as the engine's QuerySpec (their defaults are blend.spec's) and the
    search's options (the server's --min-score unless the body gives one)."""
    return QueryParams(question, top_k, QuerySpec(body.mode, body.blend_config(), sampling, max_tokens),
                       body.search_options(settings.min_score))


@router.post("/query", response_model=QueryResponse, summary="Answer a question from the index",
             description="Retrieves `top_k` chunks, prefills with their cached KVs in `mode` "
                         "(`blend` recomputes `ratio` of the chunk tokens) and decodes. " + STREAM_DOC,
             responses={**QUERY_ERRORS, 200: {"content": {"text/event-stream": {}},
                                              "description": "JSON, or an event stream with `stream: true`"}})
async def query(body: QueryRequest, request: Request, service: ServiceDep, worker: WorkerDep,
                settings: SettingsDep):
    max_tokens = body.max_tokens or min(DEFAULT_MAX_TOKENS, settings.max_tokens)
    params = query_params(body, body.question, body.top_k, max_tokens,
                          body.sampling(body.temperature, body.top_p, body.seed), settings)
    if not body.stream:
        job, started = await start(request, service, worker, settings, params)
        return query_response(started, await answer(job, request), max_tokens)
    # A stream's headers go out once it is queued; while it waits for the model it sends SSE
    # comments, and a failure from then on is an `error` event.
    job = await submit(request, service, worker, settings, params)

    async def events() -> AsyncIterator[str]:
        try:
            async for comment in while_queued(job, request):
                yield comment
            started = job.started
            async for item in pieces(job, request):
                if isinstance(item, Answer):
                    yield sse("done", query_response(started, item, max_tokens).model_dump())
                else:
                    yield sse("token", {"text": item})
        except ApiError as e:
            yield sse("error", {"detail": e.message, "status": e.status})
        except Exception:  # a bug of ours after the headers went out: say so, then end the stream cleanly
            log.exception("query stream failed")
            yield sse("error", {"detail": INTERNAL, "status": 500})

    return EventSourceResponse(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
