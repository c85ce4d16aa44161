"""One example's prompt layout, the same for every mode: from the engine's tokenizer, or — for a
random-weight model without one — from words hashed to token ids, so the whole eval runs on a
tiny model in tests (its answers have no text; agreement is judged on token ids)."""
from __future__ import annotations

import re
import zlib

from blend.engine import Engine
from blend.prompt import DEFAULT_SYSTEM, Layout

from eval.examples import Example

_WORD = re.compile(r"\w+|[^\w\s]")
_RESERVED = 3  # ids below this are left to special tokens


def hashed_ids(text: str, vocab_size: int) -> list[int]:
    """Each word or punctuation mark → a stable id (crc32, not Python's salted hash())."""
    return [_RESERVED + zlib.crc32(w.encode()) % (vocab_size - _RESERVED) for w in _WORD.findall(text)]


def layout_for(engine: Engine, example: Example, chunks: list[str]) -> Layout:
    """`chunks` in the given order; the suffix is the example's `prompt` or "Question: …"."""
    prompts = engine.prompts
    if prompts is None:
        vocab = int(engine.model.config.vocab_size)
        suffix = example.prompt or f"Question: {example.question}\nAnswer:"
        return Layout(hashed_ids(DEFAULT_SYSTEM, vocab), [hashed_ids(c, vocab) for c in chunks],
                      hashed_ids(suffix, vocab))
    if example.prompt is None:
        return engine.layout(example.question, chunks)
    return Layout(prompts.prefix_ids, [prompts.chunk_ids(c) for c in chunks],
                  prompts.encode(example.prompt.strip() + prompts.tail_text))


def fit_to_context(engine: Engine, example: Example, chunks: list[str], max_tokens: int = 0) -> tuple[Layout, int]:
    """The layout with trailing chunks dropped until the prompt and a `max_tokens` answer fit the
    model's context (LongBench cuts long prompts too); returns it and how many chunks were dropped."""
    layout = layout_for(engine, example, chunks)
    keep = len(layout.chunks)
    while keep and layout.n_tokens + max_tokens > engine.max_context:
        keep -= 1
        layout = Layout(layout.prefix, layout.chunks[:keep], layout.suffix)
    if keep == 0:
        raise ValueError(f"example {example.id}: even its first chunk exceeds the model's context "
                         f"of {engine.max_context} tokens")
    return layout, len(chunks) - keep
