"""Hostile and malformed files for the indexing robustness runs (issue 23): each is small on disk
and breaks a loader in its own way: decompression bombs (PDF, DOCX), malformed and empty DOCX
packages, markup nested past what parsers bear, text holding a lone surrogate, and a symlink
out of the corpus. `hostile_folder(root)` writes them beside good files; `EXPECTED` says what
each bad file's skip reason must contain. Used by tests/test_index_faults.py and
`python -m eval.hostile` (the run the README reports)."""
from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path


def pdf_file(objs: list[bytes]) -> bytes:
    """A PDF 1.4 file of these objects (numbered from 1, the first the catalog), with its xref table."""
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def _page(content: bytes, font: bytes = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
          extra: list[bytes] = (), filter_: bytes = b"") -> bytes:
    return pdf_file([b"<< /Type /Catalog /Pages 2 0 R >>",
                 b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                 b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >> "
                 b"/Contents 4 0 R >>",
                 b"<< /Length %d%s >>\nstream\n" % (len(content), filter_) + content + b"\nendstream",
                 font, *extra])


def pdf_bomb(expanded_mb: int = 128) -> bytes:
    """A page whose FlateDecode content stream inflates to `expanded_mb` MB of blanks (~1000:1)."""
    z = zlib.compressobj(9)
    block = b" " * (1 << 20)
    parts = [z.compress(b"BT /F1 12 Tf 72 720 Td (bomb) Tj ET\n")]
    parts += [z.compress(block) for _ in range(expanded_mb)]
    parts.append(z.flush())
    return _page(b"".join(parts), filter_=b" /Filter /FlateDecode")


def pdf_with_lone_surrogate() -> bytes:
    """A page whose font's ToUnicode map sends 'A' to U+D800, a lone surrogate."""
    cmap = (b"/CIDInit /ProcSet findresource begin 12 dict begin begincmap /CMapName /X def "
            b"1 begincodespacerange <00> <FF> endcodespacerange 1 beginbfchar <41> <D800> endbfchar "
            b"endcmap CMapName currentdict /CMap defineresource pop end end")
    return _page(b"BT /F1 12 Tf 72 720 Td (Halvard AAA) Tj ET",
                 font=b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /ToUnicode 6 0 R >>",
                 extra=[b"<< /Length %d >>\nstream\n" % len(cmap) + cmap + b"\nendstream"])


_CT = (b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Types xmlns="http://schemas.openxmlformats.org/'
       b'package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.'
       b'relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/'
       b'document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/>'
       b'</Types>')
_RELS = (b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Relationships xmlns="http://schemas.openxmlformats'
         b'.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/'
         b'officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/></Relationships>')
_W = b'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'


def _zip(members: dict[str, bytes | tuple[int, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            if isinstance(data, tuple):  # (megabytes of one repeated block): written streaming
                mb, block = data
                with z.open(name, "w", force_zip64=True) as f:
                    for _ in range(mb):
                        f.write(block * ((1 << 20) // len(block)))
            else:
                z.writestr(name, data)
    return buf.getvalue()


def docx_bomb(expanded_mb: int = 256) -> bytes:
    """A DOCX whose document.xml inflates to `expanded_mb` MB (a zip bomb: ~1000:1)."""
    head = b'<?xml version="1.0"?><w:document ' + _W + b"><w:body><w:p><w:r><w:t>"
    return _zip({"[Content_Types].xml": _CT, "_rels/.rels": _RELS, "word/document.xml": head,
                 "word/padding.xml": (expanded_mb, b"<!-- padding -->")})


def docx_malformed() -> dict[str, bytes]:
    """Five broken or hostile packages named .docx, and an empty zip."""
    good_doc = b'<?xml version="1.0"?><w:document ' + _W + b"><w:body><w:p><w:r><w:t>x</w:t></w:r></w:p></w:body></w:document>"
    laughs = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
              + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10) for i in range(1, 10))
              + b']><w:document ' + _W + b"><w:body><w:p><w:r><w:t>&lol9;</w:t></w:r></w:p></w:body></w:document>")
    whole = _zip({"[Content_Types].xml": _CT, "_rels/.rels": _RELS, "word/document.xml": good_doc})
    return {
        "no-content-types.docx": _zip({"_rels/.rels": _RELS, "word/document.xml": good_doc}),
        "broken-xml.docx": _zip({"[Content_Types].xml": _CT, "_rels/.rels": _RELS, "word/document.xml": b"<w:document"}),
        "billion-laughs.docx": _zip({"[Content_Types].xml": _CT, "_rels/.rels": _RELS, "word/document.xml": laughs}),
        "truncated.docx": whole[: len(whole) // 2],
        "dangling-rel.docx": _zip({"[Content_Types].xml": _CT, "_rels/.rels": _RELS}),
        "empty-zip.docx": _zip({}),
    }


def deep_html(depth: int) -> bytes:
    return b"<html><body>" + b"<div>" * depth + b"deep" + b"</div>" * depth + b"</body></html>"


def deep_rst(depth: int) -> bytes:
    """Block quotes nested `depth` levels by indentation."""
    return "\n\n".join(" " * i + f"level {i}" for i in range(depth)).encode()


GOOD = {
    "good/bridge.txt": b"The Halvard Bridge was designed by Mira Solberg in 1931.\n",
    "good/notes.md": b"# Notes\n\nThe harbour crane lifts forty tonnes.\n",
    "good/museum.html": b"<html><body><p>The railway museum opens at nine.</p></body></html>",
    "good/winter.rst": b"Winter\n======\n\nThe church bell rings at noon.\n",
}

# What each bad file's skip reason must contain.
EXPECTED = {
    "bomb.pdf": "expands past the limit",
    "surrogate.pdf": "surrogate",
    "bomb.docx": "expands",
    "no-content-types.docx": "DOCX",
    "broken-xml.docx": "DOCX",
    "billion-laughs.docx": "",
    "truncated.docx": "DOCX",
    "dangling-rel.docx": "DOCX",
    "empty-zip.docx": "empty zip",
    "deep.html": "nested",
    "deep.rst": "nested",
    "surrogate.rst": "surrogate",
    "passwd-link.txt": "outside the indexed folder",
}


def hostile_folder(root: Path, bomb_mb: int = 128, depth: int = 100_000) -> Path:
    """The good files and every hostile one under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in GOOD.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "bomb.pdf").write_bytes(pdf_bomb(bomb_mb))
    (root / "surrogate.pdf").write_bytes(pdf_with_lone_surrogate())
    (root / "bomb.docx").write_bytes(docx_bomb(bomb_mb * 2))
    for name, data in docx_malformed().items():
        (root / name).write_bytes(data)
    (root / "deep.html").write_bytes(deep_html(depth))
    (root / "deep.rst").write_bytes(deep_rst(min(depth, 3000)))
    (root / "surrogate.rst").write_bytes(b"Hello |x| world\n\n.. |x| unicode:: U+D800\n")
    outside = root.parent / f"{root.name}-outside-secret.txt"
    outside.write_text("root:x:0:0:outside the corpus\n")
    (root / "passwd-link.txt").symlink_to(outside)
    return root


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="write the hostile folder (good files beside bad ones)")
    p.add_argument("root", type=Path)
    p.add_argument("--bomb-mb", type=int, default=1024, help="what the PDF bomb inflates to (the DOCX: twice it)")
    p.add_argument("--depth", type=int, default=200_000, help="nesting of the HTML file")
    a = p.parse_args()
    hostile_folder(a.root, a.bomb_mb, a.depth)
    for f in sorted(a.root.rglob("*")):
        if f.is_file() or f.is_symlink():
            print(f"{f.lstat().st_size:>10}  {f.relative_to(a.root)}")
