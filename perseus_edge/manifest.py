"""Model-folder integrity: sha256 manifest and atomic folder writes (torch-free).

Every folder perseus writes (checkpoint, ONNX model, quantized model) carries `manifest.json`
with the sha256 and size of each file, so a truncated copy or a tampered file is caught on load.
Folders are written into a sibling temp dir and renamed into place, so a crash never leaves a
half-written model where a good one is expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from perseus_edge.errors import PerseusError

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, kind: str, extra: dict | None = None) -> dict:
    """Hash every file under `folder` (except the manifest itself) into manifest.json."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(folder).as_posix()
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {"format": "perseus-edge", "kind": kind, "files": files, **(extra or {})}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise PerseusError(f"model folder not found: {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise PerseusError(f"{folder} has no {MANIFEST}: not a perseus model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PerseusError(f"{path} is not valid JSON ({e.msg})") from None


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
        p = folder / rel
        if not p.is_file():
            raise PerseusError(f"{folder}: file {rel} listed in the manifest is missing")
        if p.stat().st_size != meta["bytes"]:
            raise PerseusError(
                f"{folder}: {rel} is {p.stat().st_size} bytes, manifest says {meta['bytes']} (truncated or replaced)"
            )
        if sha256_file(p) != meta["sha256"]:
            raise PerseusError(f"{folder}: {rel} fails its sha256 check (corrupt or tampered)")
    return manifest


@contextlib.contextmanager
def atomic_folder(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target` in one rename.

    Refuses to overwrite an existing non-empty folder unless `force`.
    """
    target = Path(target).absolute()
    if target.exists() and not force and (not target.is_dir() or any(target.iterdir())):
        raise PerseusError(f"{target} already exists and is not empty (use --force to replace it)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise PerseusError(f"cannot write to {target.parent}: {e.strerror}") from None
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
