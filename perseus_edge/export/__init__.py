"""perseus_edge.export: checkpoint folder -> deployable ONNX model folder (`perseus export`).

    from perseus_edge.export import export_checkpoint
    export_checkpoint("ckpt/", "model/", target="portable", max_context=1024)

The folder and graph contract is `perseus_edge.modelfile`; the pipeline stages are listed in
`pipeline.py`, the design and measurements in export/README.md. Importing this package is cheap
(no torch, no onnx): the stages import them when they run.
"""

from __future__ import annotations

import os
from pathlib import Path

TARGETS = ("portable", "ort-cpu")


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, target: str = "portable",
                      max_context: int | None = None, force: bool = False,
                      tokenizer: str | os.PathLike | None = None) -> Path:
    """Export a checkpoint folder (perseus, or transformers DeepSeek-V2/V3) as a model folder;
    returns its path. See `pipeline.export_checkpoint`."""
    from perseus_edge.export.pipeline import export_checkpoint as run

    return run(ckpt_dir, out_dir, target=target, max_context=max_context, force=force, tokenizer=tokenizer)


__all__ = ["TARGETS", "export_checkpoint"]
