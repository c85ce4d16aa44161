"""The server's one settings object: defaults, overridden by RAGBLEND_* environment variables,
overridden by `ragblend serve` flags; validated once, then passed down (never read as a global)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from blend.spec import CPU_KV_MB, DEFAULT_MAX_RATIO, KV_MEMORY_SHARE, PREFILL_TOKENS, SLOT_TOKENS

MAX_TOKENS_HARD = 8192  # no request may ask for more, whatever the settings say


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="bind address; loopback unless asked otherwise")
    port: int = Field(8000, ge=1, le=65535)
    data_dir: Path | None = Field(None, description="index + KV store (default: $RAGBLEND_DATA or ~/.local/share/ragblend)")
    model: str = "default"
    served_model_name: str | None = Field(None, min_length=1, max_length=256, description=(
        "the model's name on the OpenAI routes (`model` in requests and responses, GET /v1/models); "
        "default: --model's value"))
    kv_store: str | None = Field(None, description="a chunk-KV tier shared by every replica: redis://[user:password@]"
                                                  "host:port/db or rediss:// (TLS); default: the data dir's LMDB alone")
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    chunk_tokens: int = Field(384, ge=16, le=4096, description="chunk size for documents added through the API")
    api_key: SecretStr | None = Field(None, description="when set, every route but /health and the docs needs "
                                                          "`Authorization: Bearer <key>`")
    api_key_file: Path | None = Field(None, description="several keys, one a line (`NAME KEY`), each named in the "
                                                        "logs; read again when it changes, so deleting a line revokes "
                                                        "that key")
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object a line, each with "
                                                                    "the request id and the API key's name")
    max_queue: int = Field(32, ge=1, le=10_000, description="queries waiting for the model; more are refused (503)")
    gpu_tier_mb: int | None = Field(None, ge=0, description="chunk KV kept in device memory (default: a quarter of "
                                    "the free device memory at start; on CPU, 1024 MiB of plain memory; 0: every query "
                                    "reads the store)")
    cpu_tier_mb: int | None = Field(None, ge=0, description="chunk KV kept in pinned host memory, on CUDA (default: a "
                                    "quarter of the available host memory, at most 64 GiB)")
    max_ratio: float = Field(DEFAULT_MAX_RATIO, ge=0.0, le=1.0, description="on a GPU, how far the loading controller "
                             "may raise the recompute ratio of a blend query that names none, while its chunk KV "
                             "streams from disk (0: never)")
    max_batch: int | None = Field(None, ge=1, le=256, description="cap on the queries decoded together in one batched "
                                  "step (1: one at a time; default: as many as the decode memory holds)")
    kv_memory_mb: int | None = Field(None, ge=1, description="decode KV memory, preallocated (default: kv_memory_share "
                                                              f"of the GPU memory left free, {CPU_KV_MB} MiB on CPU)")
    kv_memory_share: float = Field(KV_MEMORY_SHARE, gt=0, le=1, description="share of the GPU memory left once the weights, the "
                                   "prefill's peak and the hot tier are counted that goes to decode KV slots")
    prefill_tokens: int = Field(PREFILL_TOKENS, ge=16, le=1 << 20, description="prefill tokens per scheduler step, "
                                "after every running query's decode step: a longer prompt is spread over steps")
    slot_tokens: int = Field(SLOT_TOKENS, ge=64, le=1 << 20, description="most prompt + answer tokens of one query")
    max_index_jobs: int = Field(64, ge=1, le=10_000, description="indexing jobs waiting; more are refused (503)")
    max_tokens: int = Field(512, ge=1, le=MAX_TOKENS_HARD, description="cap on a request's max_tokens")
    max_question_tokens: int | None = Field(None, ge=1, description="default: a quarter of the model's context")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body limit (413), except document uploads")
    max_upload_bytes: int = Field(8 << 20, ge=1024, description="POST /v1/documents body limit (413)")
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description=(
        "least cosine similarity a chunk needs to be used, unless a request gives its own; with none over it the "
        "answer says the documents do not cover the question (default: no floor)"))
    reranker: Path | None = Field(None, description="a local sentence-transformers CrossEncoder directory: requests "
                                                    "with `rerank: true` reorder their candidates with it")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # connection hygiene (api/connections.py)
    max_connections: int = Field(4096, ge=16, le=1_000_000, description="open client connections; past it the "
                                                                         "oldest one waiting for a request is closed")
    request_timeout_s: float = Field(10.0, gt=0, le=3600, description="a request's head must arrive within it, and "
                                                                       "no part of a request may stall longer")
    keep_alive_s: float = Field(5.0, gt=0, le=3600, description="an idle connection is closed after it")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> "Settings":
        """Defaults < RAGBLEND_<FIELD> variables < `overrides` (None means "not given").

        The data directory keeps its existing variable, RAGBLEND_DATA, read by the service."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            if name == "data_dir":
                continue
            raw = env.get(f"RAGBLEND_{name.upper()}")
            if raw not in (None, ""):
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None

    @property
    def secured(self) -> bool:
        return self.api_key is not None or self.api_key_file is not None

    def key_ring(self):
        """The keys BearerAuth accepts (api/keys.py), or None when the server is open."""
        from api.keys import KeyRing

        if self.api_key_file is not None:
            return KeyRing(path=self.api_key_file)
        return KeyRing(key=self.api_key_value()) if self.api_key else None
