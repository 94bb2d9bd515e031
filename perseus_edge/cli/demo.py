"""`perseus demo`: the shipped checkpoint, exported and quantized once, then a streamed story.

The first run exports the checkpoint to ONNX (needs torch + onnx) and, when the quantizer is
installed, quantizes it to int8; the folders are cached under
`$XDG_CACHE_HOME/perseus-edge/demo/<sha of the checkpoint manifest>/`, so later runs start the
runtime straight away, torch-free.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Callable

from perseus_edge.errors import PerseusError
from perseus_edge.manifest import read_manifest, verify_folder

DEMO_PROMPT = "Once upon a time"


def default_checkpoint() -> Path:
    """perseus_edge/assets/default: the trained checkpoint shipped with the package."""
    import perseus_edge

    return Path(perseus_edge.__file__).resolve().parent / "assets" / "default"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "perseus-edge" / "demo"


def _cached(folder: Path) -> bool:
    """A complete, intact model folder from an earlier run (a damaged one is removed)."""
    if not (folder / "manifest.json").is_file():
        return False
    try:
        verify_folder(folder)
        return True
    except PerseusError:
        shutil.rmtree(folder, ignore_errors=True)
        return False


def prepare(checkpoint: str | os.PathLike | None = None, quantize: bool = True,
            log: Callable[[str], None] = print) -> Path:
    """The model folder the demo runs: cached int8 (or fp32) export of `checkpoint`."""
    ckpt = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    if checkpoint is None and not (ckpt / "manifest.json").is_file():
        raise PerseusError("this install has no embedded default model (perseus_edge/assets/default): "
                           "pass --checkpoint DIR")
    manifest = read_manifest(ckpt)
    if manifest.get("kind") != "checkpoint":
        raise PerseusError(f"{ckpt} is not a training checkpoint (its kind is {manifest.get('kind')!r})")
    key = hashlib.sha256((ckpt / "manifest.json").read_bytes()).hexdigest()[:16]
    base = cache_root() / key
    fp32, int8 = base / "fp32", base / "int8"
    if quantize and _cached(int8):
        return int8
    quantizer = None
    if quantize:
        try:
            from perseus_edge.quantize import quantize_model as quantizer
        except ImportError:
            quantizer = None
    if not _cached(fp32):
        missing = [m for m in ("torch", "onnx") if importlib.util.find_spec(m) is None]
        if missing:
            raise PerseusError(f"the demo exports the model once on its first run, which needs "
                               f"{' and '.join(missing)}: pip install 'perseus-edge[export]'")
        try:
            from perseus_edge.export import export_checkpoint
        except ImportError as e:
            raise PerseusError(f"the ONNX exporter is not available in this install ({e})") from None
        log(f"first run: exporting {ckpt} to ONNX (cached in {base})")
        export_checkpoint(ckpt, fp32, target="portable", force=True)
    if quantizer is None:
        if quantize:
            log("int8 quantizer not installed: running the fp32 model")
        return fp32
    log("first run: quantizing to int8")
    quantizer(fp32, int8, "int8")
    return int8
