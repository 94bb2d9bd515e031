"""The lowering passes: rewrites of `perseus` ops into faster onnxruntime kernels, per target.

`portable` (the default) keeps the graph as built: standard opset-24 operators plus the perseus
functions, runnable by any ONNX runtime. `ort-cpu` applies the rewrites below; each edits the
ModelProto in place and returns how many ops it replaced. A rewrite stays in this list only while
it measures faster than the portable graph on onnxruntime's CPU provider
(`python studies/export/measure.py`, numbers in export/README.md); the candidates that did
not pay off are described there, not kept here.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from perseus_edge import modelfile as mf
from perseus_edge.modelfile.graph import Builder, drop_unused, ensure_opset, replace_nodes, shared_mlp
from perseus_edge.modelfile.names import MS_DOMAIN


def moe_to_ort(model: onnx.ModelProto) -> int:
    """perseus.MoE -> perseus.SparseMoE: the same routing, then only the selected experts.

    The portable body computes every expert; SparseMoE reads the k selected ones. Its inputs are
    x, router, router_bias and the experts in onnxruntime's MoE layout: fc1 [E, 2F, d] (gate and
    up rows interleaved: its fused SwiGLU with alpha 1, beta 0, no clamp, silu(gate) * up) and
    fc2 [E, d, F], here passed transposed ([E, F, d], attribute fc2_transposed = 1: the native
    kernel reads a hidden unit's weights to every output as one row, where [E, d, F] gives each
    output a row of only F values) and transposed back in the body; `lower.qmoe` later makes them
    QMoE's block-quantized codes (in its layout, the attribute dropped). Its body
    (`sparse_moe`) is the routing in standard ops + com.microsoft.MoE, so stock onnxruntime runs
    it; the native kernel (runtime/kernels/sparse_moe.cc) computes the whole op in one call.

    The shared-expert MLP beside it (`modelfile.graph.shared_mlp`: DeepSeek's shared experts, n_shared x F wide)
    joins the call as n_shared more experts at the end of fc1 / fc2, always selected with weight
    1 (attribute `n_shared`): exact, as SwiGLU is per hidden unit, and its six nodes per layer
    (two matmuls, split, swish, mul, add) become part of the one kernel (a decode step measured
    up to 1.24x faster without them, studies/perf/README.md section 13).
    """
    inits = {t.name: t for t in model.graph.initializer}
    nodes, sites, folded = [], [], set()
    for node in model.graph.node:
        if node.output[0] in folded:
            continue
        if (node.domain, node.op_type) != (mf.PERSEUS_DOMAIN, mf.OP_MOE) or _routing_variant(node):
            nodes.append(node)  # softmax or group-limited routing: the portable op stays
            continue
        x, router, bias, w_gate, w_up, w_down = node.input
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        gate, up, down = (numpy_helper.to_array(inits[n]) for n in (w_gate, w_up, w_down))
        n_experts = numpy_helper.to_array(inits[router]).shape[1]
        d, f = gate.shape[0], gate.shape[1] // n_experts
        fc1 = _interleaved(gate, up, n_experts, f)
        fc2 = down.reshape(n_experts, f, d)  # [E, F, d]: see fc2_transposed below
        shared = shared_mlp(model, node, inits, f)
        n_shared, output = 0, list(node.output)
        if shared is not None:  # S more experts: hidden units [j F, (j + 1) F) of the shared MLP
            gate_up, down_s, add, dropped, _ = shared
            n_shared = gate_up.shape[1] // (2 * f)
            half = n_shared * f
            fc1 = np.concatenate([fc1, _interleaved(gate_up[:, :half], gate_up[:, half:], n_shared, f)])
            fc2 = np.concatenate([fc2, down_s.reshape(n_shared, f, d)])
            output = list(add.output)
            folded.update(dropped)
            nodes = [n for n in nodes if n.output[0] not in dropped]  # those before the MoE node
        prefix = w_gate.rsplit("gate_proj", 1)[0]
        fc1_name, fc2_name = prefix + "fc1", prefix + "fc2"
        model.graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(fc1), fc1_name),
                                        numpy_helper.from_array(np.ascontiguousarray(fc2), fc2_name)])
        call = helper.make_node(mf.OP_SPARSE_MOE, [x, router, bias, fc1_name, fc2_name], output,
                                name=node.name, domain=mf.PERSEUS_DOMAIN, top_k=attrs["top_k"],
                                normalize=attrs["normalize"], scaling=attrs["scaling"], fc2_transposed=1,
                                **({"n_shared": n_shared} if n_shared else {}))
        nodes.append(call)
        sites.append((call, (attrs["top_k"], attrs["normalize"], attrs["scaling"], n_experts, n_shared)))
    if not sites:
        return 0
    if len({key for _, key in sites}) != 1:
        raise ValueError("perseus.MoE calls disagree on their routing attributes: one SparseMoE body cannot serve them")
    replace_nodes(model.graph, nodes)
    drop_unused(model)
    model.functions.append(sparse_moe(*sites[0][1]))
    ensure_opset(model, MS_DOMAIN, 1)
    return len(sites)


def _interleaved(gate: np.ndarray, up: np.ndarray, n: int, f: int) -> np.ndarray:
    """gate, up [d, n f] (n experts' columns side by side) -> fc1 [n, 2f, d], gate and up rows
    interleaved (onnxruntime MoE's fused SwiGLU layout)."""
    d = gate.shape[0]
    fc1 = np.empty((n, 2 * f, d), np.float32)
    fc1[:, 0::2] = gate.reshape(d, n, f).transpose(1, 2, 0)
    fc1[:, 1::2] = up.reshape(d, n, f).transpose(1, 2, 0)
    return fc1


def sparse_moe(top_k: int, normalize: int, scaling: float, n_experts: int, n_shared: int = 0,
               fc2_transposed: int = 1) -> onnx.FunctionProto:
    """perseus.SparseMoE's body, specialised to the model's routing attributes (one function per
    model; the calls carry the same values as attributes, which the native kernel reads).

    ORT's MoE kernel routes by a softmax over its `router_probs` input, which cannot express
    sigmoid scores with a selection-only bias. So the routing is ours (TopK on biased scores) and
    the kernel gets logits that reproduce our weights exactly: log(weight) on the selected experts,
    -1e9 elsewhere, and 0 (weight 1) on the n_shared always-selected experts at the end; its
    softmax over the top_k + n_shared selected divides by Z = sum of those weights, so its output
    is multiplied by Z again.
    """
    b = Builder()
    scores = b.Reshape(b.Sigmoid(b.MatMul("x", "router")), b.const([-1, n_experts]), _name="scores")  # [N, E]
    _, idx = b.TopK(b.Add(scores, "router_bias"), b.const([top_k]), axis=-1, _outputs=2)
    chosen = b.GatherElements(scores, idx, axis=-1)
    weights = chosen if scaling == 1.0 else b.Mul(chosen, b.const(scaling, np.float32))
    if normalize:
        weights = b.Div(weights, b.ReduceSum(chosen, b.const([-1]), keepdims=1), _name="weights")
    floor = numpy_helper.from_array(np.array([-1e9], np.float32))
    logits = b.ScatterElements(b.ConstantOfShape(b.Shape(scores), value=floor), idx, b.Log(weights),
                               axis=-1, _name="router_logits")
    if n_shared:
        rows = b.Concat(b.Shape(scores, end=1), b.const([n_shared]), axis=0)
        zero = numpy_helper.from_array(np.array([0.0], np.float32))
        logits = b.Concat(logits, b.ConstantOfShape(rows, value=zero), axis=-1, _name="router_logits_shared")
    # the kernel takes x as [B, T, d] (its output has x's shape) and router logits as [N, E (+ S)]
    exact = not n_shared and normalize and scaling == 1.0  # Z = 1
    fc2 = b.Transpose("fc2", perm=[0, 2, 1], _name="fc2_rows") if fc2_transposed else "fc2"
    y = b.op("MoE", "x", logits, "fc1", "", fc2, _domain=MS_DOMAIN, k=top_k + n_shared, activation_type="swiglu",
             swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, swiglu_limit=float("inf"),
             normalize_routing_weights=1, _outputs=["y"] if exact else 1)
    if not exact:
        total = b.ReduceSum(weights, b.const([-1]), keepdims=1)  # [N, 1]: Z
        if n_shared:
            total = b.Add(total, b.const(float(n_shared), np.float32))
        b.Mul(y, b.Reshape(total, b.Concat(b.Shape("x", end=-1), b.const([1]), axis=0)), _outputs=["y"])
    f = b.function(mf.PERSEUS_DOMAIN, mf.OP_SPARSE_MOE, ["x", "router", "router_bias", "fc1", "fc2"], ["y"],
                   ["top_k", "normalize", "scaling"] + (["n_shared"] if n_shared else [])
                   + (["fc2_transposed"] if fc2_transposed else []), sparse_moe.__doc__)
    f.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return f


def _routing_variant(node: onnx.NodeProto) -> bool:
    """DeepSeek-V2 softmax scores or group-limited selection (export/ops.py `routing_attributes`):
    the routing rebuilt above is the default sigmoid one, so these keep the portable op."""
    return any(a.name in ("softmax", "n_group") for a in node.attribute)


def skip_norm_to_ort(model: onnx.ModelProto) -> int:
    """Add(a, b) -> RMSNormalization  =>  com.microsoft.SkipSimplifiedLayerNormalization(a, b).

    The residual add and the next layer's norm become one kernel; the sum the residual stream
    carries on is the kernel's 4th output (input + skip). One node fewer per norm after the first
    (16 for an 8-layer model): at decode, where a step is hundreds of tiny kernels, every node
    costs its dispatch.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    fused, count = {}, 0
    for node in model.graph.node:
        add = producer.get(node.input[0]) if node.op_type == "RMSNormalization" and not node.domain else None
        if add is None or add.op_type != "Add" or add.domain or id(add) in fused or add.output[0] in outputs:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("axis", -1) != -1 or attrs.get("stash_type", 1) != 1:
            continue
        fused[id(add)] = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], node.input[1]],
            [node.output[0], "", "", add.output[0]], name=node.name + "/skip", domain=MS_DOMAIN,
            epsilon=attrs.get("epsilon", 1e-5))
        fused[id(node)] = None
        count += 1
    if count:
        nodes = []
        for node in model.graph.node:
            if id(node) not in fused:
                nodes.append(node)
            elif fused[id(node)] is None:  # the norm: emitted where its Add was
                continue
            else:
                nodes.append(fused[id(node)])
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        ensure_opset(model, MS_DOMAIN, 1)
    return count


def int8_batched_matmul_to_ort(model: onnx.ModelProto) -> int:
    """DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_scale * c) in the perseus function
    bodies  =>  com.microsoft.DynamicQuantizeMatMul(x, w_q, c).

    This is the quantizer's int8 matmul over MLA's per-head weights (`quantize.rewrite.
    quantize_absorbed`: W_UK, W_UV, [H, K, N]). onnxruntime fuses the same pattern itself only
    when the weight is 2-D; its DynamicQuantizeMatMul kernel runs the batched 3-D weight as well,
    and the fused form is 1.13x faster per 54M int8 decode step than the four separate kernels
    (studies/perf/README.md). The per-(head, column) scale stays the Mul after it.
    """
    count = 0
    for f in model.functions:
        producer = {o: n for n in f.node for o in n.output}
        readers: dict[str, list] = {}
        for n in f.node:
            for i in n.input:
                readers.setdefault(i, []).append(n)
        replaced: dict[int, onnx.NodeProto | None] = {}
        for mmi in f.node:
            if (mmi.op_type, mmi.domain) != ("MatMulInteger", "") or len(mmi.input) != 3:
                continue
            dql = producer.get(mmi.input[0])
            cast = readers.get(mmi.output[0], [None])
            if (dql is None or dql.op_type != "DynamicQuantizeLinear" or mmi.input[2] != dql.output[2]
                    or len(cast) != 1 or cast[0].op_type != "Cast"):
                continue
            mul = readers.get(cast[0].output[0], [None])
            if len(mul) != 1 or mul[0].op_type != "Mul":
                continue
            mul = mul[0]
            unit = producer.get(mul.input[1] if mul.input[0] == cast[0].output[0] else mul.input[0])
            if unit is None or unit.op_type != "Mul" or len(readers[unit.output[0]]) != 1 or dql.output[1] not in unit.input:
                continue
            c = unit.input[1] if unit.input[0] == dql.output[1] else unit.input[0]
            if c not in producer or producer[c].op_type != "Constant":  # b_scale: a scalar constant
                continue
            replaced.update({id(mmi): None, id(cast[0]): None, id(unit): None})
            replaced[id(mul)] = helper.make_node("DynamicQuantizeMatMul", [dql.input[0], mmi.input[1], c],
                                                 list(mul.output), name=mul.name + "/fused", domain=MS_DOMAIN)
            count += 1
        if not replaced:
            continue
        body = [replaced.get(id(n), n) for n in f.node]
        body = [n for n in body if n is not None]
        used = {i for n in body for i in n.input} | set(f.output)
        body = [n for n in body if n.op_type != "DynamicQuantizeLinear" or any(o in used for o in n.output)]
        del f.node[:]
        f.node.extend(body)
        if not any(o.domain == MS_DOMAIN for o in f.opset_import):
            f.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if count:
        ensure_opset(model, MS_DOMAIN, 1)
    return count


def head_to_linear(model: onnx.ModelProto) -> int:
    """MatMul(x, W [d, vocab]) writing the logits, W a float initializer read by no other node
    =>  perseus.Linear(x, W^T [vocab, d]) (the same initializer name, transposed in place).

    A decode step's largest single weight (the 54M's 16.8 MB of 70.6) read by the native kernel
    (runtime/kernels/linear.cc: one dot per vocabulary row, rows read in order and split over the
    threads) instead of onnxruntime's MatMul on its packed copy: a 54M fp32 step 0.99-1.18x at 1
    thread (5 alternating pairs, 4 of them 1.09x or more), 1.13-1.20x at 2 (studies/perf/README.md
    section 15). The body (`linear`) transposes back, so stock onnxruntime runs it, folding the
    transpose at load. The quantizer turns it back into the MatMul it quantizes
    (`quantize.rewrite.linear_to_matmul`): only a head that stays float is lowered.
    """
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    count = 0
    for i, node in enumerate(model.graph.node):
        w = inits.get(node.input[1]) if (node.op_type, node.domain) == ("MatMul", "") else None
        if (w is None or mf.LOGITS not in node.output or w.data_type != onnx.TensorProto.FLOAT
                or len(w.dims) != 2 or readers[w.name] != 1):
            continue
        w.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T), w.name))
        model.graph.node[i].CopyFrom(helper.make_node(mf.OP_LINEAR, list(node.input), list(node.output),
                                                      name=node.name, domain=mf.PERSEUS_DOMAIN))
        count += 1
    if count and not any((f.domain, f.name) == (mf.PERSEUS_DOMAIN, mf.OP_LINEAR) for f in model.functions):
        model.functions.append(linear())
        ensure_opset(model, mf.PERSEUS_DOMAIN, 1)
    return count


def linear() -> onnx.FunctionProto:
    """perseus.Linear's body: y = x W^T, W [N, K] (torch's nn.Linear layout)."""
    b = Builder()
    b.MatMul("x", b.Transpose("weight", perm=[1, 0]), _outputs=["y"])
    return b.function(mf.PERSEUS_DOMAIN, mf.OP_LINEAR, ["x", "weight"], ["y"], [], linear.__doc__)


REWRITES = {"ort-cpu": [moe_to_ort, skip_norm_to_ort, int8_batched_matmul_to_ort, head_to_linear]}


def lower(model: onnx.ModelProto, target: str) -> tuple[onnx.ModelProto, list[str]]:
    """Apply the target's rewrites; returns the model and the names of those that changed it.
    Each rewrite finds nothing left to do in a graph it already rewrote, so lowering again (a
    program quantized after it was lowered) only rewrites what quantization added."""
    applied = [rewrite.__name__ for rewrite in REWRITES.get(target, []) if rewrite(model)]
    if applied:
        drop_unused(model)
    return model, applied
