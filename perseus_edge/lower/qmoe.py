"""ort-cpu: quantized experts in onnxruntime's QMoE kernel.

`quantize(program, scheme, target="ort-cpu")` leaves the perseus.MoE expert weights in float and
records how they are to be quantized (`experts` in the quantization record): the QMoE kernel has
its own weight layout (per-expert blocks along the expert width, zero-padded), so the experts are
quantized here, once, from the float weights, after `moe_to_ort` has laid them out for the kernel.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from perseus_edge.modelfile.graph import add_initializer, drop_unused, initializers
from perseus_edge.modelfile.names import MS_DOMAIN
from perseus_edge.quantize import weights as qw
from perseus_edge.quantize.rewrite import MatMulQuant


def to_qmoe(model: onnx.ModelProto, quant: MatMulQuant) -> dict:
    """com.microsoft.MoE (`moe_to_ort`'s lowering of perseus.MoE) -> com.microsoft.QMoE.

    int8: 8-bit blocks, symmetric (implicit zero point 128). int4: 4-bit blocks with zero points.
    Blocks for 8-bit too: onnxruntime's block-wise path is faster at decode than its
    per-column one (studies/perf/README.md: 1.2x per 54M int8 step). The kernel needs hidden and
    expert widths divisible by its block size, so the expert width F is zero-padded to a multiple
    of the block (exact: padded gate/up rows are 0, silu(0) * 0 = 0, padded fc2 columns are 0).
    The block is the largest power of two <= `quant.block_size` (and >= 16) with the least padding.
    Returns {"nodes", "bits", "block_size", "padded_width"}.
    """
    inits = initializers(model)
    info: dict = {}
    for node in model.graph.node:
        if (node.domain, node.op_type) != (MS_DOMAIN, "MoE"):
            continue
        x, logits, fc1_name, _, fc2_name = list(node.input) + [""] * (5 - len(node.input))
        fc1, fc2 = numpy_helper.to_array(inits[fc1_name]), numpy_helper.to_array(inits[fc2_name])
        n_exp, d, f = fc2.shape
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("activation_type", b"") not in (b"swiglu", "swiglu") or attrs.get("swiglu_fusion") != 1:
            raise ValueError("QMoE lowering expects the exporter's fused interleaved SwiGLU experts")
        bits = 8 if quant.kind == "int8" else quant.bits
        candidates = [b for b in (256, 128, 64, 32, 16) if 16 <= b <= quant.block_size and d % b == 0]
        if not candidates:
            raise ValueError(f"hidden size {d} is not a multiple of 16: QMoE cannot block it")
        block = min(candidates, key=lambda b: (-f % b, -b))
        fp = f + -f % block
        if fp != f:  # zero-pad the expert width
            g = np.zeros((n_exp, 2 * fp, d), np.float32)
            g[:, :2 * f] = fc1
            fc1 = g
            fc2 = np.concatenate([fc2, np.zeros((n_exp, d, fp - f), np.float32)], axis=2)

        def pack(w: np.ndarray):  # w [E, N, K] -> packed [E, N, K*bits/8], scales, zero points
            ts = [qw.quantize_blockwise(w[e].T, bits, block, symmetric=(bits == 8)) for e in range(n_exp)]
            packed = np.stack([t.packed.reshape(t.n, -1) for t in ts])
            scales = np.stack([t.scales for t in ts])
            zeros = None if bits == 8 else np.stack([t.zero_points for t in ts])
            return packed, scales, zeros

        p1, s1, z1 = pack(fc1)
        p2, s2, z2 = pack(fc2)
        names = [add_initializer(model, f"{fc1_name}.q", p1), add_initializer(model, f"{fc1_name}.scale", s1),
                 add_initializer(model, f"{fc2_name}.q", p2), add_initializer(model, f"{fc2_name}.scale", s2)]
        inputs = [x, logits, names[0], names[1], "", names[2], names[3], "", "", "", ""]
        if z1 is not None:
            inputs += [add_initializer(model, f"{fc1_name}.zero_point", z1),
                       add_initializer(model, f"{fc2_name}.zero_point", z2)]
        extra = dict(expert_weight_bits=bits, weights_prepacked=0, accuracy_level=quant.accuracy_level,
                     block_size=block)
        new = helper.make_node("QMoE", inputs, list(node.output), name=node.name + "/q", domain=MS_DOMAIN,
                               **{**attrs, **extra})
        node.CopyFrom(new)
        info = {"nodes": info.get("nodes", 0) + 1, "bits": bits, "block_size": block,
                "expert_width": f, "padded_width": fp}
    drop_unused(model)
    return info
