"""ONNX graph helpers shared by every compiler stage: a small builder and model edits.

`Builder`: the exporter writes the graph directly from the checkpoint weights (the
onnxruntime-genai builder approach) instead of tracing PyTorch, and the quantizer and the
lowering passes emit their replacement nodes with the same builder. Calls read like onnxscript
(`b.MatMul(x, w)`), but everything is plain `onnx.helper`, so what is emitted is exactly what is
written. The same builder writes function bodies, where an attribute can refer to an attribute
of the calling node (`Ref("scale")`).

Model edits (`ensure_opset`, `drop_unused`, `initializers`, ...) are the one copy every pass uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from perseus_edge.modelfile.names import PERSEUS_DOMAIN

OPSET = 24  # TensorScatter (the in-place cache write) is new in opset 24
IR_VERSION = 11  # the IR version of onnx 1.19, which introduced opset 24
DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64}


@dataclass(frozen=True)
class Ref:
    """Inside a function body: the value of the calling node's attribute `name`."""

    name: str
    type: int = AttributeProto.FLOAT


class Builder:
    """Collects nodes (and, for a graph, weights); `b.Op(*inputs, **attrs)` emits one node.

    Inputs are value names ("" for an omitted optional input). A node returns its output name,
    or a list of names when it has several: `_outputs` is their count, or the names themselves.
    `_name` picks a readable name for a single output.
    """

    def __init__(self, scope: str = ""):
        self.scope = scope
        self.nodes: list[onnx.NodeProto] = []
        self.weights: dict[str, np.ndarray] = {}
        self._count: dict[str, int] = {}

    def fresh(self, hint: str) -> str:
        """A new name: `hint` under the scope, numbered from its second use."""
        name = f"{self.scope}/{hint}" if self.scope else hint
        n = self._count.get(name, 0)
        self._count[name] = n + 1
        return name if n == 0 else f"{name}_{n}"

    def op(self, op_type: str, *inputs: str, _outputs: int | list[str] = 1, _name: str | None = None,
           _domain: str = "", **attrs):
        outs = (list(_outputs) if isinstance(_outputs, list)
                else [self.fresh(_name or op_type.lower()) for _ in range(_outputs)])
        plain = {k: v for k, v in attrs.items() if not isinstance(v, Ref)}
        name = self.fresh(op_type if self.scope else f"/{op_type}")
        node = helper.make_node(op_type, list(inputs), outs, name=name, domain=_domain, **plain)
        for key, ref in attrs.items():
            if isinstance(ref, Ref):
                node.attribute.append(helper.make_attribute_ref(key, ref.type, ref_attr_name=ref.name))
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    def __getattr__(self, op_type: str):
        if not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, **attrs: self.op(op_type, *inputs, **attrs)

    def const(self, value, dtype=np.int64) -> str:
        """A small constant as a Constant node (function bodies cannot hold initializers)."""
        array = np.asarray(value, dtype=dtype)
        return self.op("Constant", value=numpy_helper.from_array(array), _name="const")

    def weight(self, name: str, array: np.ndarray) -> str:
        """A named initializer of the main graph."""
        if name in self.weights:
            raise ValueError(f"duplicate weight {name}")
        self.weights[name] = np.ascontiguousarray(array)
        return name

    def function(self, domain: str, name: str, inputs: list[str], outputs: list[str],
                 attributes: list[str], doc: str) -> onnx.FunctionProto:
        return helper.make_function(domain, name, inputs, outputs, self.nodes,
                                    opset_imports=[helper.make_opsetid("", OPSET)],
                                    attributes=attributes, doc_string=doc)


def value_info(name: str, dtype, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, DTYPES[np.dtype(dtype)], shape)


# ----------------------------------------------------------------------------- model edits
def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def add_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name


def function(model: onnx.ModelProto, op: str, domain: str = PERSEUS_DOMAIN) -> onnx.FunctionProto | None:
    """The model-local function that implements `domain.op`, if the model has one."""
    return next((f for f in model.functions if (f.domain, f.name) == (domain, op)), None)


def calls(model: onnx.ModelProto, op: str, domain: str = PERSEUS_DOMAIN) -> list[onnx.NodeProto]:
    """The main-graph nodes that call `domain.op`."""
    return [n for n in model.graph.node if (n.domain, n.op_type) == (domain, op)]


def perseus_ops(model: onnx.ModelProto) -> list[str]:
    """Names of the perseus ops the main graph calls, sorted (recorded in the manifest)."""
    return sorted({n.op_type for n in model.graph.node if n.domain == PERSEUS_DOMAIN})


def replace_nodes(container, nodes: list[onnx.NodeProto]) -> None:
    """Set the node list of a graph or function body."""
    del container.node[:]
    container.node.extend(nodes)


def ensure_opset(model: onnx.ModelProto, domain: str, version: int = 1) -> None:
    """Import `domain` at `version` unless the model already imports it."""
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def drop_unused(model: onnx.ModelProto) -> None:
    """Remove initializers that no node or graph output reads, and local functions no node calls."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    called = {(n.domain, n.op_type) for n in model.graph.node}
    funcs = [f for f in model.functions if (f.domain, f.name) in called]
    del model.functions[:]
    model.functions.extend(funcs)



def shared_mlp(model: onnx.ModelProto, moe: onnx.NodeProto, inits: dict, f: int):
    """The shared-expert MLP the exporter writes beside the perseus.MoE call `moe` (export/decoder.py
    `_moe`), which the ort-cpu lowering folds into the call: Add(moe's output,
    MatMul(Mul(Swish(g), u), W_down)) with g, u = Split(MatMul(x, W_gate_up)) on moe's input x,
    float weights whose width is a multiple of the experts' `f`, no other reader of its values.
    Returns (gate_up [d, 2 S f], down [S f, d], the Add, the six nodes' first outputs, the two
    weights' names), or None."""
    if any(a.name in ("softmax", "n_group") for a in moe.attribute):
        return None  # a routing variant keeps the portable op (lower/passes.py), and its shared MLP
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    outputs = {o.name for o in model.graph.output}
    adds = [n for n in model.graph.node if n.op_type == "Add" and not n.domain and moe.output[0] in n.input]
    if len(adds) != 1 or readers.get(moe.output[0]) != 1:
        return None
    add = adds[0]

    def made_by(name, op):
        n = producer.get(name)
        return n if n is not None and n.op_type == op and not n.domain else None

    down = made_by(add.input[1] if add.input[0] == moe.output[0] else add.input[0], "MatMul")
    mul = down and made_by(down.input[0], "Mul")
    swish = mul and made_by(mul.input[0], "Swish")
    split = swish and made_by(swish.input[0], "Split")
    gate_up = split and made_by(split.input[0], "MatMul")
    if not (gate_up and gate_up.input[0] == moe.input[0] and list(split.output) == [swish.input[0], mul.input[1]]
            and len(split.input) == 1 and gate_up.input[1] in inits and down.input[1] in inits):
        return None  # (a Split without sizes: two equal halves, gate then up)
    if {a.name: helper.get_attribute_value(a) for a in split.attribute}.get("axis", 0) not in (-1, 1):
        return None
    chain = [gate_up, split, swish, mul, down]
    inner = [o for n in chain for o in n.output]
    if any(readers.get(o, 0) != 1 or o in outputs for o in inner):
        return None
    w_gu, w_down = (numpy_helper.to_array(inits[n]) for n in (gate_up.input[1], down.input[1]))
    width = w_down.shape[0]
    if w_gu.ndim != 2 or w_gu.shape[1] != 2 * width or width % f or w_down.shape[1] != w_gu.shape[0]:
        return None
    return (w_gu.astype(np.float32), w_down.astype(np.float32), add, {n.output[0] for n in chain + [add]},
            (gate_up.input[1], down.input[1]))
