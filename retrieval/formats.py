"""A file's text, whatever its format: PDF (pypdf), HTML (BeautifulSoup on the standard library's
parser), DOCX (python-docx), reStructuredText (docutils, markup stripped) and plain text of any
extension, its encoding detected (UTF-8 and BOMs first, else charset-normalizer, which is told to
prefer Windows-1252/Latin-1 among equally plausible readings: short Western text is ambiguous).

`extract(path)` returns the text or raises `Unreadable` with a reason a person can act on
("encrypted PDF", "no extractable text (a scanned PDF?)", "binary (contains NUL bytes)"), which
the loaders report as the file's skip reason."""
from __future__ import annotations

import bisect
import io
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

PDF_SUFFIXES = {".pdf"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
DOCX_SUFFIXES = {".docx"}
RST_SUFFIXES = {".rst", ".rest"}
# Formats that are binary by design and that no loader here reads: said so, never guessed at.
BINARY_SUFFIXES = {
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ico", ".svgz", ".heic",
    ".zip", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".tar", ".whl", ".jar",
    ".mp3", ".wav", ".flac", ".ogg", ".m4a", ".mp4", ".mkv", ".avi", ".mov", ".webm",
    ".doc", ".xls", ".xlsx", ".ppt", ".pptx", ".odt", ".ods", ".odp", ".epub", ".rtf",
    ".exe", ".dll", ".so", ".dylib", ".o", ".a", ".class", ".pyc", ".pyo", ".bin", ".dat",
    ".sqlite", ".db", ".lmdb", ".mdb", ".parquet", ".npy", ".npz", ".pt", ".pth", ".safetensors",
    ".gguf", ".onnx", ".pkl", ".woff", ".woff2", ".ttf", ".otf",
}
# Windows-1252 is what "Latin-1" files mostly are; among readings as plausible as the best one,
# these win (charset-normalizer alone reads short French or German as mac_latin2 or cp1250).
PREFERRED = ("cp1252", "latin_1", "iso8859_15")
MAX_CONTROL_SHARE = 0.01  # of the characters: more control characters than this is not text
# Bounds on what a small file may expand to: a hostile PDF or DOCX of a megabyte can hold
# gigabytes of compressed text (a "zip bomb"), and deeply nested markup makes the parsers
# quadratic. Each refusal is the file's skip reason. The per-file time and memory budget
# (retrieval/bounded.py) backs these up for whatever they do not foresee.
MAX_EXPANDED_BYTES = 64 << 20      # decompressed: one PDF stream, or a DOCX's members together
MAX_EXPANSION_RATIO = 200          # decompressed / compressed (above 1 MiB of output)
MAX_MARKUP_DEPTH = 256             # nesting of HTML elements; of reStructuredText blocks


class Unreadable(ValueError):
    """The file yields no text; the message is the reason."""


@dataclass(frozen=True)
class Extracted:
    text: str
    kind: str          # pdf, html, docx, rst, text
    encoding: str | None = None  # text formats: the encoding read
    pages: tuple[tuple[int, int], ...] = ()  # PDF: (offset in `text`, page number) where each page starts


def page_at(pages: tuple[tuple[int, int], ...] | list, offset: int) -> int | None:
    """The page number holding character `offset` of a text whose pages start as `pages` says."""
    i = bisect.bisect_right([start for start, _ in pages], offset) - 1
    return pages[i][1] if i >= 0 else None


def kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    for kind, suffixes in (("pdf", PDF_SUFFIXES), ("html", HTML_SUFFIXES), ("docx", DOCX_SUFFIXES),
                           ("rst", RST_SUFFIXES)):
        if suffix in suffixes:
            return kind
    return "text"


def extract(path: str | Path) -> Extracted:
    path = Path(path)
    if path.suffix.lower() in BINARY_SUFFIXES:
        raise Unreadable(f"unsupported binary format {path.suffix.lower()!r}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Unreadable(f"cannot read ({e.strerror or e})") from None
    return extract_bytes(data, path.name)


def extract_bytes(data: bytes, name: str) -> Extracted:
    """A file's bytes, read as its name's extension says: the one reader of files on disk and of
    uploads, so both give the same text and the same skip reasons."""
    suffix = Path(name).suffix.lower()
    if suffix in BINARY_SUFFIXES:
        raise Unreadable(f"unsupported binary format {suffix!r}")
    kind = kind_of(Path(name))
    if kind == "pdf":
        return pdf_extracted(data)
    if kind == "docx":
        text, encoding = docx_text(data), None
    elif kind == "html":
        text, encoding = html_text(data)
    else:
        raw, encoding = decode(data)
        text = rst_text(raw) if kind == "rst" else raw
    text = tidy(text)
    if not text.strip():
        raise Unreadable("no text in it")
    return Extracted(text, kind, encoding)


# -- plain text --------------------------------------------------------------------------------
_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
         (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def decode(data: bytes) -> tuple[str, str]:
    """Bytes → (text, encoding): a BOM's encoding, else UTF-8, else the detector's best reading.
    Raises Unreadable for binary data."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return _textual(data.decode(encoding).removeprefix("\ufeff")), encoding.removesuffix("-sig")
            except UnicodeDecodeError:
                raise Unreadable(f"starts with a {encoding} byte-order mark but does not decode as it") from None
    # A NUL byte never occurs in text of a BOM-less 8-bit or UTF-8 encoding, but is common in binary formats.
    if b"\x00" in data:
        raise Unreadable("binary (contains NUL bytes)")
    try:
        return _textual(data.decode("utf-8")), "utf-8"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    # UTF-16/32 without a BOM and without NULs is never the right reading of a real file.
    matches = [m for m in from_bytes(data) if not m.encoding.startswith(("utf_16", "utf_32"))]
    if not matches:
        raise Unreadable("not text in any encoding recognised (binary?)")
    best = min(m.chaos for m in matches)
    near = [m for m in matches if m.chaos <= best + 0.1]
    for encoding in PREFERRED:
        if any(encoding in m.could_be_from_charset for m in near):
            return _textual(data.decode(encoding)), encoding
    return _textual(str(matches[0])), matches[0].encoding


def _textual(text: str) -> str:
    if text:
        # U+0085 (NEL) is a line break, and JSON allows it raw inside strings
        controls = sum(1 for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r\f\v\x85")
        if controls / len(text) > MAX_CONTROL_SHARE:
            raise Unreadable(f"binary ({controls} control characters in {len(text)})")
    return text


def tidy(text: str) -> str:
    """Line ends as \\n, no trailing blanks, at most one blank line between paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


# -- PDF ---------------------------------------------------------------------------------------
def pdf_text(data: bytes) -> list[str]:
    """Each page's extracted text."""
    from pypdf import PdfReader
    from pypdf.errors import LimitReachedError, PyPdfError

    try:
        with _pdf_limits(len(data)):
            return _pdf_pages(PdfReader(io.BytesIO(data)))
    except Unreadable:
        raise
    except LimitReachedError as e:
        raise Unreadable(f"refused: a PDF stream expands past the limit ({e})") from None
    except (PyPdfError, ValueError, KeyError, TypeError, OSError, AttributeError, IndexError, RecursionError) as e:
        raise Unreadable(f"not a readable PDF ({type(e).__name__}: {e})") from None


def _pdf_limits(compressed: int):
    """pypdf's own per-stream output limits, lowered to MAX_EXPANDED_BYTES and the ratio."""
    import contextlib

    try:
        from pypdf import apply_configuration
    except ImportError:  # pypdf < 6.6: its fixed 75 MB limits and the per-file budget only
        return contextlib.nullcontext()
    limit = min(MAX_EXPANDED_BYTES, max(1 << 20, MAX_EXPANSION_RATIO * compressed))
    return apply_configuration(zlib_maximum_output_length=limit, maximum_declared_stream_length=limit,
                               array_based_stream_maximum_output_length=limit)


def _pdf_pages(reader) -> list[str]:
    if reader.is_encrypted:
        try:  # many PDFs are "encrypted" with an empty user password: readable by anyone
            if not reader.decrypt(""):
                raise Unreadable("encrypted PDF (needs a password)")
        except Unreadable:
            raise
        except Exception:
            raise Unreadable("encrypted PDF (needs a password, or a cipher pypdf cannot read)") from None
    return [page.extract_text() or "" for page in reader.pages]


# A header or footer line is one of the first or last RUNNING_EDGE lines of a page that recurs
# (digits aside: "Page 3 of 9") on at least RUNNING_SHARE of the pages, and on RUNNING_MIN_PAGES.
RUNNING_EDGE = 2
RUNNING_SHARE = 0.5
RUNNING_MIN_PAGES = 3


def _shape(line: str) -> str:
    return re.sub(r"\d+", "#", " ".join(line.split())).lower()


def strip_running_lines(pages: list[str]) -> list[str]:
    """Pages without their running headers and footers, which would otherwise repeat in every
    chunk and outweigh its own words in retrieval."""
    lines = [p.split("\n") for p in pages]
    counts: dict[str, int] = {}
    for page in lines:
        edges = {_shape(x) for x in page[:RUNNING_EDGE] + page[-RUNNING_EDGE:] if x.strip()}
        for shape in edges:
            counts[shape] = counts.get(shape, 0) + 1
    need = max(RUNNING_MIN_PAGES, RUNNING_SHARE * len(pages))
    running = {shape for shape, n in counts.items() if n >= need}
    if not running:
        return pages
    out = []
    for page in lines:
        n = len(page)
        out.append("\n".join(x for i, x in enumerate(page)
                             if not ((i < RUNNING_EDGE or i >= n - RUNNING_EDGE) and _shape(x) in running)))
    return out


def pdf_extracted(data: bytes) -> Extracted:
    """The PDF's text, pages apart by a blank line, without running headers, and where each page
    starts (citations give the page)."""
    pages = [tidy(p) for p in strip_running_lines(pdf_text(data))]
    text, starts = "", []
    for number, page in enumerate(pages, 1):
        if not page.strip():
            continue
        if text:
            text += "\n\n"
        starts.append((len(text), number))
        text += page
    if not text.strip():
        raise Unreadable("no extractable text (a scanned PDF? OCR is not done)")
    return Extracted(text, "pdf", None, tuple(starts))


# -- DOCX --------------------------------------------------------------------------------------
def docx_text(data: bytes) -> str:
    import zipfile

    from docx import Document as Docx

    try:
        _check_archive(data)
        doc = Docx(io.BytesIO(data))
    except Unreadable:
        raise
    except Exception as e:  # python-docx and lxml raise many kinds on hostile packages
        raise Unreadable(f"not a readable DOCX ({type(e).__name__}: {e})") from None
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    blocks = []
    for item in doc.iter_inner_content():  # paragraphs and tables in document order
        if isinstance(item, Paragraph):
            blocks.append(item.text)
        elif isinstance(item, Table):
            for row in item.rows:
                cells = [c.text.strip() for c in row.cells]
                blocks.append(" | ".join(dict.fromkeys(c for c in cells if c)))  # merged cells repeat
    return "\n\n".join(b.strip() for b in blocks if b.strip())


def _check_archive(data: bytes) -> None:
    """Refuse a DOCX (a zip) whose members would expand past the bounds. zipfile reads a member
    no further than its declared size, so the declared sizes bound what parsing can expand to."""
    import zipfile

    try:
        infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise Unreadable(f"not a readable DOCX ({e})") from None
    if not infos:
        raise Unreadable("not a readable DOCX (an empty zip archive)")
    expanded = sum(i.file_size for i in infos)
    if expanded > MAX_EXPANDED_BYTES:
        raise Unreadable(f"refused: the DOCX expands to {expanded:,} bytes, past the limit of {MAX_EXPANDED_BYTES:,}")
    if expanded > 1 << 20 and expanded > MAX_EXPANSION_RATIO * max(1, len(data)):
        raise Unreadable(f"refused: the DOCX expands {expanded / max(1, len(data)):.0f}-fold, past the limit of "
                         f"{MAX_EXPANSION_RATIO}")


# -- HTML --------------------------------------------------------------------------------------
_DROP = ("script", "style", "noscript", "template", "svg", "canvas", "iframe", "object", "head")
_BLOCKS = ("p", "div", "section", "article", "main", "header", "footer", "aside", "nav", "li", "dt", "dd",
           "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "table", "tr", "figure", "figcaption",
           "ul", "ol", "dl", "form", "fieldset", "address", "details", "summary", "hr")


def html_text(data: bytes) -> tuple[str, str | None]:
    """Visible text, a paragraph per block element (so chunking keeps to them), the title first."""
    from bs4 import BeautifulSoup

    if (depth := markup_depth(data)) > MAX_MARKUP_DEPTH:
        raise Unreadable(f"refused: HTML nested {depth} elements deep, past the limit of {MAX_MARKUP_DEPTH}")
    soup = BeautifulSoup(data, "html.parser")  # bs4 detects the encoding (meta charset, BOM, guess)
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in soup(_DROP):
        tag.decompose()
    for br in soup("br"):
        br.replace_with("\n")
    for cell in soup(("td", "th")):
        cell.insert_after(" | ")
    for block in soup(_BLOCKS):
        block.insert_before("\n\n")
        block.insert_after("\n\n")
    paragraphs = []
    for para in re.split(r"\n\s*\n", soup.get_text()):
        lines = [" ".join(line.split()) for line in para.split("\n")]
        text = "\n".join(line for line in lines if line).strip(" |")
        if text:
            paragraphs.append(text)
    if title and (not paragraphs or paragraphs[0] != title):
        paragraphs.insert(0, title)
    return "\n\n".join(paragraphs), soup.original_encoding


_TAG = re.compile(rb"<(/?)([a-zA-Z][a-zA-Z0-9:-]*)[^>]*?(/?)>")
# Elements that never nest (void) or that the next sibling closes implicitly: not counted.
_FLAT = {b"area", b"base", b"br", b"col", b"embed", b"hr", b"img", b"input", b"link", b"meta", b"source",
         b"track", b"wbr", b"p", b"li", b"dt", b"dd", b"tr", b"td", b"th", b"option", b"optgroup", b"thead",
         b"tbody", b"tfoot", b"colgroup", b"rb", b"rt", b"rp", b"param"}


def markup_depth(data: bytes) -> int:
    """The deepest nesting of HTML elements, in one linear scan of the tags (bs4's tree building
    grows quadratically with depth, so depth is checked before it runs)."""
    depth = deepest = 0
    for m in _TAG.finditer(data):
        name = m.group(2).lower()
        if name in _FLAT or m.group(3):
            continue
        if m.group(1):
            depth = max(0, depth - 1)
        else:
            depth += 1
            deepest = max(deepest, depth)
    return deepest


def rst_depth(source: str) -> int:
    """How deep reStructuredText blocks nest, by indentation steps (a bound docutils lacks)."""
    levels: list[int] = [0]
    deepest = 0
    for line in source.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" \t"))
        while levels and indent < levels[-1]:
            levels.pop()
        if not levels or indent > levels[-1]:
            levels.append(indent)
        deepest = max(deepest, len(levels) - 1)
    return deepest


# -- reStructuredText --------------------------------------------------------------------------
def rst_text(source: str) -> str:
    """The document's text without its markup; the source itself if docutils cannot parse it.
    File inclusion and raw passthrough are off: a corpus file must not read other files."""
    if (depth := rst_depth(source)) > MAX_MARKUP_DEPTH:
        raise Unreadable(f"refused: reStructuredText nested {depth} blocks deep, past the limit of {MAX_MARKUP_DEPTH}")
    try:
        from docutils import nodes
        from docutils.core import publish_doctree

        tree = publish_doctree(source, settings_overrides={
            "report_level": 5, "halt_level": 5, "warning_stream": io.StringIO(),
            "file_insertion_enabled": False, "raw_enabled": False, "input_encoding": "unicode"})
        for node in list(tree.findall(nodes.system_message)):
            node.parent.remove(node)
        return tree.astext()
    except Exception:  # a parser bug on odd input: the plain source is still good text
        return source
