"""Turn files on disk into `Document`s.

Loading never crashes on a bad input: a binary file, an encrypted or scanned PDF, a file in
no recognised encoding or a malformed JSONL line is skipped with a warning that names it and its
reason, so one odd file in a large corpus does not stop an indexing run. Inside
`collect_skips()` the skips are also collected, for a command's summary. What a file's text is
(PDF, HTML, DOCX, reStructuredText, plain text of any extension) is `retrieval.formats`'s job.
"""
from __future__ import annotations

import contextvars
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .bounded import BoundedExtractor
from .formats import Unreadable, decode, extract, kind_of
from .rules import id_problem, loads, metadata_problem, text_problem

log = logging.getLogger(__name__)

JSONL_SUFFIXES = {".jsonl"}
_SKIPS: contextvars.ContextVar[list | None] = contextvars.ContextVar("ragblend_skips", default=None)


@contextmanager
def collect_skips() -> Iterator[list[dict]]:
    """Inside it, every file (or JSONL line) the loaders skip is appended to the yielded list as
    `{"path", "reason"}` (and `"line"` for a JSONL line), besides its warning."""
    skips: list[dict] = []
    token = _SKIPS.set(skips)
    try:
        yield skips
    finally:
        _SKIPS.reset(token)


def _skip(file: Path, reason: str, line: int | None = None) -> None:
    if line is None:
        log.warning("skipping %s: %s", file, reason)
    else:
        log.warning("skipping %s line %d: %s", file, line, reason)
    if (skips := _SKIPS.get()) is not None:
        skips.append({"path": str(file), **({} if line is None else {"line": line}), "reason": reason})


@dataclass
class Document:
    """One unit of text the user indexes; `id` is stable across runs so re-indexing is incremental."""

    id: str
    text: str
    source: str
    metadata: dict = field(default_factory=dict)
    pages: tuple[tuple[int, int], ...] = ()  # PDF: (offset, page number) where each page starts


def root_labels(roots: list[Path]) -> list[str]:
    """Each root's name (`projA`), extended by its parents (`a/docs`, `b/docs`) while two
    different roots of the same run would share it: the prefix that keeps their ids apart."""
    parts = [Path(r).resolve().parts for r in roots]
    depth = [1] * len(roots)
    while True:
        labels = ["/".join(p[1:][-d:]) for p, d in zip(parts, depth)]
        grown = False
        for i, label in enumerate(labels):
            others = {parts[j] for j in range(len(parts)) if labels[j] == label and parts[j] != parts[i]}
            if others and depth[i] < len(parts[i]) - 1:
                depth[i] += 1
                grown = True
        if not grown:  # unique now (the same root given twice keeps one label; its files are read once)
            return labels


def load_roots(paths: list[str | Path], follow_outside: bool = False, extractor: BoundedExtractor | None = None,
               exclude: str | Path | None = None) -> Iterator[Document]:
    """The documents under several roots (files or directories), each id prefixed by its root's
    label (`projA/README.md`, `projB/README.md`; a file root's id is its label), so that the
    roots of one run, or of two runs, do not share ids by accident. A file reached twice (a root
    inside another) is read once. Sources are absolute paths. `exclude`: a directory whose files
    are never read (ragblend's own data dir placed inside the corpus), listed once as skipped."""
    roots = [Path(p).resolve() for p in paths]
    seen: set[Path] = set()
    if exclude is not None and (ex := Path(exclude).resolve()).is_dir() and any(
            ex == r or ex.is_relative_to(r) for r in roots):
        seen.update(p.resolve() for p in ex.rglob("*") if p.is_file())
        _skip(ex, "ragblend's data directory (its index and KV store), never indexed")
    with _extractor(extractor) as bounded:
        for root, label in zip(roots, root_labels(roots)):
            yield from load_path(root, label=label, seen=seen, follow_outside=follow_outside, extractor=bounded)


def load_path(path: str | Path, label: str | None = None, seen: set[Path] | None = None,
              follow_outside: bool = False, extractor: BoundedExtractor | None = None) -> Iterator[Document]:
    """Yield the documents in a file, or in every non-hidden file under a directory (recursive, sorted).

    Ids are paths relative to the given root (the bare file name when a single file is given),
    so the same corpus moved elsewhere keeps its ids; with `label`, `label/relative path` (and
    `label` itself for a file). Files in `seen` are skipped, and files read are added to it.
    A file symlink under a directory that resolves outside it is skipped unless `follow_outside`:
    indexing a folder must not read (and make searchable) what lies outside it, such as a link
    to /etc/passwd. Directory symlinks are not descended into at all.
    """
    root = Path(path)
    seen = set() if seen is None else seen
    with _extractor(extractor) as ex:
        if root.is_file():
            if root.resolve() not in seen:
                seen.add(root.resolve())
                yield from _load_file(root, label or root.name, ex)
            return
        if not root.is_dir():
            raise FileNotFoundError(f"no such file or directory: {root}")
        inside = root.resolve()
        # Hidden entries (.git, .DS_Store, editor swap files) are never corpus content.
        files = [p for p in root.rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
        # Sorting on the relative posix path makes the order the same on every platform.
        files.sort(key=lambda p: p.relative_to(root).as_posix())
        for file in files:
            target = file.resolve()
            if not follow_outside and not target.is_relative_to(inside):
                _skip(file, f"a symlink to {target}, outside the indexed folder {inside} "
                            "(--follow-symlinks allows it)")
                continue
            if target in seen:
                continue
            seen.add(target)
            rel = file.relative_to(root).as_posix()
            yield from _load_file(file, f"{label}/{rel}" if label else rel, ex)


@contextmanager
def _extractor(given: BoundedExtractor | None) -> Iterator[BoundedExtractor]:
    """The caller's extractor, or one for this walk (its worker process ends with the walk)."""
    if given is not None:
        yield given
        return
    with BoundedExtractor() as ex:
        yield ex


def _load_file(file: Path, rel: str, extractor: BoundedExtractor) -> Iterator[Document]:
    """The file's documents; any failure to read it, or text that cannot be encoded, skips it
    with the reason, so one bad file never stops a run."""
    try:
        if file.suffix.lower() in JSONL_SUFFIXES:
            try:
                data = file.read_bytes()
            except OSError as e:
                raise Unreadable(f"cannot read ({e.strerror or e})") from None
            yield from _parse_jsonl(decode(data)[0], file, rel)
            return
        extracted = extract(file) if kind_of(file) == "text" else extractor.extract(file)
        if problem := text_problem(extracted.text):
            raise Unreadable(f"its text {problem}")
    except Unreadable as e:
        _skip(file, str(e))
        return
    except Exception as e:  # a loader's bug or a library's surprise: this file's reason, not the run's end
        log.debug("loading %s failed", file, exc_info=True)
        _skip(file, f"cannot be read ({type(e).__name__}: {e})")
        return
    if problem := id_problem(rel):
        _skip(file, f"its id {rel!r} {problem}")
        return
    yield Document(id=rel, text=extracted.text, source=str(file), metadata={}, pages=extracted.pages)


def jsonl_lines(text: str) -> list[str]:
    """JSON Lines' lines: split at \\n only (a \\r before it dropped). str.splitlines() also splits
    at U+2028, U+0085, \\v, \\f and more, which JSON allows raw inside a string."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


class JsonlError(ValueError):
    """A JSONL line that is not a JSON object. `line` and `reason` let a caller word the error
    for its own audience (an HTTP answer names the line differently from a command's stderr)."""

    def __init__(self, where: str, line: int, reason: str):
        super().__init__(f"{where}:{line}: {reason}")
        self.line, self.reason = line, reason


def jsonl_objects(text: str, where: str, on_error: Callable[[JsonlError], None] | None = None
                  ) -> list[tuple[int, dict]]:
    """Every non-blank line of `text` as (line number, JSON object); a line that is not one is a
    JsonlError naming `where:line` (for files a user hands a command, unlike a corpus scan,
    which skips such lines), raised, or passed to `on_error` and skipped."""
    rows = []
    for n, line in enumerate(jsonl_lines(text), 1):
        if not line.strip():
            continue
        try:
            try:
                obj = loads(line)
            except json.JSONDecodeError as e:
                raise JsonlError(where, n, f"not JSON ({e.msg})") from None
            except ValueError as e:  # nested past the parser's depth, an integer too long
                raise JsonlError(where, n, f"not JSON ({e})") from None
            if not isinstance(obj, dict):
                raise JsonlError(where, n, "expected a JSON object")
        except JsonlError as e:
            if on_error is None:
                raise
            on_error(e)
            continue
        rows.append((n, obj))
    return rows


def _parse_jsonl(text: str, file: Path, rel: str) -> Iterator[Document]:
    for lineno, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            obj = loads(line)
        except ValueError as e:  # not JSON, nested too deeply, an integer too long
            _skip(file, f"invalid JSON ({e})", lineno)
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            _skip(file, "expected an object with a string 'text'", lineno)
            continue
        doc_id = obj.get("id")
        if doc_id is None or doc_id == "":
            doc_id = f"{rel}#{lineno}"
        metadata = {k: v for k, v in obj.items() if k not in ("id", "text")}
        problem = (("id", id_problem(str(doc_id))), ("text", text_problem(obj["text"])),
                   ("metadata", metadata_problem(metadata)))
        if bad := next(((what, why) for what, why in problem if why), None):
            _skip(file, " ".join(bad), lineno)
            continue
        yield Document(id=str(doc_id), text=obj["text"], source=f"{file}:{lineno}", metadata=metadata)
