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

from perseus_edge.modelfile.graph import (Builder, add_initializer, calls, drop_unused, function, initializers,
                                          replace_nodes)
from perseus_edge.modelfile.names import MS_DOMAIN, OP_SPARSE_MOE, PERSEUS_DOMAIN
from perseus_edge.quantize import weights as qw
from perseus_edge.quantize.rewrite import MatMulQuant, refuse_inline_moe


def to_qmoe(model: onnx.ModelProto, quant: MatMulQuant) -> dict:
    """perseus.SparseMoE (`moe_to_ort`'s lowering of perseus.MoE) with QMoE's quantized experts:
    inside its body com.microsoft.MoE becomes com.microsoft.QMoE, and every call passes its
    layer's codes and scales (fc1, fc2 become uint8 codes; formals fc1_scale, fc2_scale and, for
    4 bits, fc1_zero_point, fc2_zero_point are appended).

    int8: 8-bit blocks, symmetric (implicit zero point 128), QMoE's layout. int4: 4-bit blocks
    with zero points, in the native kernel's panels (`pack_panels`), which the body unpacks for
    QMoE (`unpack_panels`: onnxruntime folds those nodes once, at session start). The calls stay,
    so the native kernel (runtime/kernels/sparse_moe.cc) runs them where it is built: with 4 bits
    it multiplies int8 blocks of the activations, as QMoE's accuracy_level 4 does. With fp32
    activations asked for (accuracy_level 0), 4-bit experts stay in QMoE's layout and the body is
    inlined into the graph, so onnxruntime's QMoE computes them as asked.
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
    panels = bits == 4 and quant.accuracy_level != 0
    info: dict = {}
    for call in calls(model, OP_SPARSE_MOE):
        fc1_name, fc2_name = call.input[3:5]
        fc1, fc2 = numpy_helper.to_array(inits[fc1_name]), numpy_helper.to_array(inits[fc2_name])
        if _drop_attribute(call, "fc2_transposed"):  # float fc2 [E, F, d] -> QMoE's [E, d, F]
            fc2 = fc2.transpose(0, 2, 1)
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
        if panels:
            p1, s1, z1 = pack_panels(p1, s1, z1)
            p2, s2, z2 = pack_panels(p2, s2, z2)
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
    feeds = {name: name for name in formals}
    b = Builder(scope="unpanel")
    if panels:  # the body unpacks the panels for QMoE
        for side in ("fc1", "fc2"):
            feeds[side], feeds[f"{side}_scale"], feeds[f"{side}_zero_point"] = unpack_panels(
                b, side, f"{side}_scale", f"{side}_zero_point")
    body.CopyFrom(helper.make_node(
        "QMoE", [body.input[0], body.input[1], feeds["fc1"], feeds["fc1_scale"], "", feeds["fc2"], feeds["fc2_scale"],
                 "", "", "", ""] + [feeds[z] for z in zeros],
        list(body.output), name=body.name, domain=MS_DOMAIN,
        **{**attrs, "expert_weight_bits": bits, "weights_prepacked": 0,
           "accuracy_level": quant.accuracy_level, "block_size": info["block_size"]}))
    plain = [n for n in f.node if not (n.op_type == "Transpose" and list(n.input) == ["fc2"])]  # codes: QMoE's layout
    at = plain.index(body)
    replace_nodes(f, plain[:at] + b.nodes + plain[at:])
    _drop_attribute(f, "fc2_transposed")
    if bits == 4 and not panels:
        model.CopyFrom(onnx.inliner.inline_selected_functions(model, [(PERSEUS_DOMAIN, OP_SPARSE_MOE)]))
    drop_unused(model)
    return info


def pack_panels(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray):
    """QMoE's 4-bit experts (codes [E, N, K/2] low nibble first, scales [E, N, B], zero points
    [E, N, ceil(B/2)] packed the same way) -> the native kernel's panels of 16 rows: codes
    [E, N/16, K/8, 16, 4], where byte j of row i in group g holds codes 8g + j (low nibble) and
    8g + 4 + j (high), so one 64-byte vector feeds two integer dot products per token with no
    reordering; scales and zero points (one byte each) [E, N/16, B, 16]."""
    e, n, half = packed.shape
    if n % 16 or (2 * half) % 8:
        raise ValueError(f"4-bit experts need rows in 16s and widths in 8s, got [{n}, {2 * half}]")
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(e, n, 2 * half)  # code k at [..., k]
    c = codes.reshape(e, n // 16, 16, 2 * half // 8, 2, 4).transpose(0, 1, 3, 2, 4, 5)  # [E, P, G, 16, h, j]
    q = (c[..., 0, :] | (c[..., 1, :] << 4)).astype(np.uint8)
    blocks = scales.shape[-1]
    z = np.stack([zeros & 0x0F, zeros >> 4], axis=-1).reshape(e, n, -1)[..., :blocks]

    def panel(a):
        return np.ascontiguousarray(a.reshape(e, n // 16, 16, blocks).transpose(0, 1, 3, 2))

    return np.ascontiguousarray(q), panel(scales).astype(np.float32), panel(z).astype(np.uint8)


def unpack_panels(b: Builder, codes: str, scales: str, zeros: str) -> tuple[str, str, str]:
    """Nodes (standard ops) that turn `pack_panels`' tensors back into QMoE's layout; their inputs
    are initializers, so onnxruntime computes them once, when the session starts."""
    def low_high(x):  # uint8 -> (x & 15, x >> 4)
        return b.BitwiseAnd(x, b.const(15, np.uint8)), b.BitShift(x, b.const(4, np.uint8), direction="RIGHT")

    def pairs(x):  # [..., 2m] | [..., 2m + 1] << 4 over the last axis (even length)
        two = b.Reshape(x, b.const([0, 0, 0, -1, 2]))
        even, odd = b.Gather(two, b.const(0), axis=4), b.Gather(two, b.const(1), axis=4)
        return b.BitwiseOr(even, b.BitShift(odd, b.const(4, np.uint8), direction="LEFT"))

    def rows(x):  # [E, P, 16, W] -> [E, N, W]
        return b.Reshape(x, b.Concat(b.const([0, -1]), b.Shape(x, start=3), axis=0))

    lo, hi = low_high(codes)  # [E, P, G, 16, 4] each: codes 8g + j, 8g + 4 + j
    both = b.Concat(b.Unsqueeze(lo, b.const([4])), b.Unsqueeze(hi, b.const([4])), axis=4)  # [E, P, G, 16, 2, 4]
    flat = b.Reshape(b.Transpose(both, perm=[0, 1, 3, 2, 4, 5]), b.const([0, 0, 0, -1]))  # [E, P, 16, K]
    q = rows(pairs(flat))
    s = rows(b.Transpose(scales, perm=[0, 1, 3, 2]))
    z = b.Transpose(zeros, perm=[0, 1, 3, 2])  # [E, P, 16, B], B padded to even with zeros
    odd = b.Mod(b.Shape(z, start=3), b.const([2]))
    z = b.Pad(z, b.Concat(b.const([0, 0, 0, 0, 0, 0, 0]), odd, axis=0))
    return q, s, rows(pairs(z))


def _drop_attribute(node, name: str) -> bool:
    """Remove attribute `name` from a node (or a function's attribute list); whether it was set."""
    if isinstance(node, onnx.FunctionProto):
        kept = [a for a in node.attribute if a != name]
        found = len(kept) != len(node.attribute)
        del node.attribute[:]
        node.attribute.extend(kept)
        return found
    kept = [a for a in node.attribute if a.name != name]
    found = any(a.name == name and helper.get_attribute_value(a) for a in node.attribute)
    del node.attribute[:]
    node.attribute.extend(kept)
    return found
