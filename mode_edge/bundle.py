"""The bundle and domain-pack format (docs/bundle-format.md): manifests, file records and their checks.

Pure Python: the device runtime reads bundles with it and never imports torch.

    BUNDLE/manifest.json              format, base (fingerprint, decoder, layout), tokenizer, quantization, formats,
                                      components, every base file with bytes + sha256, one entry per expert
    BUNDLE/tokenizer.json
    BUNDLE/base/{embed,block0..,head}.{onnx,onnx.data,pte}
    BUNDLE/experts/NAME/pack.json     the expert's own manifest: the same base fingerprint, its files and checksums
    BUNDLE/experts/NAME/gate.safetensors, block{i}.{onnx,onnx.data,pte}
                                      (an installed pack's folder is experts/NAME@ID: see `expert_folder`)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from mode_edge.errors import UserError
from mode_edge.files import fsync_folder, read_json, sha256_file, write_json
from mode_edge.integrity import check_bundle_shape, check_pack_shape, verify_records
from mode_edge.names import check_names

BUNDLE_FORMAT, PACK_FORMAT, BUNDLE_VERSION = "mode-edge-bundle", "mode-edge-pack", 2
"""Version 2: the ONNX graphs take their KV cache as buffers written in place (GroupQueryAttention); version 1's
returned the grown cache. docs/bundle-format.md "Graph interfaces"."""
FORMATS = ("onnx", "executorch")
GRAPH_SUFFIX = {"onnx": ".onnx", "executorch": ".pte"}
QUANTS = ("fp32", "int8", "int4", "mixed")
ONNX_OPTIMIZED_AHEAD = "extended"
"""The value of an ONNX component's `onnx_optimized`: its file is the graph as onnxruntime's optimizer leaves it at
ORT_ENABLE_EXTENDED (export/optimize_ahead.py), which the runtimes load with optimization off. Any other
value, or none, is optimized when it loads."""
MAX_FILE_BYTES = 64 << 30
"""No component of a model that fits a phone or a board is larger; a bigger declared size is corrupt or hostile."""


def file_record(root: Path, rel: str) -> dict:
    path = Path(root) / rel
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def records(root: Path, rels: list[str]) -> dict[str, dict]:
    return {rel: file_record(root, rel) for rel in sorted(rels)}


def check_rel_path(rel: str, what: str) -> None:
    """A listed file must stay inside its folder: no absolute paths, no '..', no backslashes."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise UserError(f"{what} lists the file {rel!r}, which would land outside its folder; the file is corrupt")


def check_declared(files: dict, what: str) -> None:
    if not isinstance(files, dict) or not files:
        raise UserError(f"{what} lists no files; it is corrupt")
    for rel, rec in files.items():
        check_rel_path(rel, what)
        size = rec.get("bytes") if isinstance(rec, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_BYTES:
            raise UserError(f"{what} declares an absurd size {size!r} for {rel}; it is corrupt")
        sha = rec.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise UserError(f"{what} declares no valid sha256 for {rel}; it is corrupt")


def verify_files(root: Path, files: dict, what: str, fix: str = "reinstall it", cached: bool = True) -> None:
    """Every listed file is present with its declared size and checksum; otherwise one line naming the file and
    `fix`. Sizes are checked at every call, sha256 once per file version (mode_edge/integrity.py)."""
    check_declared(files, what)

    def damaged(path: str, problem: str) -> UserError:
        return UserError(f"{what} is damaged: {path} {problem}; {fix}")

    verify_records(root, files, damaged, cached)


def check_version(manifest: dict, fmt: str, what: str) -> None:
    if not isinstance(manifest, dict):
        raise UserError(f"{what} is not a {fmt} manifest (a JSON {type(manifest).__name__}, not an object); it is "
                        f"corrupt")  # fmt: skip
    if manifest.get("format") != fmt:
        raise UserError(f"{what} is not a {fmt} manifest (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != BUNDLE_VERSION:
        older = isinstance(version, int) and not isinstance(version, bool) and version < BUNDLE_VERSION
        fix = ("it was made by an older mode-edge: export it again with this one (`mode-edge export --model RUN --out "
               "BUNDLE --overwrite`, then `mode-edge pack` for its packs)" if older
               else "upgrade mode-edge, or export it again with this one")  # fmt: skip
        raise UserError(f"{what} has format version {version!r}; this mode-edge reads version {BUNDLE_VERSION}: {fix}")


REEXPORT = "export the bundle again (`mode-edge export --overwrite`) or copy it again"


def read_bundle(bundle: Path) -> dict:
    """BUNDLE/manifest.json, checked: format, version and the shape of every field the runtime reads."""
    bundle = Path(bundle)
    if bundle.exists() and not bundle.is_dir():
        raise UserError(f"bundle {bundle} is a file; a bundle is the folder `mode-edge export --out` made (the one "
                        f"holding manifest.json)")  # fmt: skip
    if not bundle.is_dir():
        raise UserError(f"bundle {bundle} does not exist; create one with `mode-edge export`")
    path = bundle / "manifest.json"
    manifest = read_json(path, "this folder is not a mode-edge bundle (`mode-edge export`)", REEXPORT)
    check_version(manifest, BUNDLE_FORMAT, str(path))
    if isinstance(manifest.get("experts"), dict):  # names first: a name like ../x is refused as what it is
        check_names(manifest["experts"], f"{path} (corrupt?)")
    check_bundle_shape(manifest, str(path), REEXPORT)
    check_declared(manifest["files"], str(path))
    return manifest


def reinstall_fix(folder: Path) -> str:
    name = expert_name(Path(folder).name)
    return f"reinstall its pack (`mode-edge install --bundle {Path(folder).parent.parent} {name}.modepack`)"


def expert_name(folder_name: str) -> str:
    """The expert an experts/ folder holds: NAME for NAME (as exported) and NAME@ID (as installed)."""
    return folder_name.split("@", 1)[0]


def read_pack_manifest(folder: Path, sha256: str | None = None, n_blocks: int | None = None) -> dict:
    """An installed expert's pack.json, checked against the sha256 the bundle manifest records for it (when given)
    before it is parsed, then its format and shape."""
    path, fix = Path(folder) / "pack.json", reinstall_fix(folder)
    if sha256 is not None and path.is_file() and sha256_file(path) != sha256:
        name = expert_name(Path(folder).name)
        raise UserError(f"expert {name!r} is damaged: {path} does not match its sha256; {fix}")
    manifest = read_json(path, f"the expert's manifest is missing; {fix}", fix)
    check_version(manifest, PACK_FORMAT, str(path))
    check_pack_shape(manifest, n_blocks, str(path), fix)
    check_declared(manifest["files"], str(path))
    return manifest


def pack_version(pack: dict) -> int:
    """A pack's version (packs made before versions count as 1)."""
    return pack.get("version", 1)


def check_pack_fits(pack: dict, bundle: dict, what: str) -> None:
    """A pack joins a bundle only if it was made for the same base, layout, quantization and formats."""
    if pack.get("base_fingerprint") != bundle["base"]["fingerprint"]:
        raise UserError(
            f"{what} was made for base fingerprint {str(pack.get('base_fingerprint'))[:16]}, this bundle's base is "
            f"{bundle['base']['fingerprint'][:16]}; install it only into a bundle of the base it was trained on"
        )
    if _precision(pack.get("quantization")) != _precision(bundle["quantization"]):
        raise UserError(
            f"{what} is quantized {quant_label(pack.get('quantization'))}, the bundle "
            f"{quant_label(bundle['quantization'])}; export the expert with the bundle's --quant and --block-size"
        )
    missing = [f for f in bundle["formats"] if f not in pack.get("formats", [])]
    if missing:
        raise UserError(f"{what} has no {', '.join(missing)} graphs, which this bundle uses; re-export it")
    if "executorch" in bundle["formats"] and pack.get("executorch") != bundle.get("executorch"):
        ours, theirs = pack.get("executorch"), bundle.get("executorch")
        factors = isinstance(ours, dict) and isinstance(theirs, dict) and (
            ours.get("longrope_factors") != theirs.get("longrope_factors"))  # fmt: skip
        fix = ("re-export the bundle with this version of mode-edge" if not isinstance(theirs, dict)
               else "export the expert with the bundle's --context" if factors
               else "export the expert with the bundle's --pte-context")  # fmt: skip
        raise UserError(f"{what} has .pte graphs for {pte_label(pack.get('executorch'))}, the bundle's take "
                        f"{pte_label(bundle.get('executorch'))}; {fix}")  # fmt: skip


def pte_label(limits) -> str:
    if not isinstance(limits, dict):
        return "any length (an older export)"
    long = ", LongRoPE's long factors" if limits.get("longrope_factors") == "long" else ""
    return f"{limits.get('tokens_per_call')} tokens a call and a context of {limits.get('context')}{long}"


def _precision(q) -> object:
    """What a pack must share with its bundle: scheme and block size (the compute type, accuracy_level, is each
    graph's own). "mixed" counts as int4: its 8-bit layers are its graphs' own as well, so a mixed pack fits an
    int4 bundle and the other way round."""
    if not isinstance(q, dict):
        return q
    shared = {k: q.get(k) for k in ("scheme", "block_size")}
    return {**shared, "scheme": "int4"} if shared["scheme"] == "mixed" else shared


def quant_label(q: dict | None) -> str:
    if not isinstance(q, dict):
        return repr(q)
    return f"{q.get('scheme', '?')}" + (f" (block {q['block_size']})" if "block_size" in q else "")


def write_manifest(bundle: Path, manifest: dict) -> None:
    """Replace BUNDLE/manifest.json atomically; callers that read, modify and write it hold `bundle_lock`."""
    write_json(Path(bundle) / "manifest.json", manifest)


LOCK_FILE = ".lock"
LOCK_TIMEOUT_S = 600.0


@contextlib.contextmanager
def bundle_lock(bundle: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the bundle's lock (BUNDLE/.lock, an OS file lock that dies with its process) across a read-modify-write
    of its manifest: install, uninstall, fetch-and-install, export over it. Callers re-read the manifest inside.

    Not reentrant across calls: a holder must not take it again (the OS lock is per open file)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(Path(bundle) / LOCK_FILE))
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise UserError(f"bundle {bundle} stayed locked by another mode-edge process for {timeout_s:.0f} s; "
                        "wait for it to finish and retry") from None  # fmt: skip
    try:
        yield
    finally:
        lock.release()


def expert_folder(bundle: Path, manifest: dict, name: str) -> Path:
    """The folder of installed expert NAME: its manifest entry's `pack` path without pack.json. An export writes
    experts/NAME/; every install writes a fresh experts/NAME@ID/ and only then points the manifest at it, so the
    manifest write is the install's single commit point (a kill before it leaves the old expert listed and whole)."""
    return Path(bundle) / manifest["experts"][name]["pack"].rsplit("/", 1)[0]


def expert_pack_path(folder_name: str) -> str:
    """The manifest's `pack` path of an expert whose folder is experts/FOLDER_NAME."""
    return f"experts/{folder_name}/pack.json"


def total_bytes(files: dict) -> int:
    return sum(rec["bytes"] for rec in files.values())


def fsync_tree(folder: Path) -> None:
    """Flush a freshly written folder (its files, its subfolders' entries, itself and its entry in its parent)
    before the manifest points at it, so a power cut cannot leave the manifest naming a half-written folder."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_folder(path)
    fsync_folder(folder)
    fsync_folder(Path(folder).parent)
