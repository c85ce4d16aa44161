"""What the OpenAI routes (chat and completions) need beyond /v1/query, all on the API side of the
engine:

- **the conversation in the prompt.** System (and developer) messages and the earlier turns go
  into the question part of the prompt, after the chunks: `[head][chunk 1]…[chunk k][instructions,
  conversation so far, question, template tail]`. The head and the chunks are the ones every
  other query has, so each chunk's cached KV stays valid. Retrieval reads the last two user
  messages (a follow-up like "where was she born?" needs the one before).
- **fields it cannot honour are refused** (400 naming the field), never dropped; an unknown
  `model` is a 404 `model_not_found`.
- **`stop` sequences**, cut from the streamed text; the generation is cancelled at once, which
  frees its decode slot. A cut answer's usage counts the prompt and the kept text's tokens; it has
  no `prompt_tokens_details` (the prefill's counts come with a generation that ends by itself).
- **`logprobs`**: the first token's from the engine's own first-token distribution (the blended
  prefill's, in blend mode); the later tokens' from one teacher-forced pass of the model over the
  prompt and the answer with full attention, after the answer: side work queued in the model's
  loop (blend/scheduler.py), run whole in its turn between two decode steps.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from api.answering import EMPTY_INDEX, enqueue, finish_reason, pieces, question_token_limit, retrieve
from api.errors import ApiError
from api.service import RagService
from api.settings import Settings
from api.worker import ModelWorker, QueryJob, QueryParams
from blend.engine import Answer
from blend.prompt import Layout

MODEL_ALIASES = ("ragblend",)  # besides the served model's own name
# OpenAI fields ragblend cannot honour, each with the values that mean "not used".
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "n": (None, 1), "best_of": (None, 1),
    "logit_bias": (None, {}), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "echo": (None, False), "suffix": (None, ""), "web_search_options": (None,),
}
WHY = {"n": "one choice per request", "best_of": "one choice per request",
       "response_format": "no constrained decoding (JSON mode, schemas)"}


def refuse_unsupported(fields: dict) -> None:
    for name, neutral in UNSUPPORTED.items():
        if name in fields and not any(fields[name] == v and type(fields[name]) is type(v) or fields[name] is v
                                      for v in neutral):
            why = WHY.get(name, "not supported")
            raise ApiError(400, f"{name}: ragblend cannot honour it ({why}); leave it out", param=name,
                           code="unsupported_parameter")


def served_name(service: RagService, settings: Settings) -> str:
    """The model's name on the OpenAI surface: --served-model-name, else what --model named."""
    return settings.served_model_name or service.engine.name


def check_model(model: str | None, name: str) -> None:
    """`name`: served_name(...). The engine's own name stays an alias when another is served."""
    if model is not None and model not in (name, *MODEL_ALIASES):
        raise ApiError(404, f"The model {model!r} does not exist: this server serves {name!r} "
                            "(see GET /v1/models)", param="model", code="model_not_found")


def stops_of(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")
    return stops


# -- the conversation --------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompted:
    question: str         # the last user message
    retrieval_query: str  # what retrieval embeds
    question_part: str    # the prompt's part after the chunks, before the template's tail


def text_of(m, where: str) -> str:
    if m.content is None or isinstance(m.content, str):
        return (m.content or "").strip()
    if any(p.type != "text" for p in m.content):
        raise ApiError(400, f"{where}: only text content is supported", param="messages")
    return "\n".join(p.text or "" for p in m.content).strip()


def conversation(messages: list) -> Prompted:
    """The question part of the prompt from OpenAI chat messages."""
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last is None:
        raise ApiError(422, "messages: no user message; the last user message is the question")
    instructions, turns, users = [], [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role in ("tool", "function"):
            raise ApiError(400, f"{where}: role {m.role!r} answers a tool call, and ragblend has no tools",
                           param="messages")
        text = text_of(m, where)
        if m.role in ("system", "developer"):
            if text:
                instructions.append(text)
        elif i > last:
            raise ApiError(400, f"{where}: a {m.role} message after the last user message; the last user message "
                                "is the question ragblend answers", param="messages")
        elif i < last and text:
            turns.append(f"{'User' if m.role == 'user' else 'Assistant'}: {text}")
            if m.role == "user":
                users.append(text)
    question = text_of(messages[last], f"messages[{last}]")
    if not question:
        raise ApiError(422, "messages: the last user message is empty")
    parts = []
    if instructions:
        parts.append("Instructions: " + "\n".join(instructions))
    if turns:
        parts.append("Conversation so far:\n" + "\n".join(turns))
    parts.append(f"Question: {question}")
    return Prompted(question, "\n".join([*users[-1:], question]), "\n\n".join(parts))


def plain(prompt: str) -> Prompted:
    """/v1/completions: the prompt is the question."""
    prompt = prompt.strip()
    if not prompt:
        raise ApiError(422, "prompt: must not be empty", param="prompt")
    return Prompted(prompt, prompt, f"Question: {prompt}")


# -- queueing ----------------------------------------------------------------------------------
async def submit(request: Request, service: RagService, worker: ModelWorker, settings: Settings,
                 params: QueryParams, prompted: Prompted) -> QueryJob:
    """api.answering.submit, with the retrieval query and the prompt's question part apart (that
    one lays out the question alone)."""
    if params.spec.max_tokens > settings.max_tokens:
        raise ApiError(422, f"max_tokens: at most {settings.max_tokens} on this server, got {params.spec.max_tokens}")
    prompts = service.engine.prompts
    limit = question_token_limit(service, settings)
    n = len(prompts.encode(prompted.question_part))
    if n > limit:
        raise ApiError(422, f"messages: the question part of the prompt (instructions, earlier turns, question) is "
                            f"{n} tokens long, at most {limit} allowed (the model's context of "
                            f"{service.engine.max_context} must hold the chunks too)")
    if len(service.corpus) == 0:
        raise ApiError(409, EMPTY_INDEX)

    def prepare():
        retrieved = retrieve(service, prompted.retrieval_query, params)
        # best chunk last, nearest the question, as RagService.layout lays them out
        layout = Layout(prompts.prefix_ids, [prompts.chunk_ids(h.text) for h in reversed(retrieved.hits)],
                        prompts.encode(prompted.question_part + prompts.tail_text))
        return retrieved, layout

    retrieved, layout = await asyncio.to_thread(prepare)
    return enqueue(worker, params, retrieved, layout)


# -- generation with stop sequences ------------------------------------------------------------
@dataclass
class Outcome:
    text: str
    answer: Answer | None   # None when a stop sequence cut the generation
    finish_reason: str


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


async def generate(job: QueryJob, request: Request, stops: list[str], max_tokens: int
                   ) -> AsyncIterator[str | Outcome]:
    """Text deltas safe to send (a possible start of a stop sequence is held back), then the Outcome."""
    hold = max((len(s) for s in stops), default=1) - 1
    text, sent = "", 0
    async for item in pieces(job, request):
        if isinstance(item, Answer):
            final = item.text
            cut = _first_stop(final, stops)
            if cut is not None:
                final = final[:cut]
            if len(final) > sent:
                yield final[sent:]
            yield Outcome(final, item, "stop" if cut is not None else finish_reason(item, max_tokens))
            return
        text += item
        cut = _first_stop(text, stops)
        if cut is not None:
            job.cancel()  # frees its decode slot at the scheduler's next step
            if cut > sent:
                yield text[sent:cut]
            yield Outcome(text[:cut], None, "stop")
            return
        if len(text) - hold > sent:
            yield text[sent:len(text) - hold]
            sent = len(text) - hold


def usage_of(outcome: Outcome, layout: Layout, service: RagService) -> dict:
    from api.routes.query import usage

    if outcome.answer is not None and outcome.answer.text == outcome.text:
        return usage(outcome.answer).model_dump()
    completion = len(service.engine.prompts.encode(outcome.text)) if outcome.text else 0
    return {"prompt_tokens": layout.n_tokens, "completion_tokens": completion,
            "total_tokens": layout.n_tokens + completion}


def token_ids_of(outcome: Outcome, service: RagService) -> list[int]:
    if outcome.answer is not None and outcome.answer.text == outcome.text:
        return list(outcome.answer.token_ids)
    return service.engine.prompts.encode(outcome.text) if outcome.text else []


# -- logprobs ----------------------------------------------------------------------------------
def _scores(service: RagService, layout: Layout, ids: list[int], first_logits):
    import torch

    engine = service.engine
    prompt = layout.ids()
    def teacher_forced():
        with torch.inference_mode():
            x = torch.tensor([prompt + ids], device=engine.device)
            return engine.model(input_ids=x, logits_to_keep=len(ids) + 1).logits[0, :-1].float().cpu()
    logits = engine.run_model(teacher_forced, cost=len(prompt) + len(ids))
    logp = torch.log_softmax(logits, dim=-1)
    if first_logits is not None:  # the engine's own first-token distribution
        logp[0] = torch.log_softmax(first_logits.float().cpu().reshape(-1), dim=-1)
    return logp


async def logprobs(service: RagService, layout: Layout, outcome: Outcome, top: int) -> list[dict]:
    """OpenAI's `logprobs.content`: one entry per answer token, with its `top` alternatives."""
    ids = token_ids_of(outcome, service)
    if not ids:
        return []
    first = outcome.answer.first_logits if outcome.answer is not None and outcome.answer.text == outcome.text else None
    logp = await asyncio.to_thread(_scores, service, layout, ids, first)
    tok = service.engine.tokenizer

    def entry(i: int) -> dict:
        s = tok.decode([i])
        return {"token": s, "bytes": list(s.encode("utf-8")), "logprob": 0.0}

    out = []
    for pos, t in enumerate(ids):
        e = entry(t)
        e["logprob"] = float(logp[pos, t])
        alts = []
        if top:
            vals, idx = logp[pos].topk(top)
            for v, i in zip(vals.tolist(), idx.tolist()):
                a = entry(i)
                a["logprob"] = float(v)
                alts.append(a)
        e["top_logprobs"] = alts
        out.append(e)
    return out
