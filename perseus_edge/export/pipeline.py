"""`export`: checkpoint folder -> `Program` (the portable graph in memory), as a short pipeline.

    load     verify the checkpoint's manifest, rebuild the PyTorch model      (checkpoint.py)
    prepare  tensors in graph layout: transposes, RoPE lanes, MLA absorption  (weights.py)
    graph    the portable graph with the perseus ops as local functions       (decoder.py, ops.py)

Each step is a plain function of the previous step's result, testable alone. What comes next is
the caller's: `quantize`, `lower`, then `modelfile.writer.save` (composed in `perseus_edge.build`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from perseus_edge.errors import PerseusError
from perseus_edge.manifest import MANIFEST, read_manifest, sha256_file
from perseus_edge.modelfile import names as mf
from perseus_edge.modelfile.program import Program


def export(checkpoint: str | os.PathLike, max_context: int | None = None,
           tokenizer: str | os.PathLike | None = None) -> Program:
    """The portable program of the checkpoint folder `checkpoint`.

    `checkpoint` is a perseus checkpoint or a transformers DeepSeek-V2/V3 folder (no manifest
    needed); `tokenizer` replaces (or supplies) its tokenizer.json.

    max_context: cache rows (default: the model's max_position_embeddings, also the upper bound).
    """
    import onnx
    import torch

    from perseus_edge import __version__
    from perseus_edge.checkpoint import load_checkpoint
    from perseus_edge.export.decoder import decoder_graph
    from perseus_edge.export.weights import prepare
    from perseus_edge.modelfile.graph import OPSET
    from perseus_edge.modelfile.writer import generation_config
    from perseus_edge.tokenizer import load_tokenizer

    ckpt = Path(checkpoint)
    if max_context is not None and max_context < 1:
        raise PerseusError(f"--max-context must be positive, got {max_context}")
    source_sha = checkpoint_sha(ckpt)
    model, tokenizer_path = load_checkpoint(ckpt, tokenizer=tokenizer)
    cfg = model.cfg
    context = _context(cfg, max_context)
    graph = decoder_graph(cfg, prepare(model, context), context)
    del model
    record = {"opset": OPSET, "max_context": context, "arch": cfg.arch,
              "source_checkpoint": {"path": str(ckpt.absolute()), "sha256": source_sha},
              "exporter": {"perseus_edge": __version__, "torch": torch.__version__, "onnx": onnx.__version__}}
    tokenizer = Path(tokenizer_path).read_bytes()
    generation = generation_config(load_tokenizer(tokenizer_path), context, cfg.extra.get("eos_token_id"))
    return Program(graph, cfg, tokenizer, generation, mf.KIND_ONNX, {mf.EXPORT_META: record})


def checkpoint_sha(ckpt_dir: Path) -> str:
    """Identity of a checkpoint: the sha256 of its manifest, which lists the sha256 of every file;
    for a folder without one (transformers' save_pretrained), the sha256 of the same listing."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise PerseusError(f"checkpoint folder not found: {ckpt_dir}")
    from perseus_edge.model.hf import is_transformers_folder  # torch-free: the demo's caller stays so

    if not (ckpt_dir / MANIFEST).is_file() and is_transformers_folder(ckpt_dir):
        listing = {p.relative_to(ckpt_dir).as_posix(): sha256_file(p)
                   for p in sorted(ckpt_dir.rglob("*")) if p.is_file()}
        return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    read_manifest(ckpt_dir)  # a clear error for a missing or unreadable manifest
    return sha256_file(ckpt_dir / MANIFEST)


def _context(cfg, max_context: int | None) -> int:
    limit = cfg.max_position_embeddings
    if max_context is None:
        return limit
    if max_context > limit:
        raise PerseusError(f"--max-context {max_context} exceeds the model's max_position_embeddings "
                           f"({limit}): RoPE positions beyond it were never trained")
    return max_context
