"""Real documents of each format the loaders read, made on the spot: a PDF written byte by byte
(PDF 1.4, one page, Helvetica text), a DOCX written by python-docx, HTML, reStructuredText, an
extensionless README and a Latin-1 file. Never part of the product: it lives with the tests."""
from __future__ import annotations

from pathlib import Path

from eval.hostile import pdf_file


def pdf_bytes(lines: list[str]) -> bytes:
    """A one-page PDF whose page shows `lines` (text a PDF reader extracts)."""
    return pdf_pages_bytes([lines])


def pdf_pages_bytes(pages: list[list[str]]) -> bytes:
    """A PDF of one page per entry of `pages`, each showing its lines."""
    n = len(pages)
    font = 3 + 2 * n  # objects: catalog, pages, then (page, content) per page, then the font
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [%s] /Count %d >>" % (" ".join(f"{3 + 2 * i} 0 R" for i in range(n)).encode(), n)]
    for i, lines in enumerate(pages):
        ops = ["BT", "/F1 12 Tf", "72 720 Td", "14 TL"]
        for line in lines:
            esc = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(f"({esc}) Tj T*")
        ops.append("ET")
        stream = "\n".join(ops).encode("latin-1")
        objs.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 %d 0 R >> >> "
                    b"/Contents %d 0 R >>" % (font, 4 + 2 * i))
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    return pdf_file(objs)


def write_docx(path: Path, heading: str, paragraphs: list[str], table: list[list[str]] | None = None) -> None:
    from docx import Document

    doc = Document()
    doc.add_heading(heading, 1)
    for p in paragraphs:
        doc.add_paragraph(p)
    if table:
        t = doc.add_table(rows=len(table), cols=len(table[0]))
        for i, row in enumerate(table):
            for j, cell in enumerate(row):
                t.cell(i, j).text = cell
    doc.save(path)


# One fact per file, in words no other file uses, so a test can find each one's text.
FACTS = {
    "report.pdf": "The Halvard Bridge was designed by Mira Solberg in 1931.",
    "harbour.docx": "The harbour crane lifts forty tonnes.",
    "museum.html": "The railway museum opens at nine.",
    "winter.rst": "The church bell rings at noon.",
    "README": "An extensionless readme about concrete quays.",
    "latin1.txt": "Le café de la Gare, où l'on mange à côté du théâtre.",
}


def mixed_folder(root: Path) -> Path:
    """A folder with one file of each format (FACTS), and a PNG nothing reads."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "report.pdf").write_bytes(pdf_bytes(["Annual report", FACTS["report.pdf"]]))
    write_docx(root / "harbour.docx", "Harbour", [FACTS["harbour.docx"]], [["crane", "40 t"], ["quay", "300 m"]])
    (root / "museum.html").write_text(
        "<html><head><title>Museum</title><style>p {color: red}</style><script>var hidden = 1;</script></head>"
        f"<body><h1>Museum</h1><p>The <b>railway</b> museum opens at <a href='#'>nine</a>.</p></body></html>")
    (root / "winter.rst").write_text("Winter\n======\n\nThe *church* bell rings at ``noon``.\n\n"
                                     ".. include:: /etc/passwd\n")
    (root / "README").write_text(FACTS["README"] + "\n")
    (root / "latin1.txt").write_bytes(FACTS["latin1.txt"].encode("latin-1"))
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    return root
