"""Export CLI commands: `perseus export` and `perseus inspect`.

torch and onnx are imported inside the commands, so the CLI starts on a torch-free install
(`inspect` needs onnx only).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from perseus_edge.errors import PerseusError


def export(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder (config, safetensors, tokenizer, manifest), "
                                               "or a transformers DeepSeek-V2/V3 folder (save_pretrained)."),
    output: Path = typer.Option(..., "-o", "--output", help="Model folder to write (a .gguf file with --format gguf)."),
    target: str = typer.Option("ort-cpu", "--target",
                               help="ort-cpu (onnxruntime CPU kernels where they measure faster: what "
                                    "`perseus run` is fastest on; `perseus quantize` takes it too) or portable "
                                    "(standard ONNX + perseus functions only, for any ONNX runtime)."),
    max_context: Optional[int] = typer.Option(None, "--max-context",
                                              help="Cache rows (default and maximum: max_position_embeddings)."),
    force: bool = typer.Option(False, "--force", help="Replace the output folder whatever it holds."),
    format: str = typer.Option("onnx", "--format", help="onnx (a model folder) or gguf (one file for llama.cpp)."),
    outtype: str = typer.Option("f32", "--outtype", help="GGUF weight type: f32, f16, q8_0 or q4_0."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer",
                                             help="tokenizer.json to use (default: the checkpoint's)."),
) -> None:
    """Export a checkpoint as a deployable ONNX model folder (graph, config, tokenizer, manifest)
    or, with --format gguf, as a GGUF file for llama.cpp's deepseek2 loader."""
    if format == "gguf":
        from perseus_edge.export.gguf import export_gguf

        start = time.perf_counter()
        out = export_gguf(checkpoint, output, outtype=outtype, force=force)
        print(f"exported {checkpoint} -> {out} (gguf {outtype}, {out.stat().st_size / 2**20:.1f} MiB) "
              f"in {time.perf_counter() - start:.1f}s")
        return
    if format != "onnx":
        raise PerseusError(f"unknown --format {format!r} (choose from onnx, gguf)")
    from perseus_edge.build import export_checkpoint
    from perseus_edge.lower import check_target

    check_target(target)  # before torch is imported
    start = time.perf_counter()
    out = export_checkpoint(checkpoint, output, target=target, max_context=max_context, force=force,
                            tokenizer=tokenizer)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"exported {checkpoint} -> {out} ({target}, {size / 2**20:.1f} MiB) "
          f"in {time.perf_counter() - start:.1f}s")
    print(f"inspect it with: perseus inspect {out}")


def inspect(model_dir: Path = typer.Argument(..., help="Exported model folder.")) -> None:
    """Summarise a model folder: config, files, opsets, and an operator histogram."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise PerseusError("inspect needs the onnx package: pip install onnx") from None
    from perseus_edge.export.inspect import inspect_folder

    report, problem = inspect_folder(model_dir)
    print(report)
    if problem:
        raise PerseusError(problem)


def register(app: typer.Typer) -> None:
    app.command()(export)
    app.command()(inspect)
