"""Graph rewrites of an exported model (onnx ModelProto with its weights loaded), one per concern.

Each pass edits the model in place and returns how many things it changed:

    quantize_matmuls     main-graph MatMul(x, W) with a 2-D weight initializer -> quantized matmul
    quantize_op_weights  the weights a perseus op (model-local function) multiplies by: the
                         function body gets the quantized matmul, the call sites the quantized
                         tensors; the perseus node itself stays (same domain, name, attributes)
    quantize_embedding   Gather(embed_tokens, input_ids) -> a gather of the quantized table
    store_int8           3-D weights feeding a perseus op (MLA's W_UK / W_UV): stored int8,
                         Cast * scale in front of the op, which onnxruntime folds at load
    int8_cache           the TensorScatter cache writes inside the attention functions store
                         int8 rows + per-row scales; the reads dequantize the valid rows
    weights_to_fp16      float initializers stored as float16, Cast back to float32 at load

`MatMulQuant` says how one matmul is quantized (int8 dynamic, or block-wise weight-only n-bit);
the same object emits the nodes in the main graph and inside function bodies, so experts and
projections get identical numerics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from perseus_edge import modelfile as mf
from perseus_edge.modelfile.graph import (Builder, add_initializer, drop_unused, ensure_opset, function,
                                          initializers, replace_nodes, shared_mlp)
from perseus_edge.errors import PerseusError
from perseus_edge.modelfile.names import MS_DOMAIN
from perseus_edge.quantize import weights as qw

FLOAT = TensorProto.FLOAT


# ----------------------------------------------------------------------------- one quantized matmul
@dataclass(frozen=True)
class MatMulQuant:
    """How a MatMul(x, W [K, N]) is quantized.

    kind "int8": dynamic quantization, the QOperator pattern of onnxruntime's `quantize_dynamic`
    (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul by x_scale * w_scale; standard ONNX
    ops that onnxruntime fuses into one DynamicQuantizeMatMul), per-output-column weight scales.
    kind "nbits": weight-only block-wise `com.microsoft.MatMulNBits`.
    """

    kind: str  # "int8" | "nbits"
    unsigned: bool = False  # int8: uint8 weights with zero point 128 (u8 x u8 kernels)
    reduce_range: bool = False  # int8: 7-bit weights (non-VNNI x86 saturation)
    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    method: str = "rtn"
    accuracy_level: int = 0

    def tensors(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """The initializers that replace w, keyed by role (q, scale, zero_point)."""
        if self.kind == "int8":
            t = qw.quantize_int8(w, unsigned=self.unsigned, reduce_range=self.reduce_range)
            out = {"q": t.q, "scale": t.scale}
            if self.unsigned:
                out["zero_point"] = t.zero_point
            return out
        t = qw.quantize_blockwise(w, self.bits, self.block_size, self.symmetric, self.method)
        out = {"q": t.packed, "scale": t.scales}
        if t.zero_points is not None:
            out["zero_point"] = t.zero_points
        return out

    def roles(self) -> list[str]:
        has_zero = self.unsigned if self.kind == "int8" else not self.symmetric  # hqq: float zero points
        return ["q", "scale"] + (["zero_point"] if has_zero else [])

    def emit(self, b: Builder, x: str, names: dict[str, str], k: int, n: int, out: str | None = None,
             dq_cache: dict | None = None) -> str:
        """Nodes computing x @ W from the quantized tensors `names`; returns the output name."""
        outputs = {"_outputs": [out]} if out else {}
        if self.kind == "nbits":
            return b.op("MatMulNBits", x, names["q"], names["scale"], names.get("zero_point", ""),
                        _domain=MS_DOMAIN, K=k, N=n, bits=self.bits, block_size=self.block_size,
                        accuracy_level=self.accuracy_level, **outputs)
        if dq_cache is not None and x in dq_cache:  # one activation quantization per input
            xq, xs, xz = dq_cache[x]
        else:
            xq, xs, xz = b.DynamicQuantizeLinear(x, _outputs=3)
            if dq_cache is not None:
                dq_cache[x] = (xq, xs, xz)
        inputs = [xq, names["q"], xz] + ([names["zero_point"]] if "zero_point" in names else [])
        acc = b.MatMulInteger(*inputs)
        return b.Mul(b.Cast(acc, to=FLOAT), b.Mul(xs, names["scale"]), **outputs)

    def describe(self) -> dict:
        if self.kind == "int8":
            return {"op": "DynamicQuantizeLinear+MatMulInteger", "weights": "uint8" if self.unsigned else "int8",
                    "activations": "uint8 per tensor, dynamic", "per_channel": True,
                    "reduce_range": self.reduce_range, "symmetric_weights": True}
        return {"op": "com.microsoft.MatMulNBits", "bits": self.bits, "block_size": self.block_size,
                "symmetric": self.symmetric, "method": self.method, "accuracy_level": self.accuracy_level}


# ----------------------------------------------------------------------------- main-graph matmuls
def linear_to_matmul(model: onnx.ModelProto) -> int:
    """perseus.Linear(x, W [N, K]) => MatMul(x, W^T) (the same initializer name, transposed back):
    undoes the ort-cpu lowering of a float LM head (`lower.passes.head_to_linear`) in a graph
    lowered before quantization, so the passes here see the head they quantize. Lowering after
    quantization lowers it again if it stayed float32."""
    inits = {t.name: t for t in model.graph.initializer}
    count = 0
    for i, node in enumerate(model.graph.node):
        if (node.domain, node.op_type) != (mf.PERSEUS_DOMAIN, mf.OP_LINEAR) or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        w.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T), w.name))
        model.graph.node[i].CopyFrom(helper.make_node("MatMul", list(node.input), list(node.output), name=node.name))
        count += 1
    if count:
        drop_unused(model)  # the Linear function, if no call is left
    return count


def quantize_matmuls(model: onnx.ModelProto, quant: MatMulQuant, skip: set[str] = frozenset()) -> list[str]:
    """Quantize every main-graph MatMul whose B is a 2-D float initializer (names in `skip` stay).
    Returns the quantized weight names."""
    inits = initializers(model)
    nodes, done, dq_cache = [], [], {}
    b = Builder()
    for node in model.graph.node:
        w_name = node.input[1] if node.op_type == "MatMul" and not node.domain else None
        t = inits.get(w_name) if w_name else None
        if t is None or len(t.dims) != 2 or t.data_type != FLOAT or w_name in skip:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(t)
        b.scope = f"{w_name}/q"
        names = {role: add_initializer(model, f"{w_name}.{role}", arr)
                 for role, arr in quant.tensors(w).items()}
        start = len(b.nodes)
        quant.emit(b, node.input[0], names, w.shape[0], w.shape[1], out=node.output[0], dq_cache=dq_cache)
        nodes.extend(b.nodes[start:])
        done.append(w_name)
    replace_nodes(model.graph, nodes)
    if quant.kind == "nbits" and done:
        ensure_opset(model, MS_DOMAIN)
    drop_unused(model)
    return done


# ----------------------------------------------------------------------------- weights of a perseus op
def _call_sites(model: onnx.ModelProto, f, op: str) -> tuple[list, dict, dict[str, int]]:
    """(the graph's calls of the perseus op `op`, the model's initializers, formal name -> position)."""
    calls = [n for n in model.graph.node if (n.domain, n.op_type) == (mf.PERSEUS_DOMAIN, op)]
    return calls, initializers(model), {name: i for i, name in enumerate(f.input)}


def quantize_op_weights(model: onnx.ModelProto, op: str, formals: list[str], quant: MatMulQuant) -> list[str]:
    """Quantize the 2-D weights that the function `op` multiplies by (its formal inputs `formals`).

    Inside the function body each `MatMul(a, formal)` becomes `quant`'s matmul over new formal
    inputs `{formal}_q`, `{formal}_scale` (, `{formal}_zero_point`); at every call site the
    initializer passed for `formal` is replaced by its quantized tensors. K and N are written into
    the body as constants, so every call site must pass weights of one shape (true of every layer
    of one model: the function is model-local). Returns the quantized initializer names.
    """
    f = function(model, op)
    if f is None:
        return []
    calls, inits, position = _call_sites(model, f, op)
    shapes: dict[str, tuple] = {}
    for formal in formals:
        for call in calls:
            t = inits.get(call.input[position[formal]])
            if t is None or len(t.dims) != 2 or t.data_type != FLOAT:
                raise ValueError(f"{op}.{formal} of {call.name} is not a 2-D float initializer")
            if shapes.setdefault(formal, tuple(t.dims)) != tuple(t.dims):
                raise ValueError(f"{op}.{formal}: call sites disagree on the weight shape")
    roles = quant.roles()
    # the function body
    body, b, dq_cache = [], Builder(), {}
    for node in f.node:
        if node.op_type == "MatMul" and not node.domain and node.input[1] in formals:
            formal = node.input[1]
            k, n = shapes[formal]
            b.scope = formal
            start = len(b.nodes)
            quant.emit(b, node.input[0], {r: f"{formal}_{r}" for r in roles}, k, n, out=node.output[0],
                       dq_cache=dq_cache)
            body.extend(b.nodes[start:])
        else:
            body.append(node)
    replace_nodes(f, body)
    new_inputs = []
    for name in f.input:
        new_inputs += [f"{name}_{r}" for r in roles] if name in formals else [name]
    del f.input[:]
    f.input.extend(new_inputs)
    if quant.kind == "nbits" and not any(o.domain == MS_DOMAIN for o in f.opset_import):
        f.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        ensure_opset(model, MS_DOMAIN)
    # the call sites
    def replace(arg: str, w: np.ndarray) -> list[str]:
        tensors = quant.tensors(w)
        return [add_initializer(model, f"{arg}.{r}", tensors[r]) for r in roles]

    return _rebind_call_sites(model, calls, list(position), formals, inits, replace)


def _rebind_call_sites(model: onnx.ModelProto, calls, original: list[str], formals, inits: dict,
                       replace) -> list[str]:
    """At every call site, swap each weight argument bound to one of `formals` for the
    initializers `replace(name, array)` returns (the rewritten function's new inputs, in order);
    drop what no longer has a user. Returns the replaced weights' names."""
    done = []
    for call in calls:
        new_args = []
        for i, arg in enumerate(call.input):
            if i < len(original) and original[i] in formals:
                new_args += replace(arg, numpy_helper.to_array(inits[arg]))
                done.append(arg)
            else:
                new_args.append(arg)
        del call.input[:]
        call.input.extend(new_args)
    drop_unused(model)
    return done


# ----------------------------------------------------------------------------- embedding table
def quantize_embedding(model: onnx.ModelProto, bits: int, block_size: int = 32) -> str | None:
    """Gather(embed_tokens, ids): int8 -> per-row int8 table, Gather of rows and of their scales,
    Cast * scale (standard ops); int4 -> com.microsoft.GatherBlockQuantized (blocks of
    `block_size` along the hidden axis, 4-bit zero points). A table shared with a tied LM head
    (also read by Gemm) is left alone."""
    inits = initializers(model)
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and not n.domain and n.input[0] in inits]
    if len(gathers) != 1:
        return None
    node = gathers[0]
    name = node.input[0]
    if sum(name in n.input for n in model.graph.node) != 1:
        return None  # tied embeddings: the LM head reads the same table
    table = numpy_helper.to_array(inits[name])
    b = Builder(scope=f"{node.output[0]}/q")
    if bits == 8:
        q, scale = qw.quantize_rows_int8(table)
        rows = b.Gather(add_initializer(model, f"{name}.q", q), node.input[1])
        scales = b.Gather(add_initializer(model, f"{name}.scale", scale), node.input[1])
        b.Mul(b.Cast(rows, to=FLOAT), scales, _outputs=[node.output[0]])
    else:
        t = qw.quantize_blockwise(table.T, bits, block_size)  # blocks along the hidden axis
        vocab = table.shape[0]
        b.op("GatherBlockQuantized", add_initializer(model, f"{name}.q", t.packed.reshape(vocab, -1)),
             node.input[1], add_initializer(model, f"{name}.scale", t.scales),
             add_initializer(model, f"{name}.zero_point", t.zero_points),
             _domain=MS_DOMAIN, _outputs=[node.output[0]], bits=bits, block_size=block_size,
             gather_axis=0, quantize_axis=1)
        ensure_opset(model, MS_DOMAIN)
    nodes = []
    for n in model.graph.node:
        nodes.extend(b.nodes if n is node else [n])
    replace_nodes(model.graph, nodes)
    drop_unused(model)
    return name


# ----------------------------------------------------------------------------- int8 storage, folded at load
def store_int8(model: onnx.ModelProto, op: str, formals: list[str]) -> list[str]:
    """Weights of rank >= 3 passed to `op` (MLA's per-head W_UK [H, nope, r], W_UV [H, r, v]):
    stored int8 with a scale per (head, output column), turned back into float32 by
    Cast * scale in the main graph in front of the op. Both inputs are constants, so
    onnxruntime folds them at load: the file shrinks, the op computes exactly as before."""
    f = function(model, op)
    if f is None:
        return []
    position = {name: i for i, name in enumerate(f.input)}
    inits = initializers(model)
    front, done = [], []
    for call in (n for n in model.graph.node if (n.domain, n.op_type) == (mf.PERSEUS_DOMAIN, op)):
        for formal in formals:
            arg = call.input[position[formal]]
            t = inits.get(arg)
            if t is None or len(t.dims) < 3 or t.data_type != FLOAT or arg in done:
                continue
            w = numpy_helper.to_array(t)
            amax = np.abs(w).max(axis=-2, keepdims=True)
            scale = np.where(amax > 0, amax / 127, 1.0).astype(np.float32)
            q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            b = Builder(scope=f"{arg}/q")
            b.Mul(b.Cast(add_initializer(model, f"{arg}.q", q), to=FLOAT),
                  add_initializer(model, f"{arg}.scale", scale), _outputs=[f"{arg}.dequantized"])
            front.extend(b.nodes)
            call.input[position[formal]] = f"{arg}.dequantized"
            done.append(arg)
    replace_nodes(model.graph, front + list(model.graph.node))
    drop_unused(model)
    return done


def quantize_absorbed(model: onnx.ModelProto, op: str, formals: list[str], reduce_range: bool = False) -> list[str]:
    """The per-head weights `op` multiplies by (MLA's W_UK [H, nope, r], W_UV [H, r, v]) as int8
    matmuls inside its body: symmetric int8 with a scale per (head, output column), the
    activation quantized dynamically per tensor (DynamicQuantizeLinear -> MatMulInteger over the
    heads' batch -> Cast -> * x_scale -> * w_scale [H, 1, N]; standard ONNX, which onnxruntime
    runs as DynamicQuantizeMatMul + Mul).

    Why not keep them in float: they are a third of the bytes an int8 decode step reads (54M:
    8 MiB of 25 MiB in fp32), and the step is bound by those reads (54M int8: 1.2x faster per
    step, studies/perf/README.md). Each formal becomes `{formal}_q`, `{formal}_scale`; every call
    site passes its own layer's tensors. Returns the quantized initializer names.
    """
    f = function(model, op)
    if f is None:
        return []
    calls, inits, position = _call_sites(model, f, op)
    for formal in formals:
        for call in calls:
            t = inits.get(call.input[position[formal]])
            if t is None or len(t.dims) != 3 or t.data_type != FLOAT:
                return []  # not the absorbed per-head weights of an fp32 export
    body, b, dq_cache = [], Builder(), {}
    for node in f.node:
        if node.op_type == "MatMul" and not node.domain and node.input[1] in formals:
            formal = node.input[1]
            b.scope = formal
            start = len(b.nodes)
            x = node.input[0]
            if x not in dq_cache:
                dq_cache[x] = b.DynamicQuantizeLinear(x, _outputs=3)
            xq, xs, xz = dq_cache[x]
            unit = b.Mul(xs, b.Constant(value_float=1.0))  # a_scale * b_scale: the fusable form
            acc = b.Mul(b.Cast(b.MatMulInteger(xq, f"{formal}_q", xz), to=FLOAT), unit)
            b.Mul(acc, f"{formal}_scale", _outputs=[node.output[0]])
            body.extend(b.nodes[start:])
        elif node.op_type == "Shape" and node.input[0] in formals:  # sizes: the codes have the same shape
            node.input[0] = f"{node.input[0]}_q"
            body.append(node)
        else:
            body.append(node)
    replace_nodes(f, body)
    new_inputs = []
    for name in f.input:
        new_inputs += [f"{name}_q", f"{name}_scale"] if name in formals else [name]
    del f.input[:]
    f.input.extend(new_inputs)
    def replace(arg: str, w: np.ndarray) -> list[str]:  # w [H, K, N]: per column of [K, H*N]
        h, k, n = w.shape
        t = qw.quantize_int8(w.transpose(1, 0, 2).reshape(k, h * n), reduce_range=reduce_range)
        q = np.ascontiguousarray(t.q.reshape(k, h, n).transpose(1, 0, 2))
        return [add_initializer(model, f"{arg}.q", q), add_initializer(model, f"{arg}.scale", t.scale.reshape(h, 1, n))]

    return _rebind_call_sites(model, calls, list(position), formals, inits, replace)


# ----------------------------------------------------------------------------- int8 cache
def int8_cache(model: onnx.ModelProto) -> int:
    """Store every cache slot as int8 rows with one float32 scale per row (per token).

    Inside each attention function, `TensorScatter(past, new) -> present` followed by
    `Slice(present) -> valid` becomes: new rows quantized (scale = max|row| / 127), two
    TensorScatters (codes and scales, both updated in place by the runtime's binding), two
    Slices, and `Cast(valid codes) * valid scales` where the float rows were read. The graph
    gets inputs `past.{i}.{slot}_scale` [batch, C, 1] and outputs `present.{i}.{slot}_scale`
    beside the int8 `past/present.{i}.{slot}`. Returns the number of cache slots converted."""
    graph_inputs = {i.name: i for i in model.graph.input}
    graph_outputs = {o.name: o for o in model.graph.output}
    converted = 0
    for op in (mf.OP_LATENT_ATTENTION, mf.OP_ATTENTION):
        f = function(model, op)
        if f is None:
            continue
        slots = _convert_cache_function(f)
        for call in (n for n in model.graph.node if (n.domain, n.op_type) == (mf.PERSEUS_DOMAIN, op)):
            ins = dict(zip(f.input, call.input))
            outs = dict(zip(f.output, call.output))
            for past, present in slots:
                g_past, g_present = ins[past], outs[present]
                layer, slot = g_past.split(".")[1], g_past.split(".", 2)[2]
                scale_slot = mf.cache_scale_slot(slot)
                s_past, s_present = mf.past_name(int(layer), scale_slot), mf.present_name(int(layer), scale_slot)
                call.input.append(s_past)
                call.output.append(s_present)
                for value, new in ((graph_inputs[g_past], s_past), (graph_outputs[g_present], s_present)):
                    dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
                    value.type.tensor_type.elem_type = TensorProto.INT8
                    info = helper.make_tensor_value_info(new, FLOAT, dims[:-1] + [1])
                    (model.graph.input if value.name == g_past else model.graph.output).append(info)
                converted += 1
    return converted


def _convert_cache_function(f: onnx.FunctionProto) -> list[tuple[str, str]]:
    """Rewrite one attention function body for int8 cache slots; returns the (past, present)
    formal names converted. New formals `{past}_scale` / `{present}_scale` are appended."""
    scatters = [n for n in f.node if n.op_type == "TensorScatter" and n.input[0] in f.input
                and n.output[0] in f.output]
    slots = [(n.input[0], n.output[0]) for n in scatters]
    presents = {present: past for past, present in slots}
    body = []
    for node in f.node:
        if node in scatters:
            past, new, index = node.input[0], node.input[1], node.input[2]
            present = node.output[0]
            b = Builder(scope=f"{present}/int8")
            amax = b.ReduceMax(b.Abs(new), b.const([-1]), keepdims=1)
            scale = b.Div(b.Max(amax, b.const(1e-30, np.float32)), b.const(127.0, np.float32), _name="scale")
            codes = b.Cast(b.Clip(b.Round(b.Div(new, scale)), b.const(-127.0, np.float32),
                                  b.const(127.0, np.float32)), to=TensorProto.INT8, _name="codes")
            b.TensorScatter(past, codes, index, axis=1, _outputs=[present])
            b.TensorScatter(f"{past}_scale", scale, index, axis=1, _outputs=[f"{present}_scale"])
            body.extend(b.nodes)
        elif node.op_type == "Slice" and node.input[0] in presents:
            present = node.input[0]
            b = Builder(scope=f"{node.output[0]}/int8")
            codes = b.Slice(present, *node.input[1:])
            scales = b.Slice(f"{present}_scale", *node.input[1:])
            b.Mul(b.Cast(codes, to=FLOAT), scales, _outputs=[node.output[0]])
            body.extend(b.nodes)
        else:
            if any(i in presents for i in node.input):
                raise ValueError(f"{f.name}: unexpected reader {node.op_type} of a cache output")
            body.append(node)
    replace_nodes(f, body)
    f.input.extend(f"{past}_scale" for past, _ in slots)
    f.output.extend(f"{present}_scale" for _, present in slots)
    return slots


# ----------------------------------------------------------------------------- fp16 storage
def weights_to_fp16(model: onnx.ModelProto, min_elements: int = 1024, skip: set[str] = frozenset()) -> list[str]:
    """Float initializers of at least `min_elements` stored as float16 + a Cast to float32 (folded
    by onnxruntime at load: half the file, float32 compute); names in `skip` stay. Returns the
    converted names."""
    front, done = [], []
    for t in model.graph.initializer:
        if t.data_type != FLOAT or int(np.prod(t.dims)) < min_elements or t.name in skip:
            continue
        w = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array(w.astype(np.float16), f"{t.name}.fp16"))
        front.append(helper.make_node("Cast", [t.name], [t.name[:-5]], to=FLOAT, name=f"{t.name}/cast"))
        done.append(t.name[:-5])
    replace_nodes(model.graph, front + list(model.graph.node))
    return done


# ----------------------------------------------------------------------------- QDQ: weights outside the ops
def qdq_weights(model: onnx.ModelProto, names: list[str], bits: int = 4, block_size: int = 32,
                method: str = "rtn") -> list[str]:
    """Replace each float initializer W [K, N] in `names` by `DequantizeLinear(W.q, W.scale, W.zero_point)`
    producing a value of the same name: uint4 codes blocked along K (opset-21 blocked quantization,
    axis 0), so every consumer, perseus ops included, is left exactly as exported.

    Standard ONNX only. onnxruntime (1.32 measured) fuses `DequantizeLinear -> MatMul` into
    MatMulNBits at load, also across the boundary of an inlined model-local function, so the
    expert matmuls inside perseus.MoE run the same 4-bit kernel as the QOperator route."""
    if bits != 4 or method != "rtn":
        raise ValueError("the qdq format writes 4-bit rtn weights (uint4 zero points)")
    inits = initializers(model)
    front, done = [], []
    for name in names:
        w = numpy_helper.to_array(inits[name])
        k, n = w.shape
        t = qw.quantize_blockwise(w, 4, block_size)
        nb = t.scales.shape[1]
        codes = np.ascontiguousarray(qw._unpack(t.packed, 4, block_size).reshape(n, -1)[:, :k].T)  # [K, N]
        zeros = np.ascontiguousarray(qw._unpack(t.zero_points, 4, nb).T)  # [nb, N]
        model.graph.initializer.extend([_uint4(codes, f"{name}.q"), _uint4(zeros, f"{name}.zero_point")])
        add_initializer(model, f"{name}.scale", np.ascontiguousarray(t.scales.T))
        front.append(helper.make_node("DequantizeLinear", [f"{name}.q", f"{name}.scale", f"{name}.zero_point"],
                                      [name], axis=0, block_size=block_size, name=f"{name}/dq"))
        done.append(name)
    keep = [t for t in model.graph.initializer if t.name not in set(done)]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    replace_nodes(model.graph, front + list(model.graph.node))
    return done


def _uint4(codes: np.ndarray, name: str) -> onnx.TensorProto:
    """A UINT4 initializer: two codes per byte, row-major, low nibble first (ONNX's packing)."""
    flat = codes.astype(np.uint8).ravel()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    t = TensorProto(name=name, data_type=TensorProto.UINT4, dims=list(codes.shape))
    t.raw_data = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    return t


def matmul_weights(model: onnx.ModelProto, skip: set[str] = frozenset()) -> list[str]:
    """Names of the 2-D float initializers read as MatMul B in the main graph."""
    inits = initializers(model)
    return [n.input[1] for n in model.graph.node
            if n.op_type == "MatMul" and not n.domain and n.input[1] in inits and n.input[1] not in skip
            and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].data_type == FLOAT]


def op_inputs(model: onnx.ModelProto, op: str) -> list[str]:
    """Every value passed to the perseus op `op`, over all call sites."""
    return [name for call in model.graph.node if (call.domain, call.op_type) == (mf.PERSEUS_DOMAIN, op)
            for name in call.input]


def refuse_inline_moe(model: onnx.ModelProto) -> None:
    """A graph lowered before perseus.SparseMoE (com.microsoft.MoE inline in the main graph) cannot
    be quantized for the target: its experts would silently stay float."""
    if any((n.domain, n.op_type) == (MS_DOMAIN, "MoE") for n in model.graph.node):
        raise PerseusError("this folder's experts were lowered by an older perseus-edge (com.microsoft.MoE in "
                           "the main graph): export the checkpoint again")


def kernel_inputs(model: onnx.ModelProto) -> set[str]:
    """The values the target's MoE kernel quantizes in its own layout, which the quantizer leaves in
    float: every input of the perseus.MoE calls and, in a graph already lowered for ort-cpu
    (`lower.passes.moe_to_ort`), of the perseus.SparseMoE calls (the router stays float, as it
    does inside perseus.MoE); and the weights of the shared-expert MLP beside a perseus.MoE call,
    which the lowering folds into the call (`modelfile.graph.shared_mlp`)."""
    refuse_inline_moe(model)
    kept = set(op_inputs(model, mf.OP_MOE)) | set(op_inputs(model, mf.OP_SPARSE_MOE))
    inits = {t.name: t for t in model.graph.initializer}
    for call in model.graph.node:
        if (call.domain, call.op_type) != (mf.PERSEUS_DOMAIN, mf.OP_MOE) or not all(
                n in inits for n in call.input[1:4]):
            continue
        n_experts, width = inits[call.input[1]].dims[1], inits[call.input[3]].dims[1]
        found = shared_mlp(model, call, inits, width // max(n_experts, 1))
        if found is not None:
            kept.update(found[4])
    kept.discard("")
    return kept


def op_weights(model: onnx.ModelProto, op: str, formals: list[str]) -> list[str]:
    """The initializers passed to `op`'s formal inputs `formals`, over all call sites."""
    f = function(model, op)
    if f is None:
        return []
    position = [list(f.input).index(name) for name in formals]
    return [call.input[i] for call in model.graph.node if (call.domain, call.op_type) == (mf.PERSEUS_DOMAIN, op)
            for i in position]
