"""Request and response bodies of the REST API. The `Field` constraints are the input validation:
a request that breaks one is answered 422 with a message naming the field, before any work."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StringConstraints, field_validator,
                      model_validator)

from api.settings import MAX_TOKENS_HARD
from retrieval.rules import (MAX_ID_CHARS, MAX_METADATA_BYTES, MAX_METADATA_DEPTH, MAX_METADATA_KEYS, id_problem,
                             metadata_problem, text_problem)
from blend.spec import DEFAULT_CHECK_LAYER, DEFAULT_MAX_TOKENS, DEFAULT_RATIO, DEFAULT_SELECTION, MODES, SELECTIONS, BlendConfig

MAX_QUESTION_CHARS = 32_000      # cheap guard before tokenizing; the token limit is the real one
MAX_DOCUMENT_CHARS = 4_000_000   # also bounded by the upload size limit
MAX_TOP_K = 32

Mode = Literal[MODES]
Question = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUESTION_CHARS)]


def _valid_id(value: str) -> str:
    if problem := id_problem(value):
        raise ValueError(problem)
    return value


def _unicode(value: str | None) -> str | None:
    if isinstance(value, str) and (problem := text_problem(value)):
        raise ValueError(problem)
    return value


# Opaque: stored and compared, never joined to a path on the server. Control characters, '.' and
# '..' segments and lone surrogates are refused (retrieval.rules) so that ids print, log and
# encode cleanly.
DocId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS), AfterValidator(_valid_id)]

TopK = Annotated[int, Field(strict=True, ge=1, le=MAX_TOP_K, description="chunks to retrieve")]
Ratio = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False,
                               description="blend: share of chunk tokens recomputed")]
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
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False, description="0 = greedy")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)]


# -- query ------------------------------------------------------------------------------------
class BlendFields(BaseModel):
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
        return BlendConfig.with_checks(self.check_layers or [self.check_layer], ratio=self.ratio,
                                       selection=self.selection or self.deviation or DEFAULT_SELECTION)


class QueryRequest(BlendFields):
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
    doc_id: str
    chunk_id: int
    score: float
    text: str


class Timings(BaseModel):
    queue_ms: float = Field(description="waiting for the model")
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
    chunks: list[ChunkOut]
    timings: Timings
    mode: Mode
    ratio: float | None = Field(description="blend: the share of chunk tokens recomputed")
    selection: Selection | None = None
    recomputed_tokens: int = Field(description="chunk tokens recomputed through every layer")
    cached_tokens: int = Field(0, description="prompt tokens whose KV was reused")
    total_tokens: int = Field(description="prompt tokens")
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    usage: Usage


# -- documents and jobs -----------------------------------------------------------------------
class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"id": "notes-1", "text": "The Halvard Bridge was designed by Mira Solberg.", "metadata": {"lang": "en"}}]})

    id: DocId | None = Field(None, description="opaque id; when absent, `sha256:` + a hash of the text, so the "
                                                "same text sent again is not a duplicate. "
                                                "An existing id is replaced")
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
    report: dict[str, Any] | None = Field(None, description="chunks, tokens, KVs computed, seconds")
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
    status: Literal["ok", "degraded"]
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


class ErrorOut(BaseModel):
    detail: str


# -- OpenAI-compatible --------------------------------------------------------------------------
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Annotated[str | None, AfterValidator(_unicode)] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Annotated[str, AfterValidator(_unicode)] | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


Stop = Annotated[str | list[str] | None, Field(None, description="up to 4 strings; the answer ends before the first")]


class ChatRequest(BlendFields):
    """OpenAI's chat body. Fields ragblend cannot honour (tools, response_format, n > 1,
    penalties, logit_bias, ...) are refused with a 400 naming them (api/openai_compat.py); those
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


class CompletionRequest(BlendFields):
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
