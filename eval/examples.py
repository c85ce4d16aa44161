"""An eval example and a dataset of them: what every dataset source (JSONL, LongBench, the
synthetic and pyref generators) produces, and what the runner scores."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    answers: list[str]
    chunks: list[str] | None = None   # None: retrieve from the index
    prompt: str | None = None         # the text after the chunks; None: "Question: {question}"


@dataclass(frozen=True)
class Dataset:
    name: str
    metric: str                       # "f1" or "rougeL": the quality axis of the report
    examples: list[Example]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for ex in self.examples:
            if ex.id in seen:  # a resumed run knows examples by id
                raise ValueError(f"{self.name}: example id {ex.id!r} occurs twice")
            seen.add(ex.id)

    def digest(self) -> str:
        """Identity of the content, so a resumed run never mixes two versions of a dataset."""
        h = hashlib.blake2b(digest_size=12)
        for ex in self.examples:
            h.update(json.dumps(asdict(ex), sort_keys=True, ensure_ascii=False).encode())
        return h.hexdigest()
