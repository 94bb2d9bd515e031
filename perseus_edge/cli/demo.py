"""`perseus demo`: the shipped checkpoint, built once (export + int8, cached), then a streamed story.

The first run compiles the checkpoint (needs torch + onnx) with `perseus_edge.build.build`,
cached under `$XDG_CACHE_HOME/perseus-edge/builds/<sha of the checkpoint manifest>/`, so later
runs start the runtime straight away, torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from perseus_edge.errors import PerseusError


def default_checkpoint() -> Path:
    """perseus_edge/assets/default: the trained checkpoint shipped with the package."""
    import perseus_edge

    return Path(perseus_edge.__file__).resolve().parent / "assets" / "default"


def prepare(checkpoint: str | os.PathLike | None = None, quantize: bool = True,
            log: Callable[[str], None] = print) -> Path:
    """The model folder the demo runs: the cached int8 (or fp32) build of `checkpoint`."""
    from perseus_edge.build import build

    ckpt = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    if checkpoint is None and not (ckpt / "manifest.json").is_file():
        raise PerseusError("this install has no embedded default model (perseus_edge/assets/default): "
                           "pass --checkpoint DIR")
    return build(ckpt, "int8" if quantize else None, log=lambda msg: log(f"first run: {msg}"))
