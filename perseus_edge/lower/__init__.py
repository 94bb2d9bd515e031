"""perseus_edge.lower: `Program` -> `Program` for one target (the third compiler stage).

    from perseus_edge.lower import lower
    program = lower(program, "ort-cpu")

`portable` keeps the graph as built: standard ONNX plus the perseus functions, runnable by any
ONNX runtime. `ort-cpu` rewrites perseus ops into onnxruntime CPU kernels where they measure
faster (`passes.py`) and, for a program quantized for it, quantizes the experts in the QMoE
kernel's layout (`qmoe.py`). Lowering comes after quantization (ExecuTorch's order): the
quantizer works on the portable graph, the backend's kernels are picked here. A program lowered
before it was quantized (`perseus export` writes ort-cpu by default) is lowered again for the
same target: the passes run again and find only what quantization added, and the
kernel-owned weights are quantized. The ORT mobile
format (`ort_format.py`) is the last, optional serialize step on a written folder.
"""

from __future__ import annotations

from perseus_edge.errors import PerseusError
from perseus_edge.modelfile import names as mf
from perseus_edge.modelfile.names import TARGETS
from perseus_edge.modelfile.program import Program


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise PerseusError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    return target


def lower(program: Program, target: str) -> Program:
    """`program` lowered for `target`; the input program is left as it was."""
    import onnx

    from perseus_edge.lower import passes

    check_target(target)
    if program.target not in ("portable", target):
        raise PerseusError(f"the program is already lowered for {program.target}: lower the portable one")
    quant = program.records.get(mf.QUANT_META) or {}
    if quant and quant.get("target", "portable") != target:
        raise PerseusError(f"the program was quantized for the {quant.get('target', 'portable')} target: "
                           f"quantize it with target {target} to lower it for {target}")
    graph = onnx.ModelProto()
    graph.CopyFrom(program.graph)
    graph, applied = passes.lower(graph, target)
    if program.target == target != "portable":  # lowered before quantization: add what ran now
        before = list(program.records[mf.LOWER_META].get("passes", []))
        applied = before + [p for p in applied if p not in before]
    record = {"target": target, "passes": applied}
    experts = quant.get("experts")
    if experts:
        record.update(_quantize_experts(graph, experts))
    records = {**program.records, mf.LOWER_META: record}
    return Program(graph, program.config, program.tokenizer, program.generation, program.kind, records)


def _quantize_experts(graph, experts: dict) -> dict:
    """The experts the quantizer left to the target (see `quantize.settings.KERNEL_EXPERTS`):
    in QMoE where the passes lowered the op, inside the perseus.MoE body where they kept it
    (routing variants the kernel cannot express)."""
    from perseus_edge.lower.qmoe import to_qmoe
    from perseus_edge.quantize.pipeline import EXPERT_WEIGHTS
    from perseus_edge.quantize.rewrite import MatMulQuant, quantize_op_weights, weights_to_fp16

    if experts["kind"] == "fp16":
        return {"fp16_weights": len(weights_to_fp16(graph))}
    quant = MatMulQuant(**experts)
    done = {"qmoe": to_qmoe(graph, quant)}
    kept = quantize_op_weights(graph, mf.OP_MOE, EXPERT_WEIGHTS, quant)
    if kept:
        done["expert_weights"] = len(kept)
    return done


__all__ = ["TARGETS", "check_target", "lower"]
