"""Model-folder integrity: sha256 manifest and atomic folder writes (torch-free).

Every folder perseus writes (checkpoint, ONNX model, quantized model) carries `manifest.json`
with the sha256 and size of each file, so a truncated copy or a tampered file is caught on load.
Folders are written into a sibling temp dir and renamed into place (`perseus_edge.atomic`), so a
crash never leaves a half-written model where a good one is expected. File names read from a
manifest are untrusted: one that points outside the folder is refused.
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Iterator

from perseus_edge.atomic import atomic_folder, atomic_write  # noqa: F401 - atomic_folder re-exported
from perseus_edge.errors import PerseusError

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # a manifest lists a handful of files: kilobytes


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _listed_files(folder: Path) -> Iterator[Path]:
    """Files of a model folder: hidden entries (temp files, locks, .ort-* work folders) are not
    part of the model and never recorded."""
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or p.name == MANIFEST:
            continue
        if p.is_file():
            yield p


def write_manifest(folder: Path, kind: str, extra: dict | None = None) -> dict:
    """Hash every file under `folder` (except the manifest itself) into manifest.json, atomically."""
    folder = Path(folder)
    files = {}
    for p in _listed_files(folder):
        files[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {"format": "perseus-edge", "kind": kind, "files": files, **(extra or {})}
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def safe_member(folder: Path, rel: object, what: str) -> Path:
    """`folder / rel` for a file name read from an untrusted file: a relative path that stays
    inside `folder` (no absolute path, no `..`, no symlink out), else a PerseusError."""
    if not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel:
        raise PerseusError(f"{folder}: {what} names an invalid file {rel!r}")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or Path(rel).is_absolute():
        raise PerseusError(f"{folder}: {what} names {rel!r}, outside the folder (refused)")
    path = folder / pure
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        raise PerseusError(f"{folder}: {what} names {rel!r}, which leads outside the folder (refused)")
    return path


def read_manifest(folder: Path) -> dict:
    """manifest.json as a dict, its structure checked: a folder from a stranger is untrusted."""
    folder = Path(folder)
    if not folder.is_dir():
        hint = ""
        olds = sorted(folder.absolute().parent.glob(f".{glob.escape(folder.name)}.old-*"))
        if olds:
            hint = (f" (an interrupted replace left the previous folder in {olds[-1].name}: "
                    f"rerun the command that writes {folder.name} to restore it)")
        raise PerseusError(f"model folder not found: {folder}{hint}")
    path = folder / MANIFEST
    if not path.is_file():
        raise PerseusError(f"{folder} has no {MANIFEST}: not a perseus model folder")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise PerseusError(f"{path} is {path.stat().st_size:,} bytes: too large for a manifest")
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise PerseusError(f"{path} is not UTF-8 text (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise PerseusError(f"{path} is not valid JSON ({e.msg})") from None
    except RecursionError:
        raise PerseusError(f"{path} is nested too deeply to be a manifest") from None
    except OSError as e:
        raise PerseusError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(manifest, dict):
        raise PerseusError(f"{path} holds a JSON {type(manifest).__name__}, expected an object")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise PerseusError(f"{path}: 'files' must be an object of file name -> sha256 and bytes")
    for rel, meta in files.items():
        if not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str)
                and isinstance(meta.get("bytes"), int) and not isinstance(meta.get("bytes"), bool)
                and meta["bytes"] >= 0):
            raise PerseusError(f"{path}: the entry of {rel!r} needs a 'sha256' string and a 'bytes' count")
        safe_member(folder, rel, MANIFEST)
    if not isinstance(manifest.get("kind", ""), str):
        raise PerseusError(f"{path}: 'kind' must be a string")
    return manifest


def verify_folder(folder: Path, expected_kind: str | tuple[str, ...] | None = None) -> dict:
    """Check every file listed in the manifest exists with the recorded size and sha256."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    kinds = (expected_kind,) if isinstance(expected_kind, str) else expected_kind
    if kinds and manifest.get("kind") not in kinds:
        raise PerseusError(
            f"{folder} holds a {manifest.get('kind')!r} folder, expected {' or '.join(kinds)}"
        )
    for rel, meta in manifest.get("files", {}).items():
        p = safe_member(folder, rel, MANIFEST)
        if not p.is_file():
            raise PerseusError(f"{folder}: file {rel} listed in the manifest is missing")
        if p.stat().st_size != meta["bytes"]:
            raise PerseusError(
                f"{folder}: {rel} is {p.stat().st_size} bytes, manifest says {meta['bytes']} (truncated or replaced)"
            )
        try:
            digest = sha256_file(p)
        except OSError as e:
            raise PerseusError(f"{folder}: cannot read {rel}: {e.strerror}") from None
        if digest != meta["sha256"]:
            raise PerseusError(f"{folder}: {rel} fails its sha256 check (corrupt or tampered)")
    return manifest
