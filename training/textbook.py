"""Human-written mathematics for the math domain: the textbook *Derivations of Applied Mathematics* (Thaddeus H.
Black, GPL-2), which Debian ships as the package `derivations` (a PDF). Fetched with `apt-get download` (no root
needed; the package lists must exist, as after any `apt-get update`), unpacked in Python (a .deb is an ar archive
holding a tar), its text extracted with pypdfium2 (PDFium), cut into one document per numbered section.

PDF text loses layout: superscripts and subscripts land on lines of their own, and every page carries a running
header. Both are repaired or dropped below; formulas stay somewhat mangled, prose reads as written.
"""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

from mode_edge.errors import UserError

PACKAGE = "derivations"
PDF_MEMBER = "usr/share/doc/derivations/derivations.pdf"
SECTION = re.compile(r"^(\d+\.\d+(?:\.\d+)?) ([A-Z][^.]{2,80})$")
"""A numbered section heading on a line of its own, e.g. "2.5.1 Notation and integral powers"."""
RUNNING_HEAD = re.compile(r"^(\d+ CHAPTER \d+\. .*|\d+\.\d+\. [A-Z ,'’()-]+ \d+|CHAPTER \d+\. .* \d+)$")
"""A page's running header: "60 CHAPTER 2. CLASSICAL ALGEBRA ..." or "2.11. COMPLEX NUMBERS (INTRODUCTION) 61"."""


def _deb_member(deb: Path, member: str) -> bytes:
    """One file out of a .deb: an `ar` archive whose data.tar.* holds the package's files."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise UserError(f"{deb} is not a Debian package; delete it and rerun")
    pos = 8
    while pos + 60 <= len(data):
        name, size = data[pos : pos + 16].decode().strip().rstrip("/"), int(data[pos + 48 : pos + 58])
        body = data[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            with tempfile.NamedTemporaryFile(suffix=name) as tmp:
                tmp.write(body)
                tmp.flush()
                try:
                    tar = tarfile.open(tmp.name)
                except tarfile.ReadError:  # data.tar.zst (Ubuntu): dpkg-deb reads what tarfile cannot
                    proc = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True)
                    if proc.returncode != 0:
                        raise UserError(f"{deb}: cannot unpack its {name}; install dpkg (dpkg-deb) and rerun") from None
                    tar = tarfile.open(fileobj=io.BytesIO(proc.stdout))
                with tar:
                    for m in tar.getmembers():
                        if m.name.lstrip("./") == member and m.isfile():
                            return tar.extractfile(m).read()
        pos += 60 + size + (size % 2)
    raise UserError(f"{deb} holds no {member}; the package's layout changed")


def book_pdf(cache: Path) -> Path:
    """The book's PDF, from the Debian package, kept in `cache`."""
    pdf = cache / "derivations.pdf"
    if pdf.exists():
        return pdf
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if proc.returncode != 0 or not debs:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["apt-get is missing"]
            raise UserError(f"could not fetch the Debian package {PACKAGE} ({tail[0]}); on Debian or Ubuntu run "
                            "`apt-get update` once (as root) and retry")  # fmt: skip
        staged = cache / "derivations.pdf.tmp"
        staged.write_bytes(_deb_member(debs[0], PDF_MEMBER))
        staged.replace(pdf)
    return pdf


def _pages(pdf: Path) -> list[str]:
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise UserError("the math domain's textbook needs pypdfium2: pip install 'mode-edge[train]'") from None
    doc = pdfium.PdfDocument(str(pdf))
    return [doc[i].get_textpage().get_text_range() for i in range(len(doc))]


def _clean(lines: list[str]) -> str:
    """Running headers dropped; fragments of one or two characters (exponents, subscripts) joined to their line."""
    out: list[str] = []
    for line in (raw.strip() for raw in lines):
        if not line or RUNNING_HEAD.match(line):
            continue
        if out and (len(line) <= 2 or len(out[-1]) <= 2):
            out[-1] = f"{out[-1]}{line}" if len(line) <= 2 else f"{out[-1]} {line}"
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def sections(cache: Path) -> Iterator[tuple[str, str]]:
    """(doc_id, text) per numbered section of the book's body, from chapter 1 on (front matter and the table of
    contents skipped); doc_id is "derivations/SECTION"."""
    lines = "\n".join(_pages(book_pdf(cache))).splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Chapter 1"), None)
    if start is None:
        raise UserError(f"{cache / 'derivations.pdf'} has no 'Chapter 1'; delete it and rerun")
    number, body = None, []
    for line in lines[start:]:
        heading = SECTION.match(line.strip())
        if heading and ". . ." not in line:
            if number and len(_clean(body)) > 200:
                yield f"derivations/{number}", _clean(body)
            number, body = heading.group(1), [line]
        elif number:
            body.append(line)
    if number and len(_clean(body)) > 200:
        yield f"derivations/{number}", _clean(body)
