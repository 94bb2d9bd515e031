"""Quantize CLI command: `perseus quantize MODEL_DIR -o OUT_DIR --scheme SCHEME`.

onnx and onnxruntime are imported when the command runs (torch never), so the CLI starts on any
install and quantization itself runs on the deploy side.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer


def quantize(
    model_dir: Path = typer.Argument(..., help="Exported (fp32) model folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Quantized model folder to write."),
    scheme: str = typer.Option(..., "--scheme",
                               help="int8 (dynamic int8 matmuls), int4 (block-wise weight-only, MatMulNBits), "
                                    "fp16 (weight storage) or fp32 (weights untouched; with --kv-cache int8)."),
    target: str = typer.Option("ort-cpu", "--target",
                               help="Lowering after quantization: ort-cpu (onnxruntime CPU kernels + perseus.SparseMoE: "
                                    "what `perseus run` is fastest on), or portable (standard ONNX + perseus functions)."),
    isa: str = typer.Option("auto", "--isa",
                            help="Instruction-set settings: auto (this machine), avx512_vnni, avx512, avx2, arm64."),
    kv_cache: str = typer.Option("fp32", "--kv-cache", help="fp32, or int8 (per-token scales, ~3.8x fewer bytes)."),
    block_size: int = typer.Option(32, "--block-size", help="int4: weights per scale (power of two >= 16)."),
    method: str = typer.Option("rtn", "--method",
                               help="int4: rtn (round to nearest) or hqq (float zero points: lower error, "
                                    "but onnxruntime 1.32 runs them ~8x slower)."),
    format: str = typer.Option("qoperator", "--format",
                               help="int4: qoperator (MatMulNBits in the graph and inside the perseus ops) or "
                                    "qdq (uint4 DequantizeLinear in front of untouched ops; onnxruntime fuses it)."),
    embeddings: Optional[str] = typer.Option(None, "--embeddings", help="fp32, int8 or int4 (default: the scheme's)."),
    lm_head: Optional[str] = typer.Option(None, "--lm-head", help="fp32, int8 or int4 (default: the scheme's)."),
    force: bool = typer.Option(False, "--force", help="Replace the output folder whatever it holds."),
) -> None:
    """Quantize an exported model folder (perseus ops kept; manifest records the scheme)."""
    from perseus_edge.build import quantize_model
    from perseus_edge.quantize import Plan

    options = dict(target=target, isa=isa, kv_cache=kv_cache, block_size=block_size, method=method, format=format,
                   embeddings=embeddings, lm_head=lm_head)
    plan = Plan.make(scheme, **options)  # bad options fail before any work
    start = time.perf_counter()
    out = quantize_model(model_dir, output, scheme, force=force, **options)

    def size(folder: Path) -> float:
        return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20

    print(f"quantized {model_dir} -> {out} ({plan.kind_suffix}, {plan.target}, isa {plan.isa}; "
          f"{size(Path(model_dir)):.1f} MiB -> {size(out):.1f} MiB) in {time.perf_counter() - start:.1f}s")


def register(app: typer.Typer) -> None:
    app.command()(quantize)
