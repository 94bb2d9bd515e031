"""`quantize_model`: exported model folder -> quantized model folder.

    check    the source is an intact, unquantized export (sha256 of every file); the output is
             not the source and is empty or --force
    load     model.onnx with its weights
    rewrite  the scheme's passes (rewrite.py), in this order: embedding table, LM head,
             main-graph matmuls, the perseus ops' weights, the int8 cache
    save     model.onnx + page-aligned model.onnx.data (the exporter's writer), config,
             tokenizer, generation config; onnx.checker (full) and an onnxruntime session on
             what was written; manifest (kind "onnx-<scheme>[-kv8]", settings under `quantization`)

All of it happens in a temp folder renamed into place at the end (manifest.atomic_folder): a
failure leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from perseus_edge import __version__
from perseus_edge import modelfile as mf
from perseus_edge.errors import PerseusError
from perseus_edge.manifest import MANIFEST, atomic_folder, read_manifest, sha256_file, verify_folder
from perseus_edge.quantize.settings import Plan

COPIED = (mf.CONFIG, mf.TOKENIZER, mf.GENERATION_CONFIG)
EXPERT_WEIGHTS = ["w_gate", "w_up", "w_down"]  # perseus.MoE formals multiplied by
ABSORBED_WEIGHTS = ["w_uk", "w_uv"]  # perseus.LatentAttention per-head weights


def quantize_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, scheme: str, force: bool = False,
                   **options) -> Path:
    """Quantize `model_dir` (a `perseus export` folder) into `out_dir` with `scheme`; returns out_dir."""
    plan = Plan.make(scheme, **options)
    src, out = Path(model_dir), Path(out_dir)
    manifest = check_source(src)
    check_output(src, out, force)
    try:
        import onnx
    except ImportError:
        raise PerseusError("quantization needs the onnx package: pip install 'perseus-edge[quantize]'") from None
    started = time.perf_counter()
    with atomic_folder(out, force=force) as tmp:
        model = onnx.load(str(src / mf.MODEL_ONNX))
        report = apply(model, plan, src)
        save(model, src, tmp)
        validate(tmp)
        meta = {**plan.to_dict(), **report,
                "perseus_ops": sorted({n.op_type for n in model.graph.node if n.domain == mf.PERSEUS_DOMAIN}),
                "source": {"path": str(src.absolute()), "kind": manifest.get("kind"),
                           "sha256": sha256_file(src / MANIFEST)},
                "quantizer": {"perseus_edge": __version__, "onnx": onnx.__version__,
                              "onnxruntime": _ort_version()},
                "seconds": round(time.perf_counter() - started, 2)}
        from perseus_edge.manifest import write_manifest

        extra = {k: v for k, v in manifest.items() if k not in ("format", "kind", "files")}
        write_manifest(tmp, f"{mf.KIND_ONNX}-{plan.kind_suffix}", {**extra, mf.QUANT_META: meta})
    return out


# ----------------------------------------------------------------------------- checks
def check_source(src: Path) -> dict:
    manifest = read_manifest(src)  # one-line errors for a missing folder / manifest
    kind = str(manifest.get("kind", ""))
    if kind == "checkpoint":
        raise PerseusError(f"{src} is a training checkpoint: export it first (perseus export {src} -o DIR)")
    if not kind.startswith(mf.KIND_ONNX):
        raise PerseusError(f"{src} holds a {kind!r} folder, expected an exported ONNX model folder")
    if kind != mf.KIND_ONNX or mf.QUANT_META in manifest:
        what = (manifest.get(mf.QUANT_META) or {}).get("scheme") or kind
        raise PerseusError(f"{src} is already quantized ({what}): quantize the fp32 export instead")
    manifest = verify_folder(src)  # sha256 of every file: missing, truncated or tampered files
    files = manifest.get("files", {})
    for name in (mf.MODEL_ONNX, *COPIED):
        if name not in files:
            raise PerseusError(f"{src}: {name} is not listed in the manifest (incomplete model folder)")
    return manifest


def check_output(src: Path, out: Path, force: bool) -> None:
    a, b = src.absolute(), out.absolute()
    if a == b:
        raise PerseusError(f"the output folder {out} is the model folder itself: choose another -o")
    if a in b.parents:
        raise PerseusError(f"the output folder {out} is inside the model folder {src}")
    if b in a.parents:
        raise PerseusError(f"the output folder {out} would replace the model folder {src}")
    if out.exists() and not out.is_dir():
        raise PerseusError(f"{out} exists and is not a folder")
    if out.exists() and not force and any(out.iterdir()):
        raise PerseusError(f"{out} already exists and is not empty (use --force to replace it)")


# ----------------------------------------------------------------------------- the passes
def apply(model, plan: Plan, src: Path) -> dict:
    """Run the plan's rewrites on `model`; returns what was done (for the manifest)."""
    from perseus_edge.quantize import rewrite as rw

    done: dict = {}
    if plan.scheme == "fp16":
        done["fp16_weights"] = len(rw.weights_to_fp16(model))
    elif plan.scheme in ("int8", "int4"):
        weights = matmul_quant(plan, plan.scheme)
        if plan.embeddings != "fp32":
            done["embedding_table"] = rw.quantize_embedding(model, 8 if plan.embeddings == "int8" else 4,
                                                            plan.block_size)
        head = lm_head_weight(model)
        skip = {head} if head else set()
        if plan.format == "qdq":  # uint4 DequantizeLinear in front of untouched consumers
            names = rw.matmul_weights(model, skip) + rw.op_weights(model, mf.OP_MOE, EXPERT_WEIGHTS)
            if head and plan.lm_head == "int4":
                names.append(head)
                done["lm_head_weight"] = head
            elif head and plan.lm_head == "int8":
                rw.quantize_matmuls(model, matmul_quant(plan, "int8"), skip=_all_but(model, head))
                done["lm_head_weight"] = head
            done["qdq_weights"] = len(rw.qdq_weights(model, names, 4, plan.block_size, plan.method))
        else:
            if head and plan.lm_head != "fp32":
                rw.quantize_matmuls(model, matmul_quant(plan, plan.lm_head), skip=_all_but(model, head))
                done["lm_head_weight"] = head
            done["matmuls"] = len(rw.quantize_matmuls(model, weights, skip=skip))
            done["expert_weights"] = len(rw.quantize_op_weights(model, mf.OP_MOE, EXPERT_WEIGHTS, weights))
        done["absorbed_int8"] = len(rw.store_int8(model, mf.OP_LATENT_ATTENTION, ABSORBED_WEIGHTS))
        if any(n.domain == mf.MS_DOMAIN and n.op_type == "MoE" for n in model.graph.node):
            # ort-cpu folders: QMoE takes only integer zero points, so its experts use rtn
            experts = replace(weights, method="rtn") if weights.kind == "nbits" else weights
            done["qmoe"] = rw.lower_qmoe(model, experts)
        done["weights"] = (weights.describe() if plan.format == "qoperator" else
                           {"op": "DequantizeLinear (uint4, blocked, axis 0) -> MatMul", "bits": 4,
                            "block_size": plan.block_size, "method": plan.method,
                            "note": "onnxruntime fuses it into MatMulNBits at load"})
    if plan.kv_cache == "int8":
        done["cache_slots_int8"] = rw.int8_cache(model)
    return done


def matmul_quant(plan: Plan, kind: str):
    from perseus_edge.quantize.rewrite import MatMulQuant

    t = plan.settings
    if kind == "int8":
        return MatMulQuant("int8", unsigned=t.unsigned_int8, reduce_range=t.reduce_range)
    return MatMulQuant("nbits", bits=4, block_size=plan.block_size, method=plan.method,
                       accuracy_level=plan.accuracy_level)


def lm_head_weight(model) -> str | None:
    """The weight of the MatMul that writes the logits (None for a tied head, a Gemm)."""
    from perseus_edge.quantize.rewrite import initializers

    inits = initializers(model)
    for node in model.graph.node:
        if node.op_type == "MatMul" and mf.LOGITS in node.output and node.input[1] in inits:
            return node.input[1]
    return None


def _all_but(model, keep: str) -> set[str]:
    return {t.name for t in model.graph.initializer if t.name != keep}


# ----------------------------------------------------------------------------- save and check
def save(model, src: Path, tmp: Path) -> None:
    from perseus_edge.modelfile.writer import save_graph

    try:
        save_graph(model, tmp)
        for name in COPIED:
            shutil.copyfile(src / name, tmp / name)
    except OSError as e:
        raise PerseusError(f"cannot write the quantized folder: {e.strerror or e}") from None


def validate(folder: Path) -> None:
    """onnx.checker on the written graph, then an onnxruntime session: a graph that the runtime
    cannot load never replaces the output folder."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(folder / mf.MODEL_ONNX), full_check=True)
    except Exception as e:  # noqa: BLE001
        raise PerseusError(f"the quantized graph fails onnx.checker: {str(e).splitlines()[0]}") from None
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(folder / mf.MODEL_ONNX), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise PerseusError(f"onnxruntime cannot load the quantized graph: {str(e).strip().splitlines()[0]}") from None


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
