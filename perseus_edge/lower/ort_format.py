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

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from perseus_edge import modelfile as mf
from perseus_edge.errors import PerseusError
from perseus_edge.manifest import verify_folder, write_manifest

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
    with tempfile.TemporaryDirectory(prefix=".ort-", dir=folder) as tmp:
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
               str(folder / mf.MODEL_ONNX), "--output_dir", tmp, "--optimization_style", "Fixed"]
        if platform != "portable":
            cmd += ["--target_platform", platform]  # the ORT tool's own flag
        proc = subprocess.run(cmd, capture_output=True, text=True)
        out = Path(tmp) / mf.MODEL_ORT
        if proc.returncode != 0 or not out.is_file():
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            why = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
            raise PerseusError(f"ORT format conversion failed: {why.strip()[:300]}")
        ops = Path(tmp) / mf.REQUIRED_OPS
        os.replace(out, folder / mf.MODEL_ORT)
        if ops.is_file():  # the header names the temp copy: point it at the real file
            (folder / mf.REQUIRED_OPS).write_text(ops.read_text().replace(str(out), mf.MODEL_ORT))
    import onnxruntime as ort

    extra = {k: v for k, v in manifest.items() if k not in ("format", "kind", "files")}
    extra["ort_format"] = {"onnxruntime": ort.__version__, "optimization_style": "Fixed",
                           "platform": platform}
    write_manifest(folder, manifest["kind"], extra)
    return folder / mf.MODEL_ORT

