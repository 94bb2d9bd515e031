"""`export_checkpoint`: checkpoint folder -> deployable model folder, as a short pipeline.

    load     verify the checkpoint's manifest, rebuild the PyTorch model      (checkpoint.py)
    prepare  tensors in graph layout: transposes, RoPE lanes, MLA absorption  (weights.py)
    build    the portable graph with the perseus ops as local functions       (build.py, ops.py)
    lower    optional rewrites into onnxruntime kernels (--target ort-cpu)    (lower.py)
    save     model.onnx(+.data), config, tokenizer, generation config,
             manifest; then onnx.checker (full) on what was written           (save.py)

Each stage is a plain function of the previous stage's result, testable alone. Everything is
written into a temp folder that replaces the destination in one rename at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from perseus_edge import modelfile as mf
from perseus_edge.errors import PerseusError
from perseus_edge.export import TARGETS
from perseus_edge.manifest import MANIFEST, atomic_folder, read_manifest, sha256_file


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, target: str = "portable",
                      max_context: int | None = None, force: bool = False,
                      tokenizer: str | os.PathLike | None = None) -> Path:
    """Export the checkpoint in `ckpt_dir` as a model folder at `out_dir`; returns `out_dir`.

    `ckpt_dir` is a perseus checkpoint or a transformers DeepSeek-V2/V3 folder (no manifest
    needed); `tokenizer` replaces (or supplies) its tokenizer.json.

    max_context: cache rows (default: the model's max_position_embeddings, also the upper bound).
    force: replace whatever `out_dir` holds. Without it, a non-empty `out_dir` is only replaced
    when it holds an earlier export of the same checkpoint.
    """
    import onnx
    import torch

    from perseus_edge import __version__
    from perseus_edge.checkpoint import load_checkpoint
    from perseus_edge.export.build import build
    from perseus_edge.modelfile.graph import OPSET
    from perseus_edge.export.lower import lower
    from perseus_edge.modelfile.writer import save_folder
    from perseus_edge.export.weights import prepare

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if target not in TARGETS:
        raise PerseusError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    if max_context is not None and max_context < 1:
        raise PerseusError(f"--max-context must be positive, got {max_context}")
    source_sha = _checkpoint_sha(ckpt_dir)
    replace = _may_replace(ckpt_dir, out_dir, source_sha, force)
    with atomic_folder(out_dir, force=replace) as tmp:
        model, tokenizer = load_checkpoint(ckpt_dir, tokenizer=tokenizer)
        cfg = model.cfg
        context = _context(cfg, max_context)
        graph = build(cfg, prepare(model, context), context)
        del model
        graph, rewrites = lower(graph, target)
        meta = {"target": target, "opset": OPSET, "max_context": context, "arch": cfg.arch,
                "perseus_ops": sorted({n.op_type for n in graph.graph.node if n.domain == mf.PERSEUS_DOMAIN}),
                "lowered": rewrites,
                "source_checkpoint": {"path": str(ckpt_dir.absolute()), "sha256": source_sha},
                "exporter": {"perseus_edge": __version__, "torch": torch.__version__, "onnx": onnx.__version__}}
        try:
            save_folder(tmp, graph, cfg, tokenizer, context, meta)
        except OSError as e:
            raise PerseusError(f"cannot write the model folder {out_dir}: {e.strerror or e}") from None
        onnx.checker.check_model(str(tmp / mf.MODEL_ONNX), full_check=True)
    return out_dir


def _checkpoint_sha(ckpt_dir: Path) -> str:
    """Identity of the source: the sha256 of its manifest, which lists the sha256 of every file;
    for a folder without one (transformers' save_pretrained), the sha256 of the same listing."""
    if not ckpt_dir.is_dir():
        raise PerseusError(f"checkpoint folder not found: {ckpt_dir}")
    from perseus_edge.checkpoint import is_transformers_folder

    if not (ckpt_dir / MANIFEST).is_file() and is_transformers_folder(ckpt_dir):
        listing = {p.relative_to(ckpt_dir).as_posix(): sha256_file(p)
                   for p in sorted(ckpt_dir.rglob("*")) if p.is_file()}
        return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    read_manifest(ckpt_dir)  # a clear error for a missing or unreadable manifest
    return sha256_file(ckpt_dir / MANIFEST)


def _may_replace(ckpt_dir: Path, out_dir: Path, source_sha: str, force: bool) -> bool:
    """Whether `out_dir` may be replaced; raises when it must not be touched."""
    out, src = out_dir.absolute(), ckpt_dir.absolute()
    if out == src or src in out.parents:
        raise PerseusError(f"the output folder {out_dir} is inside the checkpoint {ckpt_dir}")
    if out in src.parents:
        raise PerseusError(f"the output folder {out_dir} would replace the checkpoint {ckpt_dir}")
    if not out.exists():
        return False
    if not out.is_dir():
        raise PerseusError(f"{out_dir} exists and is not a folder")
    if force or not any(out.iterdir()):
        return True
    try:
        manifest = read_manifest(out)
    except PerseusError:
        raise PerseusError(f"{out_dir} already exists and is not empty (use --force to replace it)") from None
    source = (manifest.get(mf.EXPORT_META) or {}).get("source_checkpoint") or {}
    is_export = manifest.get("kind") == mf.KIND_ONNX
    if is_export and source.get("sha256") == source_sha:
        return True  # an earlier export of this same checkpoint
    what = (f"a model exported from {source['path']}" if is_export and source.get("path")
            else f"a {manifest.get('kind')!r} folder")
    raise PerseusError(f"{out_dir} already holds {what}, not an export of {ckpt_dir} "
                       f"(use --force to replace it)")


def _context(cfg, max_context: int | None) -> int:
    limit = cfg.max_position_embeddings
    if max_context is None:
        return limit
    if max_context > limit:
        raise PerseusError(f"--max-context {max_context} exceeds the model's max_position_embeddings "
                           f"({limit}): RoPE positions beyond it were never trained")
    return max_context
