"""The `perseus` custom operators, each defined as an ONNX model-local function.

A function keeps the op visible by name (`perseus.LatentAttention`, `perseus.MoE`,
`perseus.Attention` nodes in the graph) while its body, made of standard opset-24 operators,
tells any ONNX runtime how to execute it: stock onnxruntime inlines the body, no plug-in needed.
The `lower` stage may swap a body for faster runtime-specific kernels.

Shapes: B batch, T new tokens, C max_context (cache rows), S = position + T valid cache rows,
H heads. Every size a body needs is read from its inputs' shapes, so the only attributes are the
scalars the math needs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto

from perseus_edge.export.graph import Builder, Ref
from perseus_edge.modelfile import OP_ATTENTION, OP_LATENT_ATTENTION, OP_MOE, PERSEUS_DOMAIN

INT, FLOAT = AttributeProto.INT, AttributeProto.FLOAT


# ----------------------------------------------------------------------------- shared pieces
def dim(b: Builder, x: str, axis: int) -> str:
    """Size of one axis of `x` as a 1-D int64 tensor of one element."""
    if axis == -1:
        return b.Shape(x, start=-1)
    return b.Shape(x, start=axis, end=axis + 1)


def fold(b: Builder, x: str) -> str:
    """[B, ..., K] -> [B, M, K]: middle axes merged so a batched MatMul is one GEMM per batch row."""
    return b.Reshape(x, b.Concat(dim(b, x, 0), b.const([-1]), dim(b, x, -1), axis=0))


def rope(b: Builder, x: str, cos: str, sin: str) -> str:
    """Rotate pairs (x1[i], x2[i]) of the two halves of the last axis by the position's angles.

    The exporter permutes the projection weights so that the checkpoint's interleaved pairs
    (DeepSeek's layout) arrive as halves; the output is the same tensor the PyTorch model makes.
    """
    x1, x2 = b.Split(x, axis=-1, num_outputs=2, _outputs=2)
    return b.Concat(b.Sub(b.Mul(x1, cos), b.Mul(x2, sin)),
                    b.Add(b.Mul(x2, cos), b.Mul(x1, sin)), axis=-1, _name="roped")


def positions_of(b: Builder, position: str, new: str) -> str:
    """Absolute positions [T] of the new tokens: position + 0..T-1."""
    t = b.Squeeze(dim(b, new, 1))
    return b.Add(position, b.Range(b.const(0), t, b.const(1)), _name="positions")


def rope_tables(b: Builder, cos_cache: str, sin_cache: str, positions: str) -> tuple[str, str]:
    """cos and sin [T, 1, rope_dim / 2] of the new positions, broadcasting over heads."""
    return tuple(b.Unsqueeze(b.Gather(table, positions), b.const([1]), _name=name)
                 for table, name in ((cos_cache, "cos"), (sin_cache, "sin")))


def write_cache(b: Builder, past: str, new: str, position: str, present: str) -> str:
    """Write `new` [B, T, w] into rows position.. of the cache; return the valid rows [B, S, w].

    TensorScatter is what lets the runtime update the cache in place: bind `present` to the
    same buffer as `past` and nothing is copied. Attention then reads only the first
    position + T rows, so a decode step costs O(context), not O(max_context).
    """
    at = b.Expand(position, dim(b, new, 0), _name="write_at")
    b.TensorScatter(past, new, at, axis=1, _outputs=[present])
    end = b.Add(position, dim(b, new, 1), _name="valid_len")
    return b.Slice(present, b.const([0]), end, b.const([1]), _name="valid")


def causal_softmax(b: Builder, scores: str, positions: str) -> str:
    """Softmax over keys [.., T, S] where key s is visible to the query at position p iff s <= p."""
    keys = b.Range(b.const(0), b.Squeeze(dim(b, scores, -1)), b.const(1))
    visible = b.LessOrEqual(keys, b.Unsqueeze(positions, b.const([1])), _name="causal_mask")
    masked = b.Where(visible, scores, b.const(-np.inf, np.float32))
    return b.Softmax(masked, axis=-1, _name="probs")


def split_heads(b: Builder, x: str, heads: str) -> str:
    """[B, T, H * D] -> [B, T, H, D]."""
    return b.Reshape(x, b.Concat(b.const([0, 0]), heads, b.const([-1]), axis=0))


def num_heads(b: Builder) -> str:
    return b.Reshape(b.Constant(value_int=Ref("num_heads", INT)), b.const([1]), _name="num_heads")


# ----------------------------------------------------------------------------- the ops
def latent_attention() -> onnx.FunctionProto:
    """perseus.LatentAttention: MLA over the latent cache, in the weight-absorbed form.

    inputs   q [B,T,H*(nope+rope)]  the query projection, per head [nope | rope]
             kv [B,T,r+rope]         kv_a_proj output: latent c_kv (before its norm) | k_rope
             position [1], cos_cache / sin_cache [C, rope/2]
             past_c_kv [B,C,r], past_k_rope [B,C,rope]
             kv_norm [r], w_uk [H,nope,r], w_uv [H,r,v]   (the per-head slices of kv_b_proj)
    outputs  out [B,T,H*v] (before o_proj), present_c_kv, present_k_rope
    attrs    num_heads, scale (softmax scale, qk_head_dim^-0.5), epsilon (kv norm)

    Keys and values are never expanded per head: W_UK maps each query head into the latent
    space (q_lat = q_nope W_UK), scores are q_lat.c_kv + q_rope.k_rope over the cache as stored,
    and W_UV maps the attended latent back to the head's value space.
    """
    b = Builder()
    heads = num_heads(b)
    nope, rank, rope_dim = dim(b, "w_uk", 1), dim(b, "w_uk", 2), dim(b, "past_k_rope", -1)
    q_nope, q_rope = b.Split(split_heads(b, "q", heads), b.Concat(nope, rope_dim, axis=0),
                             axis=-1, _outputs=2)
    c_kv, k_rope = b.Split("kv", b.Concat(rank, rope_dim, axis=0), axis=-1, _outputs=2)
    c_kv = b.RMSNormalization(c_kv, "kv_norm", axis=-1, epsilon=Ref("epsilon"), _name="c_kv")

    positions = positions_of(b, "position", "kv")
    cos, sin = rope_tables(b, "cos_cache", "sin_cache", positions)
    q_rope = rope(b, q_rope, cos, sin)  # [B,T,H,rope]
    k_rope = b.Squeeze(rope(b, b.Unsqueeze(k_rope, b.const([2])), cos, sin), b.const([2]))

    c_all = write_cache(b, "past_c_kv", c_kv, "position", "present_c_kv")  # [B,S,r]
    k_all = write_cache(b, "past_k_rope", k_rope, "position", "present_k_rope")  # [B,S,rope]

    # Absorbed query [B,H,T,r+rope] against keys [B,S,r+rope]: one GEMM over heads and tokens.
    q_lat = b.MatMul(b.Transpose(q_nope, perm=[0, 2, 1, 3]), "w_uk", _name="q_latent")
    query = b.Mul(b.Concat(q_lat, b.Transpose(q_rope, perm=[0, 2, 1, 3]), axis=-1),
                  b.Constant(value_float=Ref("scale")), _name="query")
    keys = b.Concat(c_all, k_all, axis=-1, _name="keys")
    unfold = b.Concat(b.Shape(query, end=3), b.const([-1]), axis=0)  # back to [B,H,T,-1]
    scores = b.MatMul(fold(b, query), b.Transpose(keys, perm=[0, 2, 1]), _name="scores")
    probs = causal_softmax(b, b.Reshape(scores, unfold), positions)  # [B,H,T,S]
    out_lat = b.Reshape(b.MatMul(fold(b, probs), c_all), unfold)  # [B,H,T,r]
    out = b.MatMul(out_lat, "w_uv", _name="heads_out")  # [B,H,T,v]
    b.Reshape(b.Transpose(out, perm=[0, 2, 1, 3]), b.const([0, 0, -1]), _outputs=["out"])
    return b.function(
        PERSEUS_DOMAIN, OP_LATENT_ATTENTION,
        ["q", "kv", "position", "cos_cache", "sin_cache", "past_c_kv", "past_k_rope",
         "kv_norm", "w_uk", "w_uv"],
        ["out", "present_c_kv", "present_k_rope"], ["num_heads", "scale", "epsilon"],
        latent_attention.__doc__)


def attention() -> onnx.FunctionProto:
    """perseus.Attention: causal multi-head attention with RoPE over a preallocated K/V cache.

    inputs   q, k, v [B,T,H*D], position [1], cos_cache / sin_cache [C, D/2],
             past_key, past_value [B,C,H*D]
    outputs  out [B,T,H*D] (before o_proj), present_key, present_value
    attrs    num_heads, scale (D^-0.5)
    """
    b = Builder()
    heads = num_heads(b)
    positions = positions_of(b, "position", "k")
    cos, sin = rope_tables(b, "cos_cache", "sin_cache", positions)
    q = rope(b, split_heads(b, "q", heads), cos, sin)  # [B,T,H,D]
    k = b.Reshape(rope(b, split_heads(b, "k", heads), cos, sin), b.const([0, 0, -1]))
    k_all = split_heads(b, write_cache(b, "past_key", k, "position", "present_key"), heads)
    v_all = split_heads(b, write_cache(b, "past_value", "v", "position", "present_value"), heads)
    query = b.Mul(b.Transpose(q, perm=[0, 2, 1, 3]), b.Constant(value_float=Ref("scale")))
    scores = b.MatMul(query, b.Transpose(k_all, perm=[0, 2, 3, 1]), _name="scores")  # [B,H,T,S]
    probs = causal_softmax(b, scores, positions)
    out = b.MatMul(probs, b.Transpose(v_all, perm=[0, 2, 1, 3]), _name="heads_out")  # [B,H,T,D]
    b.Reshape(b.Transpose(out, perm=[0, 2, 1, 3]), b.const([0, 0, -1]), _outputs=["out"])
    return b.function(
        PERSEUS_DOMAIN, OP_ATTENTION,
        ["q", "k", "v", "position", "cos_cache", "sin_cache", "past_key", "past_value"],
        ["out", "present_key", "present_value"], ["num_heads", "scale"], attention.__doc__)


def moe() -> onnx.FunctionProto:
    """perseus.MoE: sigmoid top-k routing with a selection bias, then the routed SwiGLU experts.

    inputs   x [B,T,d], router [d,E], router_bias [E] (selection only, DeepSeek-V3's
             aux-loss-free bias), w_gate, w_up [d, E*F], w_down [E*F, d] (experts side by side)
    outputs  y [B,T,d]  (shared experts are a plain MLP beside this op)
    attrs    top_k, normalize (1: weights sum to one over the top-k), scaling (routed_scaling_factor)

    The portable body runs every expert as one wide GEMM and zeroes the unselected ones through
    the routing weights: exact, simple and good at prefill; the `ort-cpu` target replaces it
    with onnxruntime's sparse MoE kernel, which reads only the selected experts.
    """
    b = Builder()
    x = b.Reshape("x", b.Concat(b.const([-1]), dim(b, "x", -1), axis=0), _name="tokens")  # [N,d]
    scores = b.Sigmoid(b.MatMul(x, "router"), _name="scores")  # [N,E]
    k = b.Reshape(b.Constant(value_int=Ref("top_k", INT)), b.const([1]))
    _, idx = b.TopK(b.Add(scores, "router_bias"), k, axis=-1, _outputs=2)
    weights = b.GatherElements(scores, idx, axis=1)
    normalize = b.Cast(b.Constant(value_int=Ref("normalize", INT)), to=onnx.TensorProto.BOOL)
    total = b.Add(b.ReduceSum(weights, b.const([-1]), keepdims=1), b.const(1e-20, np.float32))
    weights = b.Div(weights, b.Where(normalize, total, b.const(1.0, np.float32)))
    weights = b.Mul(weights, b.Constant(value_float=Ref("scaling")), _name="routing_weights")
    n_experts = dim(b, "router", 1)
    zeros = b.ConstantOfShape(b.Concat(dim(b, x, 0), n_experts, axis=0))
    gates = b.ScatterElements(zeros, idx, weights, axis=1, _name="expert_weights")  # [N,E]

    h = b.Mul(b.Swish(b.MatMul(x, "w_gate")), b.MatMul(x, "w_up"), _name="expert_hidden")
    h = b.Reshape(h, b.Concat(b.const([0]), n_experts, b.const([-1]), axis=0))  # [N,E,F]
    h = b.Reshape(b.Mul(h, b.Unsqueeze(gates, b.const([-1]))), b.const([0, -1]))
    b.Reshape(b.MatMul(h, "w_down"), b.Shape("x"), _outputs=["y"])
    return b.function(
        PERSEUS_DOMAIN, OP_MOE, ["x", "router", "router_bias", "w_gate", "w_up", "w_down"], ["y"],
        ["top_k", "normalize", "scaling"], moe.__doc__)


FUNCTIONS = {OP_LATENT_ATTENTION: latent_attention, OP_ATTENTION: attention, OP_MOE: moe}
