"""perseus_edge.quantize: exported model folder -> quantized model folder (`perseus quantize`).

    from perseus_edge.quantize import quantize_model
    quantize_model("model/", "model-int4/", "int4", kv_cache="int8")

Schemes: int8 (dynamic int8 matmuls), int4 (block-wise weight-only MatMulNBits), fp16 (weight
storage), fp32 (weights untouched: only for `kv_cache="int8"`). The perseus ops stay in the
graph; their expert weights are quantized inside the op's function body. Needs onnx +
onnxruntime + numpy only (no torch). Design and measurements: quantize/README.md.
Importing this package is cheap: onnx is imported when a model is quantized.
"""

from __future__ import annotations

import os
from pathlib import Path

from perseus_edge.quantize.settings import KV_CACHES, SCHEMES, TARGETS, resolve_target


def quantize_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, scheme: str,
                   force: bool = False, **options) -> Path:
    """Quantize the model folder `model_dir` into `out_dir`; returns `out_dir`.

    options: target ("auto" | avx512_vnni | avx512 | avx2 | arm64), kv_cache ("fp32" | "int8"),
    block_size (int4: a power of two >= 16), method (int4: "rtn" | "hqq"), format (int4:
    "qoperator" | "qdq"), embeddings / lm_head ("fp32" | "int8" | "int4"; defaults per scheme),
    accuracy_level (MatMulNBits / QMoE: 0, 1 or 4; default: the target's). See quantize/README.md.
    """
    from perseus_edge.quantize.pipeline import quantize_model as run

    return run(model_dir, out_dir, scheme, force=force, **options)


__all__ = ["KV_CACHES", "SCHEMES", "TARGETS", "quantize_model", "resolve_target"]
