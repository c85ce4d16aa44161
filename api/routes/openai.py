"""OpenAI-compatible chat completions and completions (retrieval-augmented) and the model list, so
the official clients and tools built on them can talk to ragblend unchanged (what they add to
/v1/query is api/openai_compat.py's)."""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse

from api import openai_compat as oa
from api.answering import wait_started, while_queued
from api.deps import ServiceDep, SettingsDep, WorkerDep
from api.errors import ApiError
from api.routes.query import INTERNAL, QUERY_ERRORS, chunk_out, query_params, query_response, usage
from api.schemas import (ChatChoice, ChatChoiceMessage, ChatCompletion, ChatRequest, Completion,
                         CompletionChoice, CompletionRequest, ErrorOut, ModelCard, ModelList)
from api.worker import Started
from blend.spec import DEFAULT_MAX_TOKENS
from blend.engine import Answer

router = APIRouter(prefix="/v1", tags=["openai"])
log = logging.getLogger(__name__)
STARTED_AT = int(time.time())


def _chunk(cid: str, model: str, delta: dict, finish: str | None = None, **extra) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


@router.post("/chat/completions", response_model=ChatCompletion, summary="Chat completion (retrieval-augmented)",
             description="OpenAI's chat completions. The last user message is the question; chunks are "
                         "retrieved and blended as in `/v1/query`, tuned by the extra body fields `mode`, "
                         "`ratio` and `top_k`. System messages and earlier turns go into the prompt after the "
                         "chunks (so chunk KV stays reusable). `stop`, `logprobs`/`top_logprobs` and `seed` are "
                         "honoured; `tools`, `response_format`, `n` > 1 and penalties are refused (400); an "
                         "unknown `model` is a 404 `model_not_found`. `stream: true` sends OpenAI's "
                         "`chat.completion.chunk` events and ends with `data: [DONE]`. Greedy unless "
                         "`temperature` is given.",
             responses={**QUERY_ERRORS, 404: {"model": ErrorOut, "description": "no such model"},
                        200: {"content": {"text/event-stream": {}},
                              "description": "a completion, or chunks with `stream: true`"}})
async def chat_completions(body: ChatRequest, request: Request, service: ServiceDep, worker: WorkerDep,
                           settings: SettingsDep):
    oa.refuse_unsupported(body.model_dump(exclude_unset=True))
    oa.check_model(body.model, oa.served_name(service, settings))
    stops = oa.stops_of(body.stop)
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    max_tokens = body.max_completion_tokens or body.max_tokens or min(DEFAULT_MAX_TOKENS, settings.max_tokens)
    prompted = oa.conversation(body.messages)
    params = query_params(body, prompted.question, body.top_k, max_tokens,
                          body.sampling(body.temperature, body.top_p, body.seed), settings)
    job = await oa.submit(request, service, worker, settings, params, prompted)
    # a stream's headers go out once it is queued (SSE comments while it waits for the model)
    started = None if body.stream else await wait_started(job, request)
    cid, model = f"chatcmpl-{uuid.uuid4().hex}", oa.served_name(service, settings)
    want_logprobs = bool(body.logprobs)
    if not body.stream:
        outcome = None
        async for item in oa.generate(job, request, stops, max_tokens):
            outcome = item
        lp = ({"content": await oa.logprobs(service, job.layout, outcome, body.top_logprobs or 0)}
              if want_logprobs else None)
        return ChatCompletion(id=cid, created=int(time.time()), model=model,
                              usage=oa.usage_of(outcome, job.layout, service),
                              choices=[ChatChoice(message=ChatChoiceMessage(content=outcome.text), logprobs=lp,
                                                  finish_reason=outcome.finish_reason)],
                              ragblend=_extras_of(started, outcome, max_tokens))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        nonlocal started
        try:
            async for comment in while_queued(job, request):
                yield comment
            started = job.started
            yield _chunk(cid, model, {"role": "assistant", "content": ""})
            async for item in oa.generate(job, request, stops, max_tokens):
                if isinstance(item, oa.Outcome):
                    if want_logprobs:  # all at once, once the answer is known (see api/openai_compat.py)
                        content = await oa.logprobs(service, job.layout, item, body.top_logprobs or 0)
                        body_ = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                                 "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": None,
                                                              "logprobs": {"content": content}}]}
                        yield f"data: {json.dumps(body_, ensure_ascii=False)}\n\n"
                    yield _chunk(cid, model, {}, item.finish_reason, ragblend=_extras_of(started, item, max_tokens))
                    if include_usage:
                        last = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                                "model": model, "choices": [], "usage": oa.usage_of(item, job.layout, service)}
                        yield f"data: {json.dumps(last)}\n\n"
                else:
                    yield _chunk(cid, model, {"content": item})
        except ApiError as e:
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': 'api_error', 'code': e.status}})}\n\n"
        except Exception:  # a bug of ours after the headers went out: say so, then end the stream cleanly
            log.exception("chat stream failed")
            yield f"data: {json.dumps({'error': {'message': INTERNAL, 'type': 'api_error', 'code': 500}})}\n\n"
        yield "data: [DONE]\n\n"

    return EventSourceResponse(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/completions", response_model=Completion, summary="Completion (OpenAI's legacy route)",
             description="The prompt is the question, answered from the retrieved chunks as in the chat route; "
                         "the same extra fields, refusals and `stop`. `logprobs: N` gives each token's "
                         "log-probability and its N best alternatives. `stream: true` sends `text_completion` "
                         "chunks and ends with `data: [DONE]`.",
             responses={**QUERY_ERRORS, 404: {"model": ErrorOut, "description": "no such model"},
                        200: {"content": {"text/event-stream": {}},
                              "description": "a completion, or chunks with `stream: true`"}})
async def completions(body: CompletionRequest, request: Request, service: ServiceDep, worker: WorkerDep,
                      settings: SettingsDep):
    oa.refuse_unsupported(body.model_dump(exclude_unset=True))
    oa.check_model(body.model, oa.served_name(service, settings))
    stops = oa.stops_of(body.stop)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, "prompt: one prompt per request (a list of one string is taken)", param="prompt")
    max_tokens = body.max_tokens or min(DEFAULT_MAX_TOKENS, settings.max_tokens)
    prompted = oa.plain(prompts[0])
    params = query_params(body, prompted.question, body.top_k, max_tokens,
                          body.sampling(body.temperature, body.top_p, body.seed), settings)
    job = await oa.submit(request, service, worker, settings, params, prompted)
    started = None if body.stream else await wait_started(job, request)  # a stream: headers once queued
    cid, model = f"cmpl-{uuid.uuid4().hex}", oa.served_name(service, settings)

    async def legacy_logprobs(outcome: oa.Outcome) -> dict | None:
        if body.logprobs is None:
            return None
        content = await oa.logprobs(service, job.layout, outcome, body.logprobs)
        offsets, pos = [], 0
        for c in content:
            offsets.append(pos)
            pos += len(c["token"])
        return {"tokens": [c["token"] for c in content], "token_logprobs": [c["logprob"] for c in content],
                "top_logprobs": [{a["token"]: a["logprob"] for a in c["top_logprobs"]} for c in content],
                "text_offset": offsets}

    def chunk(text: str, finish: str | None = None, **extra) -> str:
        b = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": extra.pop("logprobs", None)}],
             **extra}
        return f"data: {json.dumps(b, ensure_ascii=False)}\n\n"

    if not body.stream:
        outcome = None
        async for item in oa.generate(job, request, stops, max_tokens):
            outcome = item
        return Completion(id=cid, created=int(time.time()), model=model, usage=oa.usage_of(outcome, job.layout, service),
                          choices=[CompletionChoice(text=outcome.text, finish_reason=outcome.finish_reason,
                                                    logprobs=await legacy_logprobs(outcome))],
                          ragblend=_extras_of(started, outcome, max_tokens))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        nonlocal started
        try:
            async for comment in while_queued(job, request):
                yield comment
            started = job.started
            async for item in oa.generate(job, request, stops, max_tokens):
                if isinstance(item, oa.Outcome):
                    yield chunk("", item.finish_reason, logprobs=await legacy_logprobs(item),
                                ragblend=_extras_of(started, item, max_tokens))
                    if include_usage:
                        last = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
                                "choices": [], "usage": oa.usage_of(item, job.layout, service)}
                        yield f"data: {json.dumps(last)}\n\n"
                else:
                    yield chunk(item)
        except ApiError as e:
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': 'api_error', 'code': e.status}})}\n\n"
        except Exception:
            log.exception("completion stream failed")
            yield f"data: {json.dumps({'error': {'message': INTERNAL, 'type': 'api_error', 'code': 500}})}\n\n"
        yield "data: [DONE]\n\n"

    return EventSourceResponse(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _extras_of(started: Started, outcome, max_tokens: int) -> dict:
    if outcome.answer is not None and outcome.answer.text == outcome.text:
        return _extras(started, outcome.answer, max_tokens)
    return {"chunks": [chunk_out(h).model_dump() for h in started.hits], "covered": bool(started.hits),
            "timings": {"queue_ms": round(started.queue_ms, 3), "retrieve_ms": round(started.retrieve_ms, 3)},
            "cut_by_stop": True}


def _extras(started: Started, ans: Answer, max_tokens: int) -> dict:
    r = query_response(started, ans, max_tokens)
    keep = ("mode", "ratio", "selection", "recomputed_tokens", "cached_tokens", "covered")
    return {"chunks": [c.model_dump() for c in r.chunks], "timings": r.timings.model_dump(),
            **{k: getattr(r, k) for k in keep}}


@router.get("/models", response_model=ModelList, summary="The served model (OpenAI format)")
def models(service: ServiceDep, settings: SettingsDep) -> ModelList:
    return ModelList(data=[ModelCard(id=oa.served_name(service, settings), created=STARTED_AT)])
