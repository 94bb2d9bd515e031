"""perseus_edge.quantize: `Program` -> quantized `Program` (the second compiler stage).

    from perseus_edge.quantize import quantize
    program = quantize(program, "int4", kv_cache="int8")

Schemes: int8 (dynamic int8 matmuls), int4 (block-wise weight-only MatMulNBits), fp16 (weight
storage), fp32 (weights untouched: only for `kv_cache="int8"`). The perseus ops stay in the
graph; their expert weights are quantized inside the op's function body. Works on the portable
graph; `lower` comes after (`perseus_edge.build` composes the stages and has the
folder-to-folder `quantize_model`). Needs onnx + onnxruntime + numpy only (no torch).
Design and measurements: quantize/README.md. Importing this package is cheap.
"""

from __future__ import annotations

from perseus_edge.modelfile.program import Program
from perseus_edge.quantize.settings import ISAS, KV_CACHES, SCHEMES, Plan, resolve_isa


def quantize(program: Program, scheme: str, **options) -> Program:
    """`program` quantized with `scheme`; the input program is left as it was.

    options: target (the lowering target that follows: "portable" | "ort-cpu"), isa ("auto" |
    avx512_vnni | avx512 | avx2 | arm64), kv_cache ("fp32" | "int8"), block_size (int4: a power of
    two >= 16), method (int4: "rtn" | "hqq"), format (int4: "qoperator" | "qdq"), embeddings /
    lm_head ("fp32" | "int8" | "int4"; defaults per scheme), accuracy_level (MatMulNBits / QMoE:
    0, 1 or 4; default: the isa's). See quantize/README.md.
    """
    from perseus_edge.quantize.pipeline import quantize as run

    return run(program, Plan.make(scheme, **options))


__all__ = ["ISAS", "KV_CACHES", "SCHEMES", "Plan", "quantize", "resolve_isa"]
