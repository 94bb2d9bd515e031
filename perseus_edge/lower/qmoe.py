"""ort-cpu: quantized experts in onnxruntime's QMoE kernel.

`quantize(program, scheme, target="ort-cpu")` leaves the MoE expert weights in float and
records how they are to be quantized (`experts` in the quantization record): the QMoE kernel has
its own weight layout (per-expert blocks along the expert width, zero-padded), so the experts are
quantized here, once, from the float weights, after `moe_to_ort` has laid them out for the kernel.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
from onnx import helper, numpy_helper

from perseus_edge.modelfile.graph import add_initializer, calls, drop_unused, function, initializers
from perseus_edge.modelfile.names import MS_DOMAIN, OP_SPARSE_MOE, PERSEUS_DOMAIN
from perseus_edge.quantize import weights as qw
from perseus_edge.quantize.rewrite import MatMulQuant, refuse_inline_moe


def to_qmoe(model: onnx.ModelProto, quant: MatMulQuant) -> dict:
    """perseus.SparseMoE (`moe_to_ort`'s lowering of perseus.MoE) with QMoE's quantized experts:
    inside its body com.microsoft.MoE becomes com.microsoft.QMoE, and every call passes its
    layer's codes and scales (fc1, fc2 become uint8 codes; formals fc1_scale, fc2_scale and, for
    4 bits, fc1_zero_point, fc2_zero_point are appended).

    int8: 8-bit blocks, symmetric (implicit zero point 128); the calls stay, so the native kernel
    (runtime/kernels/sparse_moe.cc) runs them where it is built. int4: 4-bit blocks with zero
    points, the body inlined into the graph: onnxruntime's 4-bit QMoE (int8 dot products on the
    quantized activations, over weights it prepacks) measured faster than the kernel's float math
    and than an integer path on this row layout (studies/perf/README.md, section 12); with
    fp32 activations asked for (accuracy_level 0) as well.
    Blocks for 8-bit too: onnxruntime's block-wise path is faster at decode than its
    per-column one (studies/perf/README.md: 1.2x per 54M int8 step). The kernel needs hidden and
    expert widths divisible by its block size, so the expert width F is zero-padded to a multiple
    of the block (exact: padded gate/up rows are 0, silu(0) * 0 = 0, padded fc2 columns are 0).
    The block is the largest power of two <= `quant.block_size` (and >= 16) with the least padding.
    Returns {"nodes", "bits", "block_size", "padded_width"}.
    """
    refuse_inline_moe(model)
    f = function(model, OP_SPARSE_MOE)
    if f is None:
        return {}
    body = next(n for n in f.node if (n.domain, n.op_type) == (MS_DOMAIN, "MoE"))
    inits = initializers(model)
    bits = 8 if quant.kind == "int8" else quant.bits
    info: dict = {}
    for call in calls(model, OP_SPARSE_MOE):
        fc1_name, fc2_name = call.input[3:5]
        fc1, fc2 = numpy_helper.to_array(inits[fc1_name]), numpy_helper.to_array(inits[fc2_name])
        n_exp, d, f_width = fc2.shape
        candidates = [b for b in (256, 128, 64, 32, 16) if 16 <= b <= quant.block_size and d % b == 0]
        if not candidates:
            raise ValueError(f"hidden size {d} is not a multiple of 16: QMoE cannot block it")
        block = min(candidates, key=lambda b: (-f_width % b, -b))
        fp = f_width + -f_width % block
        if fp != f_width:  # zero-pad the expert width
            g = np.zeros((n_exp, 2 * fp, d), np.float32)
            g[:, :2 * f_width] = fc1
            fc1 = g
            fc2 = np.concatenate([fc2, np.zeros((n_exp, d, fp - f_width), np.float32)], axis=2)

        def pack(w: np.ndarray):  # w [E, N, K] -> packed [E, N, K*bits/8], scales, zero points
            ts = [qw.quantize_blockwise(w[e].T, bits, block, symmetric=(bits == 8)) for e in range(n_exp)]
            packed = np.stack([t.packed.reshape(t.n, -1) for t in ts])
            scales = np.stack([t.scales for t in ts])
            zeros = None if bits == 8 else np.stack([t.zero_points for t in ts])
            return packed, scales, zeros

        (p1, s1, z1), (p2, s2, z2) = pack(fc1), pack(fc2)
        args = [add_initializer(model, f"{fc1_name}.q", p1), add_initializer(model, f"{fc2_name}.q", p2),
                add_initializer(model, f"{fc1_name}.scale", s1), add_initializer(model, f"{fc2_name}.scale", s2)]
        if z1 is not None:
            args += [add_initializer(model, f"{fc1_name}.zero_point", z1),
                     add_initializer(model, f"{fc2_name}.zero_point", z2)]
        del call.input[3:]
        call.input.extend(args)
        key = {"bits": bits, "block_size": block, "expert_width": f_width, "padded_width": fp}
        if info and {k: info[k] for k in key} != key:
            raise ValueError("perseus.SparseMoE calls need one block layout: their expert widths differ")
        info = {"nodes": info.get("nodes", 0) + 1, **key}
    formals = ["fc1", "fc2", "fc1_scale", "fc2_scale"] + (["fc1_zero_point", "fc2_zero_point"] if bits == 4 else [])
    del f.input[3:]
    f.input.extend(formals)
    attrs = {a.name: helper.get_attribute_value(a) for a in body.attribute}
    zeros = ["fc1_zero_point", "fc2_zero_point"] if bits == 4 else []
    body.CopyFrom(helper.make_node(
        "QMoE", [body.input[0], body.input[1], "fc1", "fc1_scale", "", "fc2", "fc2_scale", "", "", "", ""] + zeros,
        list(body.output), name=body.name, domain=MS_DOMAIN,
        **{**attrs, "expert_weight_bits": bits, "weights_prepacked": 0,
           "accuracy_level": quant.accuracy_level, "block_size": info["block_size"]}))
    if bits == 4:
        model.CopyFrom(onnx.inliner.inline_selected_functions(model, [(PERSEUS_DOMAIN, OP_SPARSE_MOE)]))
    drop_unused(model)
    return info
