"""Named model shapes, so tests and benchmarks build random-weight models of real architectures.

Timing does not depend on weight values, so a random-weight model of a real shape measures what
the real model would; correctness tests use the `tiny-*` shapes, one per supported architecture.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from blend.prompt import Layout
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config

_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}

_TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=512, max_position_embeddings=4096)


@dataclass(frozen=True)
class Shape:
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None  # "default": the bundled SmolLM2 tokenizer (vocab must match)

    def config(self) -> PretrainedConfig:
        return _CONFIGS[self.arch](**self.kwargs)


SHAPES: dict[str, Shape] = {
    "tiny": Shape("llama", dict(_TINY, rope_theta=10000.0)),
    "tiny-llama": Shape("llama", dict(_TINY, rope_theta=10000.0)),
    "tiny-mistral": Shape("mistral", dict(_TINY, rope_theta=1e6, sliding_window=None, head_dim=16)),
    "tiny-qwen2": Shape("qwen2", dict(_TINY, rope_theta=1e6)),
    "tiny-qwen3": Shape("qwen3", dict(_TINY, rope_theta=1e6, head_dim=32)),
    # Deep enough for several check layers with layers between them (gradual filtering).
    "tiny-deep": Shape("llama", dict(_TINY, num_hidden_layers=10, rope_theta=10000.0)),
    # A tiny model that speaks the bundled tokenizer: the whole service in seconds, for tests.
    "tiny-smol": Shape("llama", dict(_TINY, vocab_size=49152, rope_theta=1e5, tie_word_embeddings=True),
                       tokenizer="default"),
    "mistral-7b": Shape("mistral", dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=32768, rope_theta=1e6, sliding_window=None,
        max_position_embeddings=32768, head_dim=128)),
    # The mistral-7b shape speaking the bundled SmolLM2 tokenizer: its vocabulary (49152 rows of
    # embedding and LM head, not mistral's 32768) is the tokenizer's, so any text it encodes is a
    # valid input. `ragblend serve` can then be load-tested over HTTP with 7B timing, offline.
    "mistral-7b-smol": Shape("mistral", dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=49152, rope_theta=1e6, sliding_window=None,
        max_position_embeddings=32768, head_dim=128), tokenizer="default"),
    "llama-3.1-8b": Shape("llama", dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072, rope_theta=5e5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "qwen2.5-7b": Shape("qwen2", dict(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, rope_theta=1e6, max_position_embeddings=32768)),
}

TINY_ARCHS = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3")


def random_model(shape: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int = 0, std: float | None = None) -> torch.nn.Module:
    """A causal LM of a named shape with seeded random weights, built directly on `device`."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    config = SHAPES[shape].config()
    if std is not None:
        config.initializer_range = std
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model._ragblend_identity = f"random:{shape}:seed={seed}"
    return model.eval()


def random_layout(vocab: int, n_chunks: int, chunk_tokens: int, question_tokens: int,
                  prefix_tokens: int = 32, seed: int = 0) -> Layout:
    """A prompt of random token ids of the given sizes: timing does not depend on the text."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(10, vocab, (n,), generator=g).tolist()  # noqa: E731
    return Layout(ids(prefix_tokens), [ids(chunk_tokens) for _ in range(n_chunks)], ids(question_tokens))
