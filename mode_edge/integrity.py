"""Checks that stand between a file on disk and the code that reads it: manifest shapes, file records (size and
sha256, with a small cache), and `checked_load`, which turns any failure of a third-party reader into one line naming
the file and the fix. Pure Python: the device runtime uses it without torch.

Cost of verifying: sha256 runs at about 1.2 GB/s on this project's 2-core reference machine (0.22 s for the 257 MB
int8 SmolLM2 base), slower on a phone, and a run start would pay it every time. So the size of every file is checked
at every read (that catches a cut-short file, the common damage), and its sha256 once: a verified file is recorded in
ROOT/.verified.json by size, mtime, ctime and inode, and hashed again only when any of those changes. Every write
(and `touch`) changes the ctime, which no user tool can set back; damage that changes no metadata (bit rot below the
file system) is not caught after the first check. Where the cache cannot be written (a read-only bundle), every
read hashes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, TypeVar

from mode_edge.errors import RunStopped, UserError
from mode_edge.files import sha256_file, write_json
from mode_edge.chat import RESERVED
from mode_edge.rope import check_rope_scaling, positive
from mode_edge.signing import ROLES

KV_CACHE = {"onnx": "buffer", "executorch": "concat"}
"""The cache interface of each format's graphs in this bundle version (export/graphs.py, runtimes/kv_cache.py)."""
POSITION_INPUTS = ["seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"]
"""What a "buffer" graph takes between its hidden states and its cache, in this order."""
LOCAL_ROTARY_INPUTS = ["local_cos_cache", "local_sin_cache"]
"""After POSITION_INPUTS, where the decoder has rope_local_theta (Gemma 3): the sliding layers' rotary tables."""

CACHE = ".verified.json"
T = TypeVar("T")


def stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def load_cache(root: Path) -> dict:
    try:
        data = json.loads((Path(root) / CACHE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a missing or damaged cache only costs hashing again


def save_cache(root: Path, cache: dict) -> None:
    try:
        write_json(Path(root) / CACHE, cache)
    except OSError:
        pass  # a read-only bundle: every read hashes


def verify_records(root: Path, files: dict, damaged: Callable[[str, str], UserError], cached: bool = True) -> None:
    """Every file of `files` (rel -> {'bytes', 'sha256'}, already shape-checked) under `root` is present with its size
    and sha256; otherwise `damaged(path, problem)` is raised. sha256 is skipped for files recorded unchanged in the
    cache (see the module docstring)."""
    root = Path(root)
    cache = load_cache(root) if cached else {}
    changed = False
    for rel, rec in files.items():
        path = root / rel
        if path.is_symlink() or not path.is_file():
            raise damaged(str(path), "is missing")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise damaged(str(path), f"has {size} bytes where {rec['bytes']} were recorded (cut short or overwritten)")
        now = stamp(path)
        if cache.get(rel) == [*now, rec["sha256"]]:
            continue
        if sha256_file(path) != rec["sha256"]:
            raise damaged(str(path), "does not match its sha256 (corrupted)")
        if cached:
            cache[rel], changed = [*now, rec["sha256"]], True
    if changed:
        save_cache(root, cache)


def file_record(path: Path) -> dict:
    """{'bytes', 'sha256'} of one file, to store beside it in its folder's record."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def check_file(path: Path, rec, fix: str) -> None:
    """`path` has the size and sha256 of `rec` (a record from `file_record`; older records without one: no check)."""
    if not (isinstance(rec, dict) and is_int(rec.get("bytes")) and isinstance(rec.get("sha256"), str)):
        return
    verify_records(Path(path).parent, {Path(path).name: rec},
                   lambda p, problem: UserError(f"{p} {problem}; {fix}"), cached=False)  # fmt: skip


def checked_load(path: Path, load: Callable[[], T], fix: str) -> T:
    """`load()` (a third-party reader of `path`: safetensors, onnxruntime, tokenizers, transformers, gguf), with any
    failure turned into one line naming the file and the fix."""
    try:
        return load()
    except (UserError, RunStopped):  # (RunStopped: a collective read lost a peer; the file is not to blame)
        raise
    except MemoryError:
        raise UserError(f"{path} could not be read: it declares more data than fits in memory; {fix}") from None
    except Exception as e:  # noqa: BLE001 - the boundary where any reader's failure becomes the user's one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{path} could not be read ({first}); it is cut short or corrupted: {fix}") from None


def need(ok: bool, what: str, field: str, fix: str) -> None:
    if not ok:
        raise UserError(f"{what} is damaged: {field} is missing or malformed; {fix}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def chat_shape_ok(chat, vocab_size: int) -> bool:
    """A manifest's tokenizer.chat (mode_edge/chat.chat_record): template and special tokens as strings, stop ids
    in the vocabulary, pieces as lists of strings."""
    def strings(v, n=None):
        return isinstance(v, list) and all(isinstance(s, str) for s in v) and (n is None or len(v) == n)

    if not isinstance(chat, dict) or not isinstance(chat.get("template"), str):
        return False
    special, stops, pieces = chat.get("special_tokens"), chat.get("stop_ids"), chat.get("pieces")
    return (isinstance(special, dict) and all(isinstance(k, str) and isinstance(v, str) and k not in RESERVED
                                              for k, v in special.items())
            and isinstance(stops, list) and all(is_int(i) and 0 <= i < vocab_size for i in stops)
            and isinstance(pieces, dict) and strings(pieces.get("user"), 2)
            and (pieces.get("system_user") is None or strings(pieces["system_user"], 3)))  # fmt: skip


def check_bundle_shape(m: dict, what: str, fix: str) -> None:
    """The fields the runtime reads from a bundle manifest, with their types, so a flipped byte that leaves valid
    JSON is refused here rather than as a KeyError deep inside."""
    base, tok = m.get("base"), m.get("tokenizer")
    need(isinstance(base, dict) and isinstance(base.get("fingerprint"), str), what, "base.fingerprint", fix)
    dec = base.get("decoder")
    need(isinstance(dec, dict) and all(is_int(dec.get(k)) and dec[k] > 0 for k in
         ("vocab_size", "n_kv_heads", "head_dim", "max_seq_len")), what, "base.decoder", fix)  # fmt: skip
    ranges = base.get("block_ranges")
    need(isinstance(ranges, list) and ranges, what, "base.block_ranges", fix)
    need(isinstance(tok, dict) and isinstance(tok.get("file"), str), what, "tokenizer", fix)
    need(tok.get("chat") is None or chat_shape_ok(tok["chat"], dec["vocab_size"]), what, "tokenizer.chat", fix)
    need(isinstance(m.get("quantization"), dict), what, "quantization", fix)
    pte = m.get("executorch")  # absent in exports before the .pte bounds
    need(pte is None or (isinstance(pte, dict) and all(is_int(pte.get(k)) and pte[k] > 0 for k in
         ("tokens_per_call", "context"))), what, "executorch", fix)  # fmt: skip
    formats = m.get("formats")
    need(isinstance(formats, list) and formats and all(isinstance(f, str) for f in formats), what, "formats", fix)
    need(isinstance(dec.get("rope_theta"), (int, float)) and dec["rope_theta"] > 0, what, "base.decoder", fix)
    rotary = dec.get("rotary_dim")  # absent: the whole head turns
    need(rotary is None or (is_int(rotary) and 2 <= rotary <= dec["head_dim"] and rotary % 2 == 0), what,
         "base.decoder.rotary_dim", fix)  # fmt: skip
    try:
        check_rope_scaling(dec.get("rope_scaling"), "base.decoder.rope_scaling", rotary or dec["head_dim"])
    except UserError:
        need(False, what, "base.decoder.rope_scaling", fix)
    local = dec.get("rope_local_theta")  # the sliding layers' rotary base (Gemma 3): a second pair of tables
    need(local is None or positive(local), what, "base.decoder.rope_local_theta", fix)
    kv = m.get("kv_cache")  # each format's cache interface (runtimes/kv_cache.py), the one this version reads
    need(isinstance(kv, dict) and all(kv.get(f) == KV_CACHE.get(f) for f in formats), what, "kv_cache", fix)
    files, comps = m.get("files"), m.get("components")
    need(isinstance(files, dict) and tok["file"] in files, what, "files", fix)
    need(isinstance(comps, dict), what, "components", fix)
    for name in ["base/embed", "base/head", *(f"base/block{i}" for i in range(len(ranges)))]:
        check_component(comps.get(name), formats, files, what, f"components.{name}", fix)
    experts = m.get("experts")
    need(isinstance(experts, dict), what, "experts", fix)
    for name, e in experts.items():
        ok = isinstance(e, dict) and isinstance(e.get("pack_sha256"), str) and is_int(e.get("bytes"))
        need(ok and e["bytes"] >= 0, what, f"experts.{name}", fix)
        pack = e.get("pack")  # experts/NAME/pack.json (exported) or experts/NAME@ID/pack.json (installed)
        need(isinstance(pack, str) and isinstance(name, str) and re.fullmatch(
            rf"experts/{re.escape(name)}(@[0-9a-f]{{1,32}})?/pack\.json", pack) is not None,
            what, f"experts.{name}.pack", fix)  # fmt: skip
    trust = m.get("trust", {"keys": {}})  # absent: the bundle trusts no keys (mode_edge/signing.py)
    keys = trust.get("keys") if isinstance(trust, dict) else None
    need(isinstance(keys, dict) and all(isinstance(k, dict) and isinstance(k.get("public_key"), str)
         and ("roles" not in k or isinstance(k["roles"], list) and all(r in ROLES for r in k["roles"]))
         for k in keys.values()), what, "trust.keys", fix)  # fmt: skip
    for field in ("pack_versions", "index_versions"):  # highest versions installed / read (rollback protection)
        versions = m.get(field, {})
        need(isinstance(versions, dict) and all(is_int(v) and v >= 1 for v in versions.values()), what, field, fix)
    digests = m.get("index_digests", {})  # sha256 of the index read at that version (a version issued twice)
    need(isinstance(digests, dict) and all(isinstance(v, str) and len(v) == 64 for v in digests.values()), what,
         "index_digests", fix)  # fmt: skip


def check_pack_shape(p: dict, n_blocks: int | None, what: str, fix: str) -> None:
    """The fields the runtime reads from a pack manifest (pack.json), with their types."""
    need(isinstance(p.get("name"), str), what, "name", fix)
    need(isinstance(p.get("base_fingerprint"), str), what, "base_fingerprint", fix)
    need(is_int(p.get("version", 1)) and p.get("version", 1) >= 1, what, "version", fix)
    formats, files, comps = p.get("formats"), p.get("files"), p.get("components")
    need(isinstance(formats, list) and all(isinstance(f, str) for f in formats), what, "formats", fix)
    kv = p.get("kv_cache")
    need(isinstance(kv, dict) and all(kv.get(f) == KV_CACHE.get(f) for f in formats), what, "kv_cache", fix)
    need(isinstance(files, dict) and isinstance(p.get("gate"), str) and p["gate"] in files, what, "gate", fix)
    need(isinstance(comps, dict) and comps, what, "components", fix)
    blocks = range(n_blocks) if n_blocks is not None else range(len(comps))
    for i in blocks:
        check_component(comps.get(f"block{i}"), formats, files, what, f"components.block{i}", fix)


def check_component(c, formats: list, files: dict, what: str, field: str, fix: str) -> None:
    need(isinstance(c, dict) and is_int(c.get("layers")) and c["layers"] >= 0, what, field, fix)
    for fmt in formats:
        need(isinstance(c.get(fmt), str) and c[fmt] in files, what, f"{field}.{fmt}", fix)
