"""perseus_edge.export: checkpoint folder -> `Program` (the portable graph in memory).

    from perseus_edge.export import export
    program = export("ckpt/", max_context=1024)

The first compiler stage; `perseus_edge.build` composes it with quantize, lower and save (and
has the folder-to-folder `export_checkpoint`). The graph contract is `perseus_edge.modelfile`;
the steps are listed in `pipeline.py`, the design and measurements in export/README.md.
Importing this package is cheap (no torch, no onnx): the steps import them when they run.
"""

from __future__ import annotations

import os

from perseus_edge.modelfile.program import Program


def export(checkpoint: str | os.PathLike, max_context: int | None = None,
           tokenizer: str | os.PathLike | None = None) -> Program:
    """The portable program of a checkpoint folder (perseus, or transformers DeepSeek-V2/V3).
    See `pipeline.export`."""
    from perseus_edge.export.pipeline import export as run

    return run(checkpoint, max_context=max_context, tokenizer=tokenizer)


__all__ = ["export"]
