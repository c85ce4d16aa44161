"""Eval datasets: ragblend's JSONL, LongBench-format files kept locally, and the synthetic generator.

`--dataset` takes a file or a name:
- a `.jsonl` file of `{"id", "question", "answers": [...], "chunks": [...]}` lines (`chunks`
  optional: such an example retrieves from the index; `prompt` optional: the text after the chunks
  in place of "Question: {question}"), or of LongBench lines (`input`, `context`, `answers`,
  `_id`/`id`, `dataset`), recognized by their `context` field;
- `2wikimqa`, `musique`, `samsum`, `multi_news`: `<data-dir>/<name>.jsonl` or
  `<data-dir>/longbench/<name>.jsonl`;
- `synthetic` or `synthetic:n=60,chunks=6,chunk_words=90,seed=0` (see eval/synthetic.py);
- `pyref` or `pyref:n=40,chunks=6,chunk_words=150,seed=0`: real reference prose (eval/pyref.py).
"""
from __future__ import annotations

import re
from pathlib import Path

from eval.examples import Dataset, Example
from retrieval.loaders import jsonl_objects

LONGBENCH = ("2wikimqa", "musique", "samsum", "multi_news")

# The part of LongBench's dataset2prompt template after {context}, which becomes the prompt's suffix.
# The part before {context} is an instruction the QA and news templates restate after it; samsum's
# is not restated, so it leads that suffix. ragblend's prefix stays the engine's system prompt,
# shared by every request, so its KV is exact and computed once.
_QA = ("Answer the question based on the given passages. Only give me the answer and do not output "
       "any other words.\n\nQuestion: {input}\nAnswer:")
LONGBENCH_PROMPTS = {
    "2wikimqa": _QA,
    "musique": _QA,
    "samsum": "Summarize the dialogue into a few short sentences, as in the examples above.\n\n{input}",
    "multi_news": "Now, write a one-page summary of all the news.\n\nSummary:",
}
LONGBENCH_METRIC = {"2wikimqa": "f1", "musique": "f1", "samsum": "rougeL", "multi_news": "rougeL"}
_PASSAGE = re.compile(r"^\s*Passage \d+:\s*$", re.MULTILINE)


def load_dataset(spec: str, data_dir: str | Path | None = None, *, chunk_words: int = 200) -> Dataset:
    """`chunk_words`: the most words per chunk when a LongBench context is cut on paragraphs."""
    name, _, options = spec.partition(":")
    if name == "synthetic":
        from eval.synthetic import OPTIONS, generate
        opts = parse_options(options)
        if unknown := set(opts) - set(OPTIONS):
            raise ValueError(f"unknown synthetic option(s) {', '.join(sorted(unknown))}; known: {', '.join(OPTIONS)}")
        return Dataset(spec, "f1", generate(**opts))
    if name == "pyref":
        from eval import pyref
        opts = parse_options(options)
        if unknown := set(opts) - set(pyref.OPTIONS):
            raise ValueError(f"unknown pyref option(s) {', '.join(sorted(unknown))}; known: {', '.join(pyref.OPTIONS)}")
        return Dataset(spec, "rougeL", pyref.generate(**opts))
    path = Path(spec).expanduser()
    if not path.exists() and spec in LONGBENCH:
        path = _longbench_file(spec, data_dir)
    if not path.is_file():
        known = ", ".join(("synthetic", "pyref") + LONGBENCH)
        raise ValueError(f"unknown dataset {spec!r}: not a file, and not one of {known}")
    rows = _read_jsonl(path)
    if rows and "context" in rows[0]:
        kind = _longbench_kind(rows[0].get("dataset") or path.stem)
        return Dataset(kind, LONGBENCH_METRIC[kind],
                       [longbench_example(r, kind, chunk_words, f"{path}:{n}") for n, r in enumerate(rows, 1)])
    return Dataset(path.stem, "f1", [_example(r, f"{path}:{n}") for n, r in enumerate(rows, 1)])


def parse_options(text: str) -> dict[str, int]:
    """`n=60,chunks=6` → {"n": 60, "chunks": 6}; values are integers."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"dataset option {item!r} is not key=integer")
        out[key.strip()] = int(value)
    return out


def _longbench_file(name: str, data_dir: str | Path | None) -> Path:
    if data_dir is not None:
        for path in (Path(data_dir) / f"{name}.jsonl", Path(data_dir) / "longbench" / f"{name}.jsonl"):
            if path.is_file():
                return path
    raise ValueError(f"dataset {name!r} is a LongBench file kept locally: pass its path, or --data-dir "
                     f"holding {name}.jsonl or longbench/{name}.jsonl")


def _longbench_kind(name: str) -> str:
    kind = name.removesuffix("_e")  # LongBench-E files name the same tasks with a suffix
    if kind not in LONGBENCH:
        raise ValueError(f"LongBench dataset {name!r} is not supported; supported: {', '.join(LONGBENCH)}")
    return kind


def _read_jsonl(path: Path) -> list[dict]:
    rows = [row for _, row in jsonl_objects(path.read_text(encoding="utf-8"), str(path))]
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


def _strings(value, what: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValueError(f"{where}: {what} must be a list of strings")
    return value


def _example(row: dict, where: str) -> Example:
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        raise ValueError(f'{where}: "question" must be a non-empty string')
    chunks = row.get("chunks")
    if chunks is not None:
        chunks = [c for c in _strings(chunks, '"chunks"', where) if c.strip()]
        if not chunks:
            raise ValueError(f'{where}: "chunks" holds no text')
    prompt = row.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError(f'{where}: "prompt" must be a non-empty string')
    return Example(str(row.get("id", where)), row["question"], _strings(row.get("answers"), '"answers"', where),
                   chunks, prompt)


def longbench_example(row: dict, kind: str, chunk_words: int, where: str = "") -> Example:
    context, question = row.get("context"), row.get("input", "")
    if not isinstance(context, str) or not isinstance(question, str):
        raise ValueError(f'{where}: "context" and "input" must be strings')
    if kind in ("2wikimqa", "musique"):
        chunks = split_passages(context)
    else:
        chunks = pack_paragraphs(context, chunk_words)
    if not chunks:
        raise ValueError(f"{where}: empty context")
    return Example(str(row.get("_id", row.get("id", where))), question,
                   _strings(row.get("answers"), '"answers"', where), chunks,
                   LONGBENCH_PROMPTS[kind].format(input=question.strip()))


def split_passages(context: str) -> list[str]:
    """LongBench's multi-doc QA contexts number their passages ("Passage 1:" on its own line); each
    passage is a chunk, without its number, so that its KV does not depend on where it was ranked."""
    parts = _PASSAGE.split(context)
    return [p.strip() for p in parts if p.strip()]


def pack_paragraphs(context: str, max_words: int) -> list[str]:
    """Paragraphs (blank-line separated) packed greedily into chunks of at most `max_words` words;
    a longer paragraph is cut at line, then word, boundaries. A context numbered in passages
    ("Passage N:") never has two passages share a chunk."""
    return [chunk for passage in split_passages(context) for chunk in _pack(passage, max_words)]


def _pack(text: str, max_words: int) -> list[str]:
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        pieces.extend(_cut(para.strip(), max_words))
    chunks: list[str] = []
    words = 0
    for piece in filter(None, pieces):
        n = len(piece.split())
        if chunks and words + n <= max_words:
            chunks[-1] += "\n\n" + piece
            words += n
        else:
            chunks.append(piece)
            words = n
    return chunks


def _cut(text: str, max_words: int) -> list[str]:
    if len(text.split()) <= max_words:
        return [text]
    out: list[str] = []
    for line in text.splitlines():
        words = line.split()
        for i in range(0, len(words), max_words):
            piece = " ".join(words[i:i + max_words])
            if out and len(out[-1].split()) + len(words[i:i + max_words]) <= max_words:
                out[-1] += "\n" + piece
            else:
                out.append(piece)
    return out
