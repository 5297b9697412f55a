"""Text that is not valid Unicode, from data files and from the command line: replaced with U+FFFD and counted in
one warning line naming the file or the option; never a traceback."""

import json
import os
import subprocess
import sys

from mode_edge.text import decode
from mode_edge.tokenizer import byte_tokenizer
from tests.cli_runner import invoke

TRAIN = ["--base", "tiny", "--steps", "1", "--batch-size", "1", "--seq-len", "16", "--warmup-steps", "0"]


def folder_with(tmp_path, prose_data, name: str, bad: bytes):
    """A copy of the prose corpus plus one file holding `bad` bytes."""
    data = tmp_path / "data"
    data.mkdir()
    for f in prose_data.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    (data / name).write_bytes(bad)
    return data


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def test_train_expert_on_a_lone_surrogate(prose_data, tmp_path):
    """The issue's example: a .jsonl line {"text": "ok \\ud800 bad"} made `train expert` crash with a TypeError."""
    data = folder_with(tmp_path, prose_data, "bad.jsonl", b'{"text": "ok \\ud800 bad"}\n')
    result = invoke("train", "expert", "--domain", "x", "--data", data, "--out", tmp_path / "run", *TRAIN)
    assert warnings(result.stderr) == [f"warning: {data / 'bad.jsonl'}: 1 invalid UTF-8 sequence (or lone "
                                       "surrogates) replaced with U+FFFD"]  # fmt: skip
    assert (tmp_path / "run" / "model.json").is_file()


def test_invalid_utf8_in_txt_and_jsonl_files(prose_data, tmp_path):
    bad = '{"text": "caf\xc3\xa9 \xff\xfe and \xe2\x82"}\n'.encode("latin-1")  # 2 bad bytes, then a cut sequence
    data = folder_with(tmp_path, prose_data, "raw.jsonl", bad)
    (data / "latin1.txt").write_bytes("na\xefve r\xe9sum\xe9 ".encode("latin-1") * 30)
    (data / os.fsdecode(b"name-\xff.txt")).write_text("a file whose name is not UTF-8 " * 20)
    result = invoke("eval", "--base", "tiny", "--data", data, "--seq-len", "16", "--max-tokens", "32")
    assert sorted(warnings(result.stderr)) == [
        f"warning: {data / 'latin1.txt'}: 90 invalid UTF-8 sequences (or lone surrogates) replaced with U+FFFD",
        f"warning: {data / 'raw.jsonl'}: 3 invalid UTF-8 sequences (or lone surrogates) replaced with U+FFFD",
    ]


def test_decode_counts_only_what_it_replaced():
    assert decode("ok \ufffd already".encode()) == ("ok \ufffd already", 0)
    assert decode(b"a\xffb\xc3") == ("a\ufffdb\ufffd", 2)


def test_prompt_with_bytes_that_are_not_utf8(int8_bundle):
    """The issue's example `--prompt $'abc\\xff'`: argv bytes reach Python as a lone surrogate."""
    proc = subprocess.run([sys.executable, "-m", "mode_edge.cli", "run", "--bundle", str(int8_bundle).encode(),
                           "--experts", "none", "--prompt", b"abc\xff", "--max-new-tokens", "3"],
                          capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"})  # fmt: skip
    stderr = proc.stderr.decode()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert warnings(stderr) == ["warning: --prompt: 1 invalid UTF-8 sequence (or lone surrogates) replaced with U+FFFD"]


def test_prompt_with_lone_surrogates_in_process(int8_bundle):
    result = invoke("run", "--bundle", int8_bundle, "--experts", "none", "--prompt", "x\ud800y\udfff",
                    "--max-new-tokens", "2")  # fmt: skip
    assert warnings(result.stderr) == [
        "warning: --prompt: 2 invalid UTF-8 sequences (or lone surrogates) replaced with U+FFFD"
    ]


def test_tokenizer_encodes_lone_surrogates_as_replacement_characters():
    tok = byte_tokenizer()
    assert tok.encode("ok \ud800 bad") == tok.encode("ok \ufffd bad")
    assert tok.encode_batch(["\udcff", "fine"]) == [tok.encode("\ufffd"), tok.encode("fine")]
    json.dumps(tok.decode(tok.encode("a\ud800")))  # what comes back is valid text


def test_a_data_folder_whose_name_is_not_utf8(prose_data, tmp_path):
    data = tmp_path / os.fsdecode(b"caf\xe9")
    data.mkdir()
    for f in prose_data.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    result = invoke("eval", "--base", "tiny", "--data", data, "--seq-len", "16", "--max-tokens", "32")
    assert "caf\ufffd" in result.stdout  # the domain's name in the table, printable
