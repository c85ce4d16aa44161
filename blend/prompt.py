"""Prompt layout `[prefix] [chunk 1] … [chunk k] [suffix]`, built from the model's chat template.

The prefix (template head + system instruction) is identical for every request of a model, so its
KV is exact and computed once. Each chunk is tokenized on its own, so its token ids — and hence its
cached KV — do not depend on its neighbours. The suffix (question + template tail) is always fresh.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

DEFAULT_SYSTEM = ("You answer questions using the documents given by the user. "
                  "Answer briefly, using only facts from the documents.")
CHUNK_SEPARATOR = "\n\n"
_SENTINEL = "\x00RAGBLEND_USER\x00"


@dataclass(frozen=True)
class Layout:
    """Token ids of one prompt, split into its parts, with every part's start position."""
    prefix: list[int]
    chunks: list[list[int]]
    suffix: list[int]
    chunk_starts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if not self.suffix:
            raise ValueError("the suffix (question) must hold at least one token")
        starts, pos = [], len(self.prefix)
        for ids in self.chunks:
            if not ids:
                raise ValueError("a chunk must hold at least one token")
            starts.append(pos)
            pos += len(ids)
        object.__setattr__(self, "chunk_starts", starts)

    @property
    def n_prefix(self) -> int:
        return len(self.prefix)

    @property
    def n_chunk_tokens(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def suffix_start(self) -> int:
        return self.n_prefix + self.n_chunk_tokens

    @property
    def n_tokens(self) -> int:
        return self.suffix_start + len(self.suffix)

    def ids(self) -> list[int]:
        return self.prefix + [t for c in self.chunks for t in c] + self.suffix


class PromptBuilder:
    """Splits the chat template around the user turn: head → prefix, tail → after the question."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system: str = DEFAULT_SYSTEM):
        self.tokenizer = tokenizer
        if tokenizer.chat_template:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": _SENTINEL}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            head, tail = text.split(_SENTINEL)
        else:
            head, tail = f"{system}\n\n", "\nAnswer:"
        self.prefix_text, self.tail_text = head, tail
        self.prefix_ids = self.encode(head)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def chunk_ids(self, text: str) -> list[int]:
        return self.encode(text.strip() + CHUNK_SEPARATOR)

    def suffix_ids(self, question: str) -> list[int]:
        return self.encode(f"Question: {question.strip()}{self.tail_text}")

    def layout(self, question: str, chunks: list[str] | list[list[int]]) -> Layout:
        ids = [c if isinstance(c, list) else self.chunk_ids(c) for c in chunks]
        return Layout(self.prefix_ids, ids, self.suffix_ids(question))
