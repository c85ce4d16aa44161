"""OpenAI-compatible chat completions (retrieval-augmented) and the model list, so the official
clients and tools built on them can talk to ragblend unchanged."""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse

from api.answering import answer, finish_reason, pieces, start
from api.deps import ServiceDep, SettingsDep, WorkerDep
from api.errors import ApiError
from api.routes.query import INTERNAL, QUERY_ERRORS, query_params, query_response, usage
from api.schemas import (ChatChoice, ChatChoiceMessage, ChatCompletion, ChatMessage,
                         ChatRequest, ModelCard, ModelList)
from api.worker import Started
from blend.spec import DEFAULT_MAX_TOKENS, Sampling
from blend.engine import Answer

router = APIRouter(prefix="/v1", tags=["openai"])
log = logging.getLogger(__name__)
STARTED_AT = int(time.time())


def question_of(messages: list[ChatMessage]) -> str:
    """The last user message's text. Earlier turns and system messages are not used: the prompt's
    head is fixed per model so that every chunk's cached KV stays valid behind it."""
    for m in reversed(messages):
        if m.role != "user":
            continue
        if isinstance(m.content, str):
            text = m.content
        else:
            parts = m.content or []
            if any(p.type != "text" for p in parts):
                raise ApiError(400, "messages: only text content is supported")
            text = "\n".join(p.text or "" for p in parts)
        if not text.strip():
            raise ApiError(422, "messages: the last user message is empty")
        return text.strip()
    raise ApiError(422, "messages: no user message; the last user message is the question")


def _chunk(cid: str, model: str, delta: dict, finish: str | None = None, **extra) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


@router.post("/chat/completions", response_model=ChatCompletion, summary="Chat completion (retrieval-augmented)",
             description="OpenAI's chat completions. The last user message is the question; chunks are "
                         "retrieved and blended as in `/v1/query`, tuned by the extra body fields `mode`, "
                         "`ratio` and `top_k`. `stream: true` sends OpenAI's `chat.completion.chunk` events "
                         "and ends with `data: [DONE]`. Greedy unless `temperature` is given.",
             responses={**QUERY_ERRORS, 200: {"content": {"text/event-stream": {}},
                                              "description": "a completion, or chunks with `stream: true`"}})
async def chat_completions(body: ChatRequest, request: Request, service: ServiceDep, worker: WorkerDep,
                           settings: SettingsDep):
    max_tokens = body.max_completion_tokens or body.max_tokens or min(DEFAULT_MAX_TOKENS, settings.max_tokens)
    params = query_params(body, question_of(body.messages), body.top_k, max_tokens,
                          Sampling(body.temperature or 0.0, body.top_p or 1.0, body.seed))
    job, started = await start(request, service, worker, settings, params)
    cid, model = f"chatcmpl-{uuid.uuid4().hex}", service.engine.name
    if not body.stream:
        ans = await answer(job, request)
        return ChatCompletion(id=cid, created=int(time.time()), model=model, usage=usage(ans),
                              choices=[ChatChoice(message=ChatChoiceMessage(content=ans.text),
                                                  finish_reason=finish_reason(ans, max_tokens))],
                              ragblend=_extras(started, ans, max_tokens))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        yield _chunk(cid, model, {"role": "assistant", "content": ""})
        try:
            async for item in pieces(job, request):
                if isinstance(item, Answer):
                    yield _chunk(cid, model, {}, finish_reason(item, max_tokens),
                                 ragblend=_extras(started, item, max_tokens))
                    if include_usage:
                        last = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                                "model": model, "choices": [], "usage": usage(item).model_dump()}
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


def _extras(started: Started, ans: Answer, max_tokens: int) -> dict:
    r = query_response(started, ans, max_tokens)
    keep = ("mode", "ratio", "requested_ratio", "selection", "guard_raised", "guard_estimate",
            "recomputed_tokens", "cached_tokens")
    return {"chunks": [c.model_dump() for c in r.chunks], "timings": r.timings.model_dump(),
            **{k: getattr(r, k) for k in keep}}


@router.get("/models", response_model=ModelList, summary="The served model (OpenAI format)")
def models(service: ServiceDep) -> ModelList:
    return ModelList(data=[ModelCard(id=service.engine.name, created=STARTED_AT)])
