"""`perseus inspect`: what a model folder holds, read with onnx only (no torch, no weights loaded).

Summary (manifest, config, files and sizes, opset imports, graph inputs/outputs), then an
operator histogram `domain.op_type -> count` for the main graph and for each local function body
separately, so the perseus custom ops show up by name beside what they are made of.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from perseus_edge import modelfile as mf
from perseus_edge.errors import PerseusError
from perseus_edge.manifest import read_manifest, verify_folder
from perseus_edge.model.config import ModelConfig


def op_histogram(nodes) -> Counter:
    """Count of `domain.op_type` (default domain spelled ai.onnx), subgraphs included."""
    counts: Counter = Counter()
    for node in nodes:
        counts[f"{node.domain or 'ai.onnx'}.{node.op_type}"] += 1
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                counts.update(op_histogram(g.node))
    return counts


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _shape(value) -> str:
    dims = value.type.tensor_type.shape.dim
    return "[" + ", ".join(d.dim_param or str(d.dim_value) for d in dims) + "]"


def _table(counts: Counter, indent: str = "  ") -> list[str]:
    width = max((len(k) for k in counts), default=0)
    return [f"{indent}{k:<{width}}  {v:>5}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _config_lines(cfg: ModelConfig) -> list[str]:
    keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"]
    keys += (["kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
             if cfg.is_mla else [])
    keys += (["n_routed_experts", "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size"]
             if cfg.is_moe else ["intermediate_size"])
    counts = cfg.param_counts()
    return [f"config        arch={cfg.arch}, " + ", ".join(f"{k}={getattr(cfg, k)}" for k in keys),
            f"parameters    {counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active per token; "
            f"KV cache {cfg.kv_bytes_per_token()} bytes/token (fp32)"]


def inspect_folder(folder: str | Path) -> tuple[str, str | None]:
    """(report text, integrity problem or None). A folder that fails its sha256 check is still
    described, so the caller can show what is there before reporting the failure."""
    import onnx

    folder = Path(folder)
    manifest = read_manifest(folder)
    if not str(manifest.get("kind", "")).startswith(mf.KIND_ONNX):
        raise PerseusError(f"{folder} holds a {manifest.get('kind')!r} folder, not an exported ONNX model")
    try:
        verify_folder(folder)
        problem = None
    except PerseusError as e:
        problem = str(e)
    integrity = f"FAILED: {problem}" if problem else "ok (every sha256 matches the manifest)"
    lines = [f"model folder  {folder}", f"kind          {manifest.get('kind')}", f"integrity     {integrity}"]
    meta = manifest.get(mf.EXPORT_META) or {}
    if meta:
        src = meta.get("source_checkpoint") or {}
        lowered = ", ".join(meta.get("lowered") or []) or "nothing"
        lines += [f"target        {meta.get('target')} (lowered: {lowered})",
                  f"source        {src.get('path')} (manifest sha256 {str(src.get('sha256'))[:16]}...)"]
    for key in sorted(set(manifest) - {"format", "kind", "files", mf.EXPORT_META}):
        lines.append(f"{key:<13} {json.dumps(manifest[key])}")

    if (folder / mf.CONFIG).is_file():
        try:
            lines += _config_lines(ModelConfig.load(folder))
        except PerseusError as e:
            lines.append(f"config        unreadable ({e})")
    gen_path = folder / mf.GENERATION_CONFIG
    if gen_path.is_file():
        lines.append(f"generation    {' '.join(gen_path.read_text().split())}")
    lines.append("files")
    for rel, info in sorted((manifest.get("files") or {}).items()):
        lines.append(f"  {rel:<28} {_size(info['bytes']):>10}")

    path = folder / mf.MODEL_ONNX
    if path.is_file():
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: a damaged file
            lines.append(f"graph         unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            return "\n".join(lines), problem or f"{path} is not a readable ONNX graph"
        g = model.graph
        opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
        lines.append(f"opsets        {opsets} (ir_version {model.ir_version}, "
                     f"producer {model.producer_name or '?'} {model.producer_version})")
        lines.append(f"graph         {len(g.node)} nodes, {len(g.initializer)} initializers, "
                     f"{len(model.functions)} local functions")
        caches = [i for i in g.input if i.name.startswith("past.")]
        for i in g.input:
            if not i.name.startswith("past.") or i is caches[0]:
                lines.append(f"  input   {i.name:<16} {_shape(i)}")
        if len(caches) > 1:
            lines.append(f"  input   ... {len(caches)} cache buffers past.* (present.* outputs alike)")
        lines.append(f"  output  {g.output[0].name:<16} {_shape(g.output[0])}")
        lines.append("ops (main graph)")
        lines += _table(op_histogram(g.node))
        for f in model.functions:
            lines.append(f"ops inside function {f.domain}.{f.name}({', '.join(f.input)})")
            lines += _table(op_histogram(f.node), "    ")
    return "\n".join(lines), problem
