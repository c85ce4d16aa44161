"""Request and response bodies of the REST API. The `Field` constraints are the input validation:
a request that breaks one is answered 422 with a message naming the field, before any work."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StringConstraints, field_validator,
                      model_validator)

from api.errors import ApiError
from api.settings import MAX_TOKENS_HARD
from retrieval.search import DEFAULT_RETRIEVAL, RETRIEVALS, BadSearch, Filter, SearchOptions
from retrieval.rules import (MAX_ID_CHARS, MAX_METADATA_BYTES, MAX_METADATA_DEPTH, MAX_METADATA_KEYS, id_problem,
                             metadata_problem, text_problem)
from blend.spec import (DEFAULT_CHECK_LAYER, DEFAULT_MAX_RATIO, DEFAULT_MAX_TOKENS, DEFAULT_RATIO, DEFAULT_SELECTION,
                        FREQUENCY_PENALTY_RANGE, MAX_REPETITION_PENALTY, MODES, PRESENCE_PENALTY_RANGE, SELECTIONS,
                        BlendConfig, Sampling, temperature_problem, top_p_problem)

MAX_QUESTION_CHARS = 32_000      # cheap guard before tokenizing; the token limit is the real one
MAX_DOCUMENT_CHARS = 4_000_000   # also bounded by the upload size limit
MAX_TOP_K = 32

Mode = Literal[MODES]
Question = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUESTION_CHARS)]


def _valid_id(value: str) -> str:
    if problem := id_problem(value):
        raise ValueError(problem)
    return value


def unencodable_at(value: Any) -> str | None:
    """Where in a parsed JSON value a string (or key) cannot be UTF-8 encoded (a lone surrogate,
    which JSON's `\\ud800` escape allows), as a dotted path; None if nowhere. Iterative: bodies
    may nest as deep as the JSON parser lets them."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if text_problem(v):
                return path
        elif isinstance(v, dict):
            for k, item in v.items():
                sub = f"{path}.{k}" if path else str(k)
                if isinstance(k, str) and text_problem(k):
                    return path or "(a key)"
                stack.append((sub, item))
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in enumerate(v))
    return None


class RequestBody(BaseModel):
    """Every JSON request body: one check, before any field's own, that no text anywhere in it
    (known fields, extra ones, nested parts, keys) holds a lone surrogate. Such text cannot be
    tokenized, stored, logged or sent back as UTF-8, so it is a 422 naming where it is."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if (where := unencodable_at(data)) is not None:
            raise ValueError(f"{where or 'body'}: {text_problem(chr(0xD800))}")
        return data


# Opaque: stored and compared, never joined to a path on the server. Control characters, '.' and
# '..' segments and lone surrogates are refused (retrieval.rules) so that ids print, log and
# encode cleanly.
DocId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS), AfterValidator(_valid_id)]

TopK = Annotated[int, Field(strict=True, ge=1, le=MAX_TOP_K, description="chunks to retrieve")]
Ratio = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False, description=(
    "blend: share of chunk tokens recomputed. Given, it is used as is; left out, the server starts "
    f"from {DEFAULT_RATIO} and, on a GPU, raises it (up to its --max-ratio) as far as the time the chunk "
    "KV takes to stream from disk hides the extra recompute; the ratio used is in the response"))]
MaxTokens = Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS_HARD,
                                 description="answer length cap (the server's --max-tokens caps it further)")]
CheckLayer = Annotated[int, Field(strict=True, ge=0, le=255,
                                  description="blend: the layer where tokens are selected (< the model's layers)")]
Selection = Annotated[Literal[SELECTIONS], Field(
    description=f"blend: how the recomputed tokens are chosen ({', '.join(SELECTIONS)}; blend/select.py)")]
Deviation = Annotated[Literal["value", "key"], Field(
    description="blend: the old name of `selection` (value or key); give one of the two")]
CheckLayers = Annotated[list[Annotated[int, Field(strict=True, ge=0, le=255)]], Field(
    min_length=1, max_length=8, description=(
        "blend: several check layers, increasing (gradual filtering: a wider set at the first, "
        "narrowed at the later ones, the same compute budget); replaces check_layer"))]
def _rule(problem_of):
    """A pydantic check from blend.spec's own rule, so the 422 and the engine agree."""
    def check(value: float) -> float:
        if problem := problem_of(value):
            raise ValueError(problem)
        return value
    return AfterValidator(check)


Temperature = Annotated[float, Field(allow_inf_nan=False, description="0 = greedy, else in [0.001, 2]"),
                        _rule(temperature_problem)]
TopP = Annotated[float, Field(allow_inf_nan=False, description="in [1e-6, 1]"), _rule(top_p_problem)]
Seed = Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)]
FrequencyPenalty = Annotated[float, Field(
    ge=FREQUENCY_PENALTY_RANGE[0], le=FREQUENCY_PENALTY_RANGE[1], allow_inf_nan=False,
    description="OpenAI's: each answer token's logit lowered by this × the times it was generated so far")]
PresencePenalty = Annotated[float, Field(
    ge=PRESENCE_PENALTY_RANGE[0], le=PRESENCE_PENALTY_RANGE[1], allow_inf_nan=False,
    description="OpenAI's: each token already in the answer has its logit lowered by this")]
RepetitionPenalty = Annotated[float, Field(
    gt=0.0, le=MAX_REPETITION_PENALTY, allow_inf_nan=False,
    description="vLLM's: a token of the prompt or the answer has a positive logit divided by this, "
                "a negative one multiplied (1 = off)")]


# -- query ------------------------------------------------------------------------------------
MetaValue = Annotated[str, StringConstraints(max_length=1024)] | int | float | bool


class FilterIn(BaseModel):
    """Which documents a query may draw from; every given condition must hold."""
    model_config = ConfigDict(extra="forbid")
    doc_id: DocId | list[DocId] | None = Field(None, description="a document id, or a list of them (any)")
    doc_prefix: Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)] | None = Field(
        None, description="ids starting with this (`handbook/`)")
    source: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = Field(
        None, description="a glob over the source: the file path for `ragblend index`, `upload:NAME` for uploads")
    metadata: dict[str, MetaValue] = Field(default_factory=dict, max_length=32,
                                           description="key → value, each equal to the document's metadata value")

    def filter(self) -> Filter:
        ids = (self.doc_id,) if isinstance(self.doc_id, str) else tuple(self.doc_id or ())
        return Filter(ids, self.doc_prefix, self.source, dict(self.metadata))


class RetrievalFields(BaseModel):
    """What every query route takes about retrieval (for the OpenAI routes, as `extra_body`)."""
    min_score: float | None = Field(None, ge=-1.0, le=1.0, allow_inf_nan=False, description=(
        "least cosine similarity a chunk needs; when none has it the answer says the documents do not "
        "cover the question, without a model call (default: the server's --min-score)"))
    filter: FilterIn | None = None
    retrieval: Literal[RETRIEVALS] = Field(DEFAULT_RETRIEVAL, description=(
        "dense (embeddings), bm25 (words, SQLite FTS5) or hybrid (both, reciprocal rank fusion)"))
    rerank: StrictBool = Field(False, description="reorder the candidates with the server's cross-encoder "
                                                  "(serve --reranker PATH)")
    mmr: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False, description=(
        "maximal marginal relevance λ: 1 = relevance only, lower = more diverse chunks (default: off)"))

    def search_options(self, default_min_score: float | None) -> SearchOptions:
        try:
            return SearchOptions(self.min_score if self.min_score is not None else default_min_score,
                                 self.filter.filter() if self.filter else Filter(), self.retrieval, self.rerank,
                                 self.mmr)
        except BadSearch as e:
            raise ApiError(422, str(e)) from None


class PenaltyFields(BaseModel):
    """Repetition control, on every query route; absent means off (OpenAI's and vLLM's defaults)."""
    frequency_penalty: FrequencyPenalty | None = None
    presence_penalty: PresencePenalty | None = None
    repetition_penalty: RepetitionPenalty | None = None

    def sampling(self, temperature: float | None, top_p: float | None, seed: int | None) -> Sampling:
        """The engine's Sampling from these fields and the route's own (None: blend.spec's default)."""
        given = {"temperature": temperature, "top_p": top_p, "seed": seed,
                 "frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty,
                 "repetition_penalty": self.repetition_penalty}
        return Sampling(**{k: v for k, v in given.items() if v is not None})


class BlendFields(RequestBody):
    """The prefill settings every query route takes (for the OpenAI route, as `extra_body`)."""
    mode: Mode = Field("blend", description="prefill mode: full, prefix, reuse or blend")
    ratio: Ratio = DEFAULT_RATIO
    check_layer: CheckLayer = DEFAULT_CHECK_LAYER
    selection: Selection | None = Field(None, description=f"default: {DEFAULT_SELECTION}")
    deviation: Deviation | None = None
    check_layers: CheckLayers | None = None

    @model_validator(mode="after")
    def _one_name(self):
        if self.selection is not None and self.deviation is not None:
            raise ValueError("selection: give selection or its old name deviation, not both")
        layers = self.check_layers or []
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"check_layers: must be strictly increasing, got {layers}")
        return self

    def blend_config(self) -> BlendConfig:
        """A ratio the request names is pinned; left out, it is the default, which the server's
        loading controller may raise while the chunk KV streams (blend/loading.py)."""
        pinned = "ratio" in self.model_fields_set
        return BlendConfig.with_checks(self.check_layers or [self.check_layer], ratio=self.ratio,
                                       selection=self.selection or self.deviation or DEFAULT_SELECTION,
                                       max_ratio=None if pinned or self.ratio > DEFAULT_MAX_RATIO else DEFAULT_MAX_RATIO)


class QueryRequest(BlendFields, PenaltyFields, RetrievalFields):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"question": "Who designed the Halvard Bridge?", "top_k": 4, "mode": "blend", "ratio": 0.15,
         "max_tokens": 64, "temperature": 0.0, "stream": False}]})

    question: Question = Field(description="non-empty; its token count is limited (see /health)")
    top_k: TopK = 4
    max_tokens: MaxTokens | None = Field(None, description=f"default: {DEFAULT_MAX_TOKENS}, or the server's cap if lower")
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stream: StrictBool = Field(False, description="server-sent events: `token` events, then one `done` event")


class ChunkOut(BaseModel):
    """A source: the passage the answer was given, and where it is in its document."""
    doc_id: str
    chunk_id: int = Field(description="the registry's id (global, stable)")
    chunk: int = Field(0, description="the chunk's number in its document, from 1")
    doc_chunks: int = Field(0, description="its document's chunk count")
    page: int | None = Field(None, description="PDF: the page the passage starts on")
    score: float = Field(description="cosine similarity to the question")
    text: str


class Timings(BaseModel):
    queue_ms: float = Field(description="waiting for the model: from the request's arrival in the queue until the "
                                        "scheduler takes it (its KV load and prefill are not counted here)")
    retrieve_ms: float
    kv_load_ms: float = Field(description="chunk KVs from the hot tier or LMDB")
    prefill_ms: float
    ttft_ms: float = Field(description="KV load + prefill: time to the first token once the model is free")
    per_token_ms: float


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose KV was reused, not recomputed")


class Usage(BaseModel):
    """OpenAI's usage object; `cached_tokens` counts the prompt tokens served from cached KV."""
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(None, description=(
        "absent only for an OpenAI answer cut by a `stop` sequence (its generation is cancelled at once)"))


class QueryResponse(BaseModel):
    answer: str
    chunks: list[ChunkOut] = Field(description="the sources, best first")
    covered: bool = Field(True, description="false: no chunk passed min_score or the filter, and the answer says "
                                            "so without a model call")
    timings: Timings
    mode: Mode
    ratio: float | None = Field(description="blend: the share of chunk tokens recomputed (above the asked one when "
                                            "the loading controller raised it while the chunk KV streamed)")
    requested_ratio: float | None = Field(None, description="blend: the ratio asked for, or the default")
    selection: Selection | None = None
    recomputed_tokens: int = Field(description="chunk tokens recomputed through every layer")
    cached_tokens: int = Field(0, description="prompt tokens whose KV was reused")
    total_tokens: int = Field(description="prompt tokens")
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    usage: Usage


# -- documents and jobs -----------------------------------------------------------------------
class DocumentIn(RequestBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"id": "notes-1", "text": "The Halvard Bridge was designed by Mira Solberg.", "metadata": {"lang": "en"}}]})

    id: DocId | None = Field(None, description="opaque id; when absent, `sha256:` + a hash of the text, so the "
                                                "same text sent again is not a duplicate (an upload's default is "
                                                "its file name). An existing id is replaced")
    text: Annotated[str, StringConstraints(min_length=1, max_length=MAX_DOCUMENT_CHARS)]
    metadata: dict[str, Any] = Field(default_factory=dict, description=(
        f"a JSON object: at most {MAX_METADATA_DEPTH} levels deep, {MAX_METADATA_KEYS} keys in all and "
        f"{MAX_METADATA_BYTES // 1024} KiB as JSON"))

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, metadata: dict) -> dict:
        if problem := metadata_problem(metadata):
            raise ValueError(problem)
        return metadata

    @field_validator("text")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("text must not be blank")
        return text


JobStatus = Literal["queued", "running", "succeeded", "failed", "interrupted"]


class JobOut(BaseModel):
    job_id: str
    status: JobStatus
    doc_ids: list[str]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    report: dict[str, Any] | None = Field(None, description=(
        "chunks, tokens, KVs computed and deleted, seconds; with the data dir's --neighbours N, the chunks given a "
        "neighbour-aware entry (neighbour_chunks) and those entries computed and deleted"))
    error: str | None = None


class DocumentOut(BaseModel):
    doc_id: str
    source: str | None
    n_chunks: int
    metadata: dict[str, Any]
    updated_at: float


class ChunkInfo(BaseModel):
    chunk_id: int
    index: int
    start: int = Field(description="character offset in the document")
    end: int
    n_tokens: int


class DocumentDetail(DocumentOut):
    chunks: list[ChunkInfo]


class DocumentList(BaseModel):
    documents: list[DocumentOut]
    total: int
    offset: int
    limit: int


class Deleted(BaseModel):
    doc_id: str
    deleted: bool = True


# -- system -----------------------------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok", "warming", "degraded"] = Field(
        description="ok; warming: the model's decode graphs are being captured (requests queue); degraded: the "
                    "model worker has stopped")
    model: str
    model_loaded: bool
    device: str
    max_context: int
    max_question_tokens: int
    index_chunks: int = Field(description="chunks in the index (the index size)")
    queue_depth: int
    max_queue: int
    index_jobs_pending: int
    threads: int = Field(description="CPU threads torch uses (--threads)")
    max_batch: int = Field(description="most queries decoded together: the decode slots memory holds, or the cap")
    prefill_tokens: int = Field(description="prefill tokens per scheduler step")
    shared_kv: dict[str, Any] | None = Field(None, description=(
        "with --kv-store: the shared tier's state. `degraded` while its circuit breaker is open (queries "
        "recompute their chunks instead of waiting on it); the server's `status` then says degraded too"))
    suggested_sampling: dict[str, float] = Field(default_factory=dict, description=(
        "penalties the web page starts from for this model (the bundled one loops without them)"))


class ErrorOut(BaseModel):
    detail: str


# -- OpenAI-compatible --------------------------------------------------------------------------
class ContentPart(RequestBody):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(RequestBody):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class StreamOptions(RequestBody):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


Stop = Annotated[str | list[str] | None, Field(None, description="up to 4 strings; the answer ends before the first")]


class ChatRequest(BlendFields, PenaltyFields, RetrievalFields):
    """OpenAI's chat body. Fields ragblend cannot honour (tools, response_format, n > 1,
    logit_bias, ...) are refused with a 400 naming them (api/openai_compat.py); those
    that change nothing (user, store, metadata, ...) are accepted. `mode`, `ratio` and `top_k` are
    ragblend's own (the client's `extra_body`)."""
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"model": "default", "messages": [{"role": "user", "content": "Who designed the Halvard Bridge?"}],
         "max_tokens": 64, "mode": "blend", "ratio": 0.15, "top_k": 4}]})

    model: str | None = Field(None, description="the served model's name (GET /v1/models) or `ragblend`; "
                                                "another is a 404 model_not_found")
    messages: list[ChatMessage] = Field(min_length=1, max_length=256, description=(
        "the last user message is the question; system messages and earlier turns go into the prompt "
        "after the retrieved chunks"))
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    n: int | None = Field(None, description="one choice only: n > 1 is refused (400)")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    top_k: TopK = 4
    stop: Stop = None
    logprobs: StrictBool | None = Field(None, description="per answer token: its log-probability")
    top_logprobs: int | None = Field(None, strict=True, ge=0, le=20, description="alternatives per token (with logprobs)")


class CompletionRequest(BlendFields, PenaltyFields, RetrievalFields):
    """OpenAI's (legacy) completions: the prompt is the question, answered from the retrieved chunks."""
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | list[str] = Field(description="the question (a list of one string is taken too)")
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    n: int | None = Field(None, description="one choice only: n > 1 is refused (400)")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    top_k: TopK = 4
    stop: Stop = None
    logprobs: int | None = Field(None, strict=True, ge=0, le=5, description="alternatives per token, and each "
                                                                           "token's log-probability")


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]
    logprobs: dict[str, Any] | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: dict[str, Any] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    ragblend: dict[str, Any] = Field(description="retrieved chunks, timings, recomputed tokens")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    ragblend: dict[str, Any] = Field(description="retrieved chunks, timings, recomputed tokens")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ragblend"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
