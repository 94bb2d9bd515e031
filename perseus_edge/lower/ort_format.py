"""The last, optional serialize step: ORT mobile format `model.ort` (+ the operator list for a
minimal ORT build) beside model.onnx in a written model folder.

    perseus to-ort MODEL_DIR            # writes MODEL_DIR/model.ort, model.required_operators.config
    perseus run MODEL_DIR --format ort -p "..."

The conversion is onnxruntime's own tool (`python -m onnxruntime.tools.convert_onnx_models_to_ort`)
with the 'Fixed' optimization style: the graph is optimized once (model-local `perseus`
functions inlined, fusions applied) and serialised as a flatbuffer that a minimal ORT build
loads without the ONNX protobuf parser. `model.required_operators.config` lists every (domain,
opset, op) the model needs; a mobile build made with
`./build.sh --minimal_build --include_ops_by_config model.required_operators.config` contains
only those kernels. Weights are stored inside model.ort (no external data file).

Converting needs the `onnx` package (the compiler's side); running the .ort does not (the runtime
opens it with `perseus run --format ort`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from perseus_edge import modelfile as mf
from perseus_edge.atomic import atomic_write, describe_oserror, fault, remove_stale_temp_files, writer_lock
from perseus_edge.errors import PerseusError
from perseus_edge.manifest import MANIFEST, sha256_file, verify_folder

PLATFORMS = ("portable", "arm", "amd64")


def convert_to_ort(model_dir: str | os.PathLike, platform: str = "portable") -> Path:
    """Add model.ort and model.required_operators.config to a model folder; returns model.ort.

    platform: portable (no CPU-specific layout), arm (also lets int8 QDQ fuse for ARM),
    amd64 (x86 NCHWc layouts: the result only runs on x86).
    """
    import importlib.util

    folder = Path(model_dir)
    if platform not in PLATFORMS:
        raise PerseusError(f"unknown platform {platform!r} (choose from {', '.join(PLATFORMS)})")
    manifest = verify_folder(folder)
    if not str(manifest.get("kind", "")).startswith("onnx"):
        raise PerseusError(f"{folder} is not an exported ONNX model folder")
    if not (folder / mf.MODEL_ONNX).is_file():
        raise PerseusError(f"{folder} has no {mf.MODEL_ONNX} to convert")
    if importlib.util.find_spec("onnx") is None:
        raise PerseusError("converting to .ort needs the onnx package: pip install 'perseus-edge[quantize]'")
    try:
        return _convert(folder, platform)
    except OSError as e:
        raise PerseusError(f"cannot write the .ort files into {folder}: {describe_oserror(e)}") from None


def _convert(folder: Path, platform: str) -> Path:
    """Convert under the folder's writer lock, in an order that a kill at any point leaves
    verifiable: model.onnx always, the .ort files only once the manifest lists the new ones."""
    import onnxruntime as ort

    with writer_lock(folder.absolute()):
        for stale in folder.glob(".ort-*"):  # work folders of killed runs
            shutil.rmtree(stale, ignore_errors=True)
        remove_stale_temp_files(folder, ".*.tmp-*")
        manifest = verify_folder(folder)
        with tempfile.TemporaryDirectory(prefix=".ort-", dir=folder) as tmp:
            cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
                   str(folder / mf.MODEL_ONNX), "--output_dir", tmp, "--optimization_style", "Fixed"]
            if platform != "portable":
                cmd += ["--target_platform", platform]  # the ORT tool's own flag
            proc = subprocess.run(cmd, capture_output=True, text=True)
            out = Path(tmp) / mf.MODEL_ORT
            if proc.returncode != 0 or not out.is_file():
                lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
                why = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln),
                           lines[-1] if lines else "")
                raise PerseusError(f"ORT format conversion failed: {why.strip()[:300]}")
            ops = Path(tmp) / mf.REQUIRED_OPS
            ops_text = ops.read_text().replace(str(out), mf.MODEL_ORT) if ops.is_file() else None
            # 1. the manifest stops vouching for the old .ort files; model.onnx stays verified
            new_files = (mf.MODEL_ORT, mf.REQUIRED_OPS)
            kept = {k: v for k, v in manifest["files"].items() if k not in new_files}
            base = {k: v for k, v in manifest.items() if k not in ("files", "ort_format")}
            _write(folder, {**base, "files": kept})
            fault("ort.unlisted")
            # 2. the new files replace the old ones, each in one rename
            os.replace(out, folder / mf.MODEL_ORT)
            if ops_text is not None:
                atomic_write(folder / mf.REQUIRED_OPS, ops_text)
            fault("ort.replaced")
    # 3. the manifest vouches for the new files
    for name in new_files:
        if (folder / name).is_file():
            kept[name] = {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
    base["ort_format"] = {"onnxruntime": ort.__version__, "optimization_style": "Fixed",
                          "platform": platform}
    _write(folder, {**base, "files": dict(sorted(kept.items()))})
    return folder / mf.MODEL_ORT


def _write(folder: Path, manifest: dict) -> None:
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
