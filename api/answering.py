"""The request side of a query, shared by /v1/query and /v1/chat/completions: check what is cheap
to check, queue the job, wait for its events, and cancel it when the client goes away."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import torch
from fastapi import Request

from api.errors import ApiError
from api.service import RagService, Retrieved
from api.settings import Settings
from api.worker import EMPTY_INDEX, Failed, Finished, ModelWorker, QueryJob, QueryParams, QueueFull, Started
from retrieval.search import BadSearch
from blend.engine import Answer
from blend.prompt import Layout

DISCONNECT_POLL_S = 0.5
QUEUED_COMMENT_S = 2.0  # a streamed request waiting for the model sends an SSE comment this often
NOT_COVERED = "The indexed documents do not cover this question"
CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never seen by anyone


def question_token_limit(service: RagService, settings: Settings) -> int:
    # A quarter of the context by default: the rest holds the prefix, the chunks and the answer.
    return settings.max_question_tokens or max(16, service.engine.max_context // 4)


async def start(request: Request, service: RagService, worker: ModelWorker, settings: Settings,
                params: QueryParams) -> tuple[QueryJob, Started]:
    """Queue a query and wait until its prompt is prefilled: every error up to then is an HTTP
    status, since no byte of the response has been sent."""
    job = await submit(request, service, worker, settings, params)
    return job, await wait_started(job, request)


async def submit(request: Request, service: RagService, worker: ModelWorker, settings: Settings,
                 params: QueryParams) -> QueryJob:
    """Check what is cheap to check, retrieve, and queue: errors are HTTP statuses (a full queue
    is 503 + Retry-After)."""
    if params.spec.max_tokens > settings.max_tokens:
        raise ApiError(422, f"max_tokens: at most {settings.max_tokens} on this server, got {params.spec.max_tokens}")
    limit = question_token_limit(service, settings)
    n = len(service.engine.prompts.encode(params.question))
    if n > limit:
        raise ApiError(422, f"question: {n} tokens long, at most {limit} allowed "
                            f"(the model's context of {service.engine.max_context} must hold the chunks too)")
    if len(service.corpus) == 0:
        raise ApiError(409, EMPTY_INDEX)
    # Embedding, search and tokenizing the chunks run off the event loop and off the model thread.
    retrieved, layout = await asyncio.to_thread(prepare, service, params)
    return enqueue(worker, params, retrieved, layout)


def enqueue(worker: ModelWorker, params: QueryParams, retrieved: Retrieved, layout: Layout) -> QueryJob:
    """A retrieved and laid-out query into the worker's queue; a full queue is 503 + Retry-After.
    With no chunk retrieved (none passed min_score or the filter) the job is answered at once
    that the documents do not cover the question: no model call, so nothing the model might
    make up beside sources that do not back it."""
    job = QueryJob(params, asyncio.get_running_loop(), retrieved, layout)
    if not retrieved.hits:
        return not_covered(job)
    try:
        worker.submit(job)
    except QueueFull as e:
        raise ApiError(503, f"the model's queue is full ({worker.max_queue} waiting); retry in {e.retry_after} s",
                       headers={"Retry-After": str(e.retry_after)}) from None
    return job


def not_covered(job: QueryJob) -> QueryJob:
    """The job answered with NOT_COVERED, through the events a served job sends."""
    spec = job.params.spec
    text = not_covered_text(job.params.search.min_score)
    job.emit(Started([], job.retrieved.retrieve_ms, 0.0))
    job.emit(text)
    job.emit(Finished(Answer(text=text, token_ids=[], mode=spec.mode.value, ratio=None, ttft_ms=0.0, kv_load_ms=0.0,
                             prefill_ms=0.0, per_token_ms=0.0, recomputed_tokens=0, total_tokens=0, chunk_tokens=0,
                             first_logits=torch.zeros(0), finish_reason="stop")))
    return job


def not_covered_text(min_score: float | None) -> str:
    floor = f" scored at least {min_score:g}" if min_score is not None else " matched the filter"
    return f"{NOT_COVERED} (no passage{floor}; nothing was generated)."


async def wait_started(job: QueryJob, request: Request) -> Started:
    """The job's Started (also kept as `job.started`), or its error raised."""
    event = await next_event(job, request)
    if isinstance(event, Failed):
        raise event.error
    assert isinstance(event, Started), event
    job.started = event
    return event


async def while_queued(job: QueryJob, request: Request, every_s: float = QUEUED_COMMENT_S) -> AsyncIterator[str]:
    """For a stream whose headers are already out: an SSE comment every `every_s` while the job
    waits for the model (so that clients and proxies see a live connection); once it ends,
    `job.started` is set. Raises the job's error (the caller sends it as an event)."""
    waiting = asyncio.ensure_future(wait_started(job, request))
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=every_s)
            if done:
                waiting.result()  # raises the job's error
                return
            yield ": queued\n\n"
    finally:
        if not waiting.done():
            waiting.cancel()


def prepare(service: RagService, params: QueryParams) -> tuple[Retrieved, Layout]:
    retrieved = retrieve(service, params.question, params)
    return retrieved, service.layout(params.question, retrieved.hits)


def retrieve(service: RagService, query: str, params: QueryParams) -> Retrieved:
    """The chunks for `query`, best first; none (not covered) unless the index is empty (409)."""
    try:
        retrieved = service.retrieve(query, params.top_k, params.search)
    except BadSearch as e:
        raise ApiError(422, str(e)) from None
    if not retrieved.hits and len(service.corpus) == 0:
        raise ApiError(409, EMPTY_INDEX)
    return retrieved


async def next_event(job: QueryJob, request: Request) -> object:
    """The job's next event; cancels the job (and raises) if the client disconnects meanwhile."""
    try:
        while True:
            try:
                return await job.next_event(DISCONNECT_POLL_S)
            except (TimeoutError, asyncio.TimeoutError):
                if await request.is_disconnected():
                    job.cancel()
                    raise ApiError(CLIENT_CLOSED, "the client closed the connection") from None
    except BaseException:  # cancelled (server shutdown, stream torn down) or the above
        job.cancel()
        raise


async def pieces(job: QueryJob, request: Request) -> AsyncIterator[str | Answer]:
    """Text pieces as the worker decodes them, then the final Answer. Leaving early (a closed
    stream) cancels the job; the worker notices before its next token."""
    try:
        while True:
            event = await next_event(job, request)
            if isinstance(event, str):
                yield event
            elif isinstance(event, Finished):
                yield event.answer
                return
            elif isinstance(event, Failed):
                raise event.error
    finally:
        job.cancel()  # no-op once finished; stops the worker if the consumer went away


async def answer(job: QueryJob, request: Request) -> Answer:
    async for item in pieces(job, request):
        if isinstance(item, Answer):
            return item
    raise ApiError(500, "the generation ended without an answer")


def finish_reason(answer: Answer, max_tokens: int) -> str:
    return "length" if len(answer.token_ids) >= max_tokens else "stop"
