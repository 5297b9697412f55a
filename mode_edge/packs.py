"""Domain packs: one expert cut out of a bundle as a single archive, installed into or removed from a bundle atomically.

NAME.modepack is an uncompressed tar (weights do not compress) holding pack.json, the files it lists and, when
signed, pack.sig (mode_edge/signing.py). An install checks everything before anything changes: the archive's
members (regular files only, inside the target folder, exactly the listed files), the format version, the base
fingerprint, the signature against the bundle's trust store, the version against the highest one installed before,
every size and sha256 while extracting into a fresh folder experts/NAME@ID that nothing reads yet. Only then is the
bundle manifest rewritten (atomically) to point at it, the one step that commits the install, and the replaced
folder removed. Pure Python: a device installs packs without torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import tarfile
import tempfile
from pathlib import Path

from mode_edge.bundle import (
    PACK_FORMAT,
    bundle_lock,
    check_declared,
    check_pack_fits,
    check_rel_path,
    check_version,
    expert_folder,
    expert_pack_path,
    fsync_tree,
    pack_version,
    read_bundle,
    read_pack_manifest,
    reinstall_fix,
    total_bytes,
    verify_files,
    write_manifest,
)  # fmt: skip
from mode_edge.errors import UserError
from mode_edge.external_data import check_external_data
from mode_edge.files import sha256_file
from mode_edge.integrity import check_pack_shape
from mode_edge.names import check_name
from mode_edge.signing import MAX_SIGNATURE_BYTES, PACK_SIGNATURE, read_signature, sign, statement, trusted_keys
from mode_edge.trust import check_not_older, check_trust

PACK_MANIFEST = "pack.json"


def make_pack(bundle: Path, name: str, out: Path, key: Path | None = None, version: int | None = None) -> dict:
    """Write the installed expert NAME of BUNDLE as the archive OUT; returns its pack manifest.

    key: a private key (`mode-edge keys generate`) to sign the pack with; version: the pack's version (>= 1; default
    the installed one), raised for each new release of a pack so that devices refuse the older ones. An installed
    pack's own signature is kept when neither changes. Raises UserError for an unknown expert, an existing OUT, an
    unreadable key, or a version below 1."""
    check_name(name, "--expert")
    manifest = read_bundle(bundle)
    if name not in manifest["experts"]:
        raise UserError(f"{bundle} has no expert {name!r}; it has: {', '.join(sorted(manifest['experts'])) or 'none'}")
    folder = expert_folder(bundle, manifest, name)
    pack = read_pack_manifest(folder, manifest["experts"][name]["pack_sha256"])
    verify_files(folder, pack["files"], f"expert {name!r} in {bundle}", reinstall_fix(folder))
    if version is not None and (not isinstance(version, int) or version < 1):
        raise UserError(f"--version must be a whole number >= 1, got {version!r}")
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose another --out or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    installed = raw = (folder / PACK_MANIFEST).read_bytes()
    if version is not None and version != pack_version(pack):
        pack = {**pack, "version": version}
        raw = json.dumps(pack, indent=2).encode()
    signature = None
    if key is not None:
        signature = sign(key, statement(name, pack_version(pack), hashlib.sha256(raw).hexdigest()))
    elif raw is installed and (folder / PACK_SIGNATURE).is_file():
        signature = (folder / PACK_SIGNATURE).read_bytes()  # re-shipping a signed pack as it was installed
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            add_bytes(tar, PACK_MANIFEST, raw)
            if signature is not None:
                add_bytes(tar, PACK_SIGNATURE, signature)
            for rel in pack["files"]:
                tar.add(folder / rel, arcname=rel, recursive=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return pack


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a regular file NAME holding `data` to an archive being written."""
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def read_pack(path: Path) -> tuple[dict, dict[str, tarfile.TarInfo]]:
    """The pack's manifest and its members, checked without extracting anything (see `read_pack_and_sha`)."""
    pack, members, _ = read_pack_and_sha(path)
    return pack, members


def read_pack_and_sha(path: Path) -> tuple[dict, dict[str, tarfile.TarInfo], str]:
    """The pack's manifest, its members, and the sha256 of the very pack.json bytes parsed here: what a signature is
    checked over and what the extracted pack.json must match (the archive is read again to extract it, and may have
    changed meanwhile). Raises UserError for anything but a well-formed pack."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"pack {path} is a folder; pass a NAME.modepack archive (`mode-edge pack`)")
    if not path.is_file():
        raise UserError(f"pack {path} does not exist; make one with `mode-edge pack`")
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            by_name: dict[str, tarfile.TarInfo] = {}
            for m in members:
                check_rel_path(m.name, f"pack {path}")
                if not m.isfile():
                    raise UserError(f"pack {path} holds {m.name!r}, which is not a regular file (a link?); refused")
                if m.name in by_name:
                    raise UserError(f"pack {path} holds {m.name!r} twice; refused")
                by_name[m.name] = m
            if PACK_MANIFEST not in by_name or by_name[PACK_MANIFEST].size > 1 << 20:
                raise UserError(f"{path} is not a mode-edge pack: it has no {PACK_MANIFEST}")
            if PACK_SIGNATURE in by_name and by_name[PACK_SIGNATURE].size > MAX_SIGNATURE_BYTES:
                raise UserError(f"pack {path}: {PACK_SIGNATURE} is too large to be a signature; refused (get the "
                                f"pack from its publisher)")  # fmt: skip
            raw = tar.extractfile(by_name[PACK_MANIFEST]).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"pack {path} is not a readable archive ({e}); it is truncated or corrupt") from None
    if path.stat().st_size % tarfile.BLOCKSIZE:  # a tar archive is whole 512-byte blocks: this one was cut short
        raise UserError(f"pack {path} is cut short ({path.stat().st_size} bytes, not whole tar blocks); download or "
                        "make it again")  # fmt: skip
    try:
        pack = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"pack {path}: {PACK_MANIFEST} is not valid JSON ({first}); the pack is corrupt: download or "
                        f"make it again") from None  # fmt: skip
    check_version(pack, PACK_FORMAT, f"pack {path}")
    check_name(pack.get("name"), f"pack {path}")
    check_pack_shape(pack, None, f"pack {path}", "the pack is corrupt; download or make it again")
    check_declared(pack.get("files"), f"pack {path}")
    listed, present = set(pack["files"]), set(by_name) - {PACK_MANIFEST, PACK_SIGNATURE}
    if PACK_MANIFEST in listed or PACK_SIGNATURE in listed:
        raise UserError(f"pack {path} lists its own {PACK_MANIFEST} or {PACK_SIGNATURE} as a file; it is corrupt: "
                        f"make it again with `mode-edge pack`")  # fmt: skip
    if listed - present:
        raise UserError(f"pack {path} is missing {', '.join(sorted(listed - present))}; it is incomplete")
    if present - listed:
        raise UserError(f"pack {path} holds unlisted files {', '.join(sorted(present - listed))}; refused")
    for rel, rec in pack["files"].items():
        if by_name[rel].size != rec["bytes"]:
            raise UserError(f"pack {path}: {rel} has {by_name[rel].size} bytes, its manifest says {rec['bytes']}")
    return pack, by_name, hashlib.sha256(raw).hexdigest()


def install(bundle: Path, pack_path: Path, replace: bool = False, allow_unsigned: bool = False,
            allow_downgrade: bool = False) -> dict:  # fmt: skip
    """Install the pack into the bundle atomically; returns its manifest. Nothing changes unless all checks pass.

    A bundle that trusts keys takes only packs signed by one of them (allow_unsigned: also unsigned packs and
    unknown signers, for development; a signature that does not verify is refused always); a pack older than the
    highest version of its name ever installed is refused unless allow_downgrade. The bundle's lock is held from
    reading its manifest to writing it back, so concurrent installs and uninstalls of other packs are never lost.
    The same pack (same pack.json sha256) already installed and intact is a success without change; installed but
    damaged, it is repaired (reinstalling is the fix for a damaged pack). Folders that killed installs or uninstalls
    left under experts/ are removed once the checks have passed."""
    bundle = Path(bundle)
    read_bundle(bundle)  # a clear error for a folder that is no bundle, before the pack is read
    pack, members, pack_sha = read_pack_and_sha(pack_path)  # the signature must cover the bytes parsed, not a re-read
    name = pack["name"]
    signature = member_bytes(pack_path, members[PACK_SIGNATURE]) if PACK_SIGNATURE in members else None
    with bundle_lock(bundle):
        manifest = read_bundle(bundle)  # again under the lock: another process may have changed it meanwhile
        what = f"pack {pack_path} ({name})"
        check_pack_fits(pack, manifest, what)
        check_not_older(pack, manifest, allow_downgrade, what)  # first: a rollback is refused before any warning
        signer = check_trust(pack, signature, pack_sha, manifest, allow_unsigned, what)
        entry = manifest["experts"].get(name)
        if entry is not None and entry.get("pack_sha256") == pack_sha and installed_intact(bundle, name):
            verify_members(pack_path, pack, members)  # the installed copy is whole; the archive given must be too
            remove_unlisted(bundle, manifest)  # what a killed earlier try of this install left
            return pack
        if entry is not None and entry.get("pack_sha256") != pack_sha and not replace:
            raise UserError(f"expert {name!r} is already installed in {bundle} (another version); "
                            "pass --replace to replace it")  # fmt: skip
        install_locked(bundle, manifest, pack, members, pack_path, pack_sha, signer, signature)
    return pack


def member_bytes(pack_path: Path, member: tarfile.TarInfo) -> bytes:
    """The content of one small member of a pack archive (already checked by `read_pack`)."""
    try:
        with tarfile.open(pack_path, "r:") as tar:
            return tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"pack {pack_path} could not be read ({e}); it is truncated or corrupt") from None


def installed_intact(bundle: Path, name: str) -> bool:
    """Whether the installed expert's pack.json and every file it lists match their records."""
    try:
        manifest = read_bundle(bundle)
        folder, sha = expert_folder(bundle, manifest, name), manifest["experts"][name]["pack_sha256"]
        verify_files(folder, read_pack_manifest(folder, sha)["files"], name, cached=False)
        return True
    except UserError:
        return False


def install_locked(bundle: Path, manifest: dict, pack: dict, members: dict, pack_path: Path, pack_sha: str,
                   signer: str | None = None, signature: bytes | None = None) -> None:  # fmt: skip
    """Extract into a fresh folder experts/NAME@ID (pack.json checked against the sha256 of the bytes that were
    parsed and verified, every file against its record, the graphs' external-data paths checked on the extracted
    files; the verified signature written as it was read), flush it, then rewrite the manifest to point at it (the
    expert's entry, its signer, the highest version installed): that write commits the install. The folder it
    replaces, and any folder a killed earlier install left, are removed after it. A kill at any step leaves the
    manifest on the old expert or the new one, both whole. The caller holds the bundle lock."""
    name, experts = pack["name"], bundle / "experts"
    experts.mkdir(exist_ok=True)
    target = experts / f"{name}@{secrets.token_hex(4)}"
    target.mkdir()
    committed = False
    try:
        with tarfile.open(pack_path, "r:") as tar:
            manifest_rec = {"bytes": members[PACK_MANIFEST].size, "sha256": pack_sha}
            extract_checked(tar, members[PACK_MANIFEST], target / PACK_MANIFEST, manifest_rec, pack_path)
            for rel in pack["files"]:
                extract_checked(tar, members[rel], target / rel, pack["files"][rel], pack_path)
        if signature is not None:
            (target / PACK_SIGNATURE).write_bytes(signature)
        check_external_data(pack, lambda rel: (target / rel).read_bytes(), lambda rel: (target / rel).stat().st_size,
                            f"pack {pack_path}")  # fmt: skip
        fsync_tree(target)
        manifest["experts"][name] = {**expert_entry(target, pack), "signed_by": signer}
        if signer is not None or not trusted_keys(manifest):  # an unchecked pack may not raise the floor
            versions = manifest.setdefault("pack_versions", {})
            versions[name] = max(versions.get(name, 0), pack_version(pack))
        write_manifest(bundle, manifest)
        committed = True
    except (tarfile.TarError, EOFError) as e:
        raise UserError(f"pack {pack_path} could not be read ({e}); it is truncated or corrupt") from None
    except OSError as e:  # writing, not reading: a full disk, a read-only bundle
        raise UserError(f"pack {pack_path} could not be installed into {bundle} ({e.strerror or e}); free disk "
                        f"space or check the bundle's permissions, then retry") from None  # fmt: skip
    finally:
        if not committed:
            shutil.rmtree(target, ignore_errors=True)
    remove_unlisted(bundle, manifest)  # the replaced folder, and any that a killed earlier install left


def remove_unlisted(bundle: Path, manifest: dict) -> None:
    """Remove the folders under experts/ that the manifest does not point at: what a killed install (a folder not
    yet committed), a killed replace or uninstall (a folder no longer listed) left behind. The caller holds the
    bundle lock, so no other install is writing one of them."""
    listed = {expert_folder(bundle, manifest, name).name for name in manifest["experts"]}
    for path in (bundle / "experts").iterdir() if (bundle / "experts").is_dir() else []:
        if path.is_dir() and not path.is_symlink() and path.name not in listed:
            shutil.rmtree(path, ignore_errors=True)


def extract_checked(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, rec: dict, pack_path) -> None:
    """Copy one member out, hashing as it streams; a size or checksum mismatch refuses the pack."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    src = tar.extractfile(member)
    with open(dest, "wb") as f:
        while block := src.read(1 << 20):
            h.update(block)
            size += len(block)
            f.write(block)
    if size != rec["bytes"] or h.hexdigest() != rec["sha256"]:
        raise UserError(f"pack {pack_path}: {member.name} does not match its sha256 or size (corrupted, or changed "
                        f"while it was installed); refused: download or make it again")  # fmt: skip


def verify_members(path: Path, pack: dict, members: dict) -> None:
    """Every file in the archive matches the sha256 its pack.json records, and its graphs' external-data paths stay
    in the pack (what `inspect` and `verify` check before they report; `install` checks the same on the files it
    extracts)."""
    try:
        with tarfile.open(path, "r:") as tar:
            for rel, rec in pack["files"].items():
                h, src = hashlib.sha256(), tar.extractfile(members[rel])
                while block := src.read(1 << 20):
                    h.update(block)
                if h.hexdigest() != rec["sha256"]:
                    raise UserError(f"pack {path}: {rel} does not match its sha256 (corrupted); download or make "
                                    "it again")  # fmt: skip
            check_external_data(pack, lambda rel: tar.extractfile(members[rel]).read(), lambda rel: members[rel].size,
                                f"pack {path}")  # fmt: skip
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"pack {path} could not be read ({e}); it is truncated or corrupt") from None


def expert_entry(folder: Path, pack: dict) -> dict:
    """The bundle manifest's entry for the expert in experts/FOLDER: where its pack.json is and that file's sha256,
    its bytes and version."""
    return {
        "pack": expert_pack_path(Path(folder).name),
        "pack_sha256": sha256_file(Path(folder) / PACK_MANIFEST),
        "bytes": total_bytes(pack["files"]),
        "version": pack_version(pack),
    }


def uninstall(bundle: Path, name: str) -> None:
    """Remove one expert: the manifest entry first (atomic, the step that commits it), then its folder (a kill in
    between leaves an unlisted folder, removed by the next install or uninstall); other experts are not touched."""
    check_name(name)
    bundle = Path(bundle)
    read_bundle(bundle)
    with bundle_lock(bundle):
        manifest = read_bundle(bundle)  # under the lock: what is installed now
        if name not in manifest["experts"]:
            raise UserError(f"expert {name!r} is not installed in {bundle} (installed: "
                            f"{', '.join(sorted(manifest['experts'])) or 'none'})")  # fmt: skip
        del manifest["experts"][name]
        write_manifest(bundle, manifest)
        remove_unlisted(bundle, manifest)


def component_bytes(components: dict, files: dict) -> dict[str, int]:
    """Bytes on disk per component (graph + weights, every format), from the manifest's file records."""
    out = {}
    for comp, entry in components.items():
        if not isinstance(entry, dict):
            continue  # the entries the runtime reads are shape-checked; others are only described
        paths = [entry[f] for f in ("onnx", "executorch") if isinstance(entry.get(f), str)]
        paths += [p + ".data" for p in paths if p.endswith(".onnx")]
        out[comp] = sum(files[p]["bytes"] for p in paths if p in files)
    return out


def context_label(manifest: dict) -> str:
    """A bundle's context as `inspect` says it: its tokens, LongRoPE's factor set where it has one, and the .pte
    graphs' shorter context where --pte-context bounds them."""
    from mode_edge.rope import longrope_set

    decoder = manifest["base"]["decoder"]
    factors = longrope_set(decoder.get("rope_scaling"))
    pte = (manifest.get("executorch") or {}).get("context")
    notes = [f"LongRoPE's {factors} factors"] if factors else []
    notes += [f".pte graphs {pte}"] if isinstance(pte, int) and pte < decoder["max_seq_len"] else []
    return f"{decoder['max_seq_len']} tokens" + (f" ({', '.join(notes)})" if notes else "")


def describe(path: Path) -> dict:
    """What `mode-edge inspect` shows: a bundle folder or a .modepack archive. Raises UserError for anything else."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a bundle folder (`mode-edge export`) or a .modepack archive "
                        f"(`mode-edge pack`)")  # fmt: skip
    if path.is_file() and path.name == "manifest.json":
        raise UserError(f"{path} is a bundle's manifest; pass the bundle's folder, {path.parent}")
    if path.is_dir():
        m = read_bundle(path)
        experts = {}
        for name in sorted(m["experts"]):
            try:
                pack = read_pack_manifest(expert_folder(path, m, name), m["experts"][name]["pack_sha256"])
            except UserError as e:  # shown as damaged; the rest of the bundle is still described
                experts[name] = {"damaged": str(e), "parameters": None, "bytes": 0, "components": {}}
                continue
            experts[name] = {
                "parameters": pack.get("parameters"), "bytes": total_bytes(pack["files"]),
                "scheme": (pack.get("quantization") or {}).get("scheme"),  # an int4 bundle may hold mixed packs
                "components": component_bytes(pack["components"], pack["files"]),
            }  # fmt: skip
        return {
            "kind": "bundle", "path": str(path), "format_version": m["format_version"], "base": m["base"].get("spec"),
            "fingerprint": m["base"]["fingerprint"], "quantization": m["quantization"], "formats": m["formats"],
            "components": component_bytes(m["components"], m["files"]),
            "base_bytes": total_bytes(m["files"]), "experts": experts, "context": context_label(m),
        }  # fmt: skip
    pack, members = read_pack(path)
    verify_members(path, pack, members)
    claims = None  # who the signature says signed it: not checked here (`mode-edge verify --key` checks it)
    if PACK_SIGNATURE in members:
        claims = read_signature(member_bytes(path, members[PACK_SIGNATURE]), f"pack {path}")["key_id"]
    return {
        "kind": "pack", "path": str(path), "name": pack["name"], "format_version": pack["format_version"],
        "version": pack_version(pack), "signature_claims_key": claims,
        "fingerprint": pack["base_fingerprint"], "quantization": pack["quantization"], "formats": pack["formats"],
        "parameters": pack.get("parameters"), "components": component_bytes(pack["components"], pack["files"]),
        "bytes": total_bytes(pack["files"]),
    }  # fmt: skip


def install_copy(bundle: Path, name: str, new_name: str) -> None:
    """Install expert NAME again as NEW_NAME (same weights): how benchmarks and tests fill a bundle with many packs."""
    check_name(new_name)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / new_name
        shutil.copytree(expert_folder(bundle, read_bundle(bundle), name), folder)
        manifest = json.loads((folder / PACK_MANIFEST).read_text())
        manifest["name"] = new_name
        (folder / PACK_MANIFEST).write_text(json.dumps(manifest, indent=2))
        archive = Path(tmp) / f"{new_name}.modepack"
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
            for rel in [PACK_MANIFEST, *manifest["files"]]:
                tar.add(folder / rel, arcname=rel, recursive=False)
        install(bundle, archive)
