"""`quantize`: `Program` -> quantized `Program` (the second compiler stage).

It works on the portable graph, or on one already lowered for the target it quantizes for (what
`perseus export` writes by default): the lowering passes rewrite the perseus ops, whose weights
the quantizer leaves to the target anyway, and the float LM head, which it turns back into its
MatMul first (`rewrite.linear_to_matmul`); so both orders give the same program.

    rewrite  the scheme's passes (rewrite.py), in this order: embedding table, LM head,
             main-graph matmuls, the perseus ops' weights, the int8 cache
    record   the settings and what each pass did (manifest key `quantization`, kind
             "onnx-<scheme>[-kv8]")

For a target whose kernel quantizes the experts in its own layout (ort-cpu's QMoE), the
perseus.MoE inputs stay float and the record says how `lower` is to quantize them. Saving, and
the checks on what was written, are `modelfile.writer.save`'s.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

from perseus_edge import __version__
from perseus_edge import modelfile as mf
from perseus_edge.errors import PerseusError
from perseus_edge.modelfile.program import Program
from perseus_edge.quantize.settings import Plan

EXPERT_WEIGHTS = ["w_gate", "w_up", "w_down"]  # perseus.MoE formals multiplied by
ABSORBED_WEIGHTS = ["w_uk", "w_uv"]  # perseus.LatentAttention per-head weights


def quantize(program: Program, plan: Plan) -> Program:
    """`program` quantized with `plan`; the input program is left as it was."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise PerseusError("quantization needs onnx and onnxruntime: pip install 'perseus-edge[quantize]'") from None
    if program.quantized:
        what = program.records[mf.QUANT_META].get("scheme") or program.kind
        raise PerseusError(f"the program is already quantized ({what}): quantize the fp32 export instead")
    if program.target not in ("portable", plan.target):
        raise PerseusError(f"the program is lowered for {program.target}: quantize it for {program.target}, "
                           f"or quantize the portable export for {plan.target}")
    from perseus_edge.quantize import rewrite as rw

    started = time.perf_counter()
    graph = onnx.ModelProto()
    graph.CopyFrom(program.graph)
    records = dict(program.records)
    lowered = records.get(mf.LOWER_META)
    if rw.linear_to_matmul(graph) and lowered:  # a float head lowered for ort-cpu: its MatMul again, quantized
        # below or not, and lowered again after if it stays float32
        records[mf.LOWER_META] = {**lowered, "passes": [p for p in lowered.get("passes", []) if p != "head_to_linear"]}
    report = apply(graph, plan)
    record = {**plan.to_dict(), **report,
              "quantizer": {"perseus_edge": __version__, "onnx": onnx.__version__,
                            "onnxruntime": onnxruntime.__version__},
              "seconds": round(time.perf_counter() - started, 2)}
    return Program(graph, program.config, program.tokenizer, program.generation,
                   f"{mf.KIND_ONNX}-{plan.kind_suffix}", {**records, mf.QUANT_META: record})


# ----------------------------------------------------------------------------- the passes
def apply(model, plan: Plan) -> dict:
    """Run the plan's rewrites on `model`; returns what was done (for the manifest)."""
    from perseus_edge.quantize import rewrite as rw

    done: dict = {}
    # inputs of the ops whose weights the target's kernel quantizes itself: left in float here
    kept = rw.kernel_inputs(model) if plan.kernel_experts else set()
    if plan.scheme == "fp16":
        done["fp16_weights"] = len(rw.weights_to_fp16(model, skip=kept))
        if kept:
            done["experts"] = {"kind": "fp16"}
    elif plan.scheme in ("int8", "int4"):
        weights = matmul_quant(plan, plan.scheme)
        if plan.embeddings != "fp32":
            done["embedding_table"] = rw.quantize_embedding(model, 8 if plan.embeddings == "int8" else 4,
                                                            plan.block_size)
        head = lm_head_weight(model)
        skip = kept | ({head} if head else set())
        if plan.format == "qdq":  # uint4 DequantizeLinear in front of untouched consumers
            names = rw.matmul_weights(model, skip)
            if not kept:
                names += rw.op_weights(model, mf.OP_MOE, EXPERT_WEIGHTS)
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
            if not kept:
                done["expert_weights"] = len(rw.quantize_op_weights(model, mf.OP_MOE, EXPERT_WEIGHTS, weights))
        if plan.format == "qoperator" and (plan.scheme == "int8" or plan.accuracy_level == 4):
            # activations go int8 anyway: int8 matmuls (qdq leaves the function bodies untouched)
            done["absorbed_int8_matmuls"] = len(rw.quantize_absorbed(
                model, mf.OP_LATENT_ATTENTION, ABSORBED_WEIGHTS, reduce_range=plan.settings.reduce_range))
        else:  # fp32 activations asked for: int8 storage, float32 compute
            done["absorbed_int8"] = len(rw.store_int8(model, mf.OP_LATENT_ATTENTION, ABSORBED_WEIGHTS))
        if kept:  # QMoE takes only integer zero points, so its experts use rtn
            experts = replace(weights, method="rtn") if weights.kind == "nbits" else weights
            done["experts"] = asdict(experts)
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
