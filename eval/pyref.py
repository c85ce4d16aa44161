"""A real-text QA set nobody here wrote: passages of the Python Language Reference that ship with
every CPython (`pydoc_data.topics`, the text `help("assert")` prints), several per prompt, with a
question about one of them. Technical reference prose, cut on paragraphs; seeded and offline.

Options (as `pyref:n=40,chunks=6,chunk_words=150,seed=0`). The set depends on the Python version's
copy of the reference, so its digest (and a resumed run's guard) does too. The answer is the
target passage's first sentence: on a small model quality is read as closeness to `full`.
"""
from __future__ import annotations

import random
import re

from eval.examples import Example

OPTIONS = ("n", "chunks", "chunk_words", "seed")

_QUESTIONS = ("What does the reference say about {topic}?", "How does {topic} work in Python?",
              "Explain {topic} briefly, using the documents.", "What is {topic} used for?")
_UNDERLINE = re.compile(r"^[*=\-~^]{3,}\s*$")


def _passages(chunk_words: int) -> list[tuple[str, str]]:
    """(heading, text) of every topic at least `chunk_words`/2 words long, cut to `chunk_words`."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        lines = topics[key].strip().splitlines()
        if len(lines) < 3 or not _UNDERLINE.match(lines[1]):
            continue
        heading = lines[0].strip()
        text = "\n".join(lines[2:]).strip()
        kept, words = [], 0
        for para in re.split(r"\n\s*\n", text):
            n = len(para.split())
            if kept and words + n > chunk_words:
                break
            kept.append(para if n <= chunk_words else " ".join(para.split()[:chunk_words]))
            words += min(n, chunk_words)
        if words >= chunk_words // 2:
            out.append((heading, f"{heading}\n\n" + "\n\n".join(kept)))
    return out


def _first_sentence(text: str) -> str:
    body = text.split("\n\n", 1)[-1]
    return re.split(r"(?<=[.:])\s", " ".join(body.split()), maxsplit=1)[0]


def generate(n: int = 40, chunks: int = 6, chunk_words: int = 150, seed: int = 0) -> list[Example]:
    if n < 1 or chunks < 2 or chunk_words < 30:
        raise ValueError("pyref needs n ≥ 1, chunks ≥ 2 and chunk_words ≥ 30")
    passages = _passages(chunk_words)
    if len(passages) < chunks:
        raise ValueError(f"this Python's reference has {len(passages)} passages, fewer than {chunks}")
    out = []
    for i in range(n):
        rng = random.Random(f"ragblend-pyref:{seed}:{i}")
        picked = rng.sample(passages, chunks)
        heading, text = picked[rng.randrange(1, chunks)]  # never the first chunk: its KV is exact
        topic = heading[0].lower() + heading[1:] if not heading.startswith("The ") else "t" + heading[1:]
        question = _QUESTIONS[i % len(_QUESTIONS)].format(topic=topic)
        out.append(Example(f"pyref-{seed}-{i}", question, [_first_sentence(text)], [t for _, t in picked]))
    return out
