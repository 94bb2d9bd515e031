"""The `perseus` custom operators, each defined as an ONNX model-local function.

A function keeps the op visible by name (`perseus.LatentAttention`, `perseus.MoE`,
`perseus.Attention` nodes in the graph) while its body, made of standard opset-24 operators,
tells any ONNX runtime how to execute it: stock onnxruntime inlines the body, no plug-in needed.
The `lower` stage may replace an op with faster runtime-specific kernels.

Shapes: B batch, T new tokens, C max_context (cache rows), H heads; position_ids [B,T] are the
absolute positions of the new tokens (rows may differ), S = max(position_ids) + 1 the cache rows
attention reads. Sizes are read from the inputs' shapes; attributes hold what shapes cannot tell.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto

from perseus_edge.modelfile.graph import Builder, Ref
from perseus_edge.modelfile import OP_ATTENTION, OP_LATENT_ATTENTION, OP_MOE, PERSEUS_DOMAIN

INT = AttributeProto.INT


# ----------------------------------------------------------------------------- shared pieces
def dim(b: Builder, x: str, axis: int) -> str:
    """Size of one axis of `x` as a 1-D int64 tensor of one element.

    On an initializer (a weight passed in) onnxruntime folds this to a constant at load time.
    """
    return b.Shape(x, start=-1) if axis == -1 else b.Shape(x, start=axis, end=axis + 1)


class Step:
    """Where the T new tokens go, from `position_ids` [B, T] (absolute position of every new token).

    Rows of a batch may be at different points of their sequences (a server decoding several
    requests). write_at [B] is TensorScatter's per-row write index (each row's first position);
    valid [1] is S = max(position_ids) + 1, the cache rows attention reads; mask [B, T, 1, S] is
    True where key s is visible to query t of row b (s <= position_ids[b, t]).
    Every node here reads only `position_ids`, the same graph value in every layer, so
    onnxruntime's common-subexpression elimination computes them once per step, not per layer.
    """

    def __init__(self, b: Builder):
        pid = "position_ids"
        self.write_at = b.Gather(pid, b.Constant(value_int=0), axis=1, _name="write_at")
        last = b.Add(b.ReduceMax(pid, keepdims=0), b.Constant(value_int=1), _name="valid_len")
        self.valid = b.Unsqueeze(last, b.const([0]))
        keys = b.Range(b.Constant(value_int=0), last, b.Constant(value_int=1))  # [S]
        self.mask = b.LessOrEqual(keys, b.Unsqueeze(pid, b.const([2, 3])), _name="causal_mask")


def write_cache(b: Builder, step: Step, past: str, new: str, present: str) -> str:
    """Write `new` [B, T, w] into rows position[b].. of each row's cache; return rows [B, S, w].

    TensorScatter is what lets the runtime update the cache in place: bind `present` to the
    same buffer as `past` and nothing is copied. Attention then reads only the first
    max(position) + T rows (one O(context) slice), so a decode step does not scale with max_context.
    """
    b.TensorScatter(past, new, step.write_at, axis=1, _outputs=[present])
    return b.Slice(present, b.const([0]), step.valid, b.const([1]), _name="valid")


# ----------------------------------------------------------------------------- the ops
def latent_attention() -> onnx.FunctionProto:
    """perseus.LatentAttention: MLA over the latent cache, in the weight-absorbed form.

    inputs   q_nope [B,T,H*nope], q_rope [B,T,H*rope]   the query, head by head
             c_kv [B,T,r] (before its norm), k_rope [B,T,rope]   the kv_a projection
             position_ids [B,T], cos_cache / sin_cache [C, rope/2]
             past_c_kv [B,C,r], past_k_rope [B,C,rope]
             kv_norm [r], w_uk [H,nope,r], w_uv [H,r,v]   (the per-head blocks of kv_b_proj)
    outputs  out [B,T,H*v] (before o_proj), present_c_kv, present_k_rope
    attrs    num_heads, scale (softmax scale, qk_head_dim^-0.5), epsilon (of the kv norm)

    Keys and values are never expanded per head: W_UK maps each query head into the latent
    space (q_lat = q_nope W_UK), scores are q_lat.c_kv + q_rope.k_rope over the cache as stored,
    and W_UV maps the attended latent back to the head's value space. All heads share the one
    latent key, so tokens and heads fold into the rows ([B, T*H, .]) of one GEMM per cache part.
    The four query/key inputs come from one projection (a single GEMM and Split in the graph).
    """
    b = Builder()
    heads, nope, rank = (dim(b, "w_uk", axis) for axis in range(3))
    rope = b.Mul(dim(b, "cos_cache", 1), b.const([2]), _name="rope_dim")
    step = Step(b)

    def shape(*parts) -> str:  # a reshape target from constants and weight sizes: folded at load
        return b.Concat(*(p if isinstance(p, str) else b.const(p) for p in parts), axis=0)

    c_kv = b.RMSNormalization("c_kv", "kv_norm", axis=-1, epsilon=Ref("epsilon"), _name="c_kv_normed")
    k_rope = b.RotaryEmbedding("k_rope", "cos_cache", "sin_cache", "position_ids", num_heads=1)
    q_rope = b.RotaryEmbedding("q_rope", "cos_cache", "sin_cache", "position_ids", num_heads=Ref("num_heads", INT))
    c_all = write_cache(b, step, "past_c_kv", c_kv, "present_c_kv")  # [B,S,r]
    k_all = write_cache(b, step, "past_k_rope", k_rope, "present_k_rope")  # [B,S,rope]

    # [B,T,H*nope] -> [B,T,H,1,nope] x [H,nope,r] -> rows [B,T*H,r]
    q_nope = b.Reshape("q_nope", shape([0, 0], heads, [1], nope))
    q_lat = b.Reshape(b.MatMul(q_nope, "w_uk"), shape([0, -1], rank), _name="q_latent")
    q_rope = b.Reshape(q_rope, shape([0, -1], rope))  # [B,T*H,rope]
    # two GEMMs rather than one over concatenated keys: no O(context) copy of the cache
    scores = b.Add(b.MatMul(q_lat, b.Transpose(c_all, perm=[0, 2, 1])),
                   b.MatMul(q_rope, b.Transpose(k_all, perm=[0, 2, 1])))  # [B,T*H,S]
    scores = b.Mul(scores, b.Constant(value_float=Ref("scale")), _name="scores")
    # the mask in the scores' [B,T*H,S] row layout: built from position_ids and the num_heads
    # attribute only, so it too is computed once per step for all layers
    heads_1d = b.Unsqueeze(b.Constant(value_int=Ref("num_heads", INT)), b.const([0]))
    per_head = b.Concat(b.const([1, 1]), heads_1d, b.const([1]), axis=0)
    mask = b.Reshape(b.Expand(step.mask, per_head), shape([0, -1], step.valid), _name="row_mask")
    probs = b.Softmax(b.Where(mask, scores, b.const(-np.inf, np.float32)), axis=-1, _name="probs")
    out_lat = b.Reshape(b.MatMul(probs, c_all), shape([0, -1], heads, [1], rank))  # [B,T,H,1,r]
    b.Reshape(b.MatMul(out_lat, "w_uv"), b.const([0, 0, -1]), _outputs=["out"])  # [B,T,H*v]
    return b.function(
        PERSEUS_DOMAIN, OP_LATENT_ATTENTION,
        ["q_nope", "q_rope", "c_kv", "k_rope", "position_ids", "cos_cache", "sin_cache", "past_c_kv",
         "past_k_rope", "kv_norm", "w_uk", "w_uv"],
        ["out", "present_c_kv", "present_k_rope"], ["num_heads", "scale", "epsilon"], latent_attention.__doc__)


def attention() -> onnx.FunctionProto:
    """perseus.Attention: causal multi-head attention with RoPE over a preallocated K/V cache.

    inputs   q, k, v [B,T,H*D], position_ids [B,T], cos_cache / sin_cache [C, D/2],
             past_key, past_value [B,C,H*D]
    outputs  out [B,T,H*D] (before o_proj), present_key, present_value
    attrs    num_heads, scale (D^-0.5)

    The core is ONNX's own Attention (opset 23) on the valid rows, with the per-row causal mask
    as its boolean attn_mask (rows of a batch may sit at different positions).
    """
    b = Builder()
    heads = Ref("num_heads", INT)
    step = Step(b)
    q = b.RotaryEmbedding("q", "cos_cache", "sin_cache", "position_ids", num_heads=heads)
    k = b.RotaryEmbedding("k", "cos_cache", "sin_cache", "position_ids", num_heads=heads)
    k_all = write_cache(b, step, "past_key", k, "present_key")
    v_all = write_cache(b, step, "past_value", "v", "present_value")
    mask = b.Transpose(step.mask, perm=[0, 2, 1, 3])  # [B,1,T,S]
    out = b.Attention(q, k_all, v_all, mask, scale=Ref("scale"), q_num_heads=heads, kv_num_heads=heads)
    # a no-op reshape to q's shape: onnx 1.23's shape inference gives Attention's 3-D output a
    # last dim of 0 when V's width is unknown, as it is inside a function
    b.Reshape(out, b.Shape("q"), _outputs=["out"])
    return b.function(
        PERSEUS_DOMAIN, OP_ATTENTION,
        ["q", "k", "v", "position_ids", "cos_cache", "sin_cache", "past_key", "past_value"],
        ["out", "present_key", "present_value"], ["num_heads", "scale"], attention.__doc__)


def moe(softmax: bool = False, group_rank: str | None = None) -> onnx.FunctionProto:
    """perseus.MoE: sigmoid top-k routing with a selection bias, then the routed SwiGLU experts.

    inputs   x [B,T,d], router [d,E], router_bias [E] (selection only, DeepSeek-V3's
             aux-loss-free bias), w_gate, w_up [d, E*F], w_down [E*F, d] (experts side by side)
    outputs  y [B,T,d]  (shared experts are a plain MLP beside this op)
    attrs    top_k, normalize (1: weights sum to one over the top-k), scaling (routed_scaling_factor)

    The portable body runs every expert as one wide GEMM and zeroes the unselected ones through
    the routing weights: exact, simple and good at prefill; the `ort-cpu` target replaces it
    with onnxruntime's sparse MoE kernel, which reads only the selected experts.

    Routing variants (DeepSeek-V2 and grouped V3 checkpoints; see `routing_variant`) specialise
    the body at export: softmax scores (attribute softmax=1), and group-limited selection
    (attributes n_group, topk_group; groups ranked by their top-2 sum or their max).
    """
    b = Builder()
    width, n_experts = dim(b, "router", 0), dim(b, "router", 1)
    x = b.Reshape("x", b.Concat(b.const([-1]), width, axis=0), _name="tokens")  # [N,d]
    logits = b.MatMul(x, "router")
    scores = b.Softmax(logits, axis=-1, _name="scores") if softmax else b.Sigmoid(logits, _name="scores")  # [N,E]
    k = b.Reshape(b.Constant(value_int=Ref("top_k", INT)), b.const([1]))
    choice = b.Add(scores, "router_bias")
    if group_rank:
        choice = _limit_to_groups(b, choice, group_rank)
    _, idx = b.TopK(choice, k, axis=-1, _outputs=2)
    weights = b.GatherElements(scores, idx, axis=1)
    normalize = b.Cast(b.Constant(value_int=Ref("normalize", INT)), to=onnx.TensorProto.BOOL)
    total = b.Add(b.ReduceSum(weights, b.const([-1]), keepdims=1), b.const(1e-20, np.float32))
    weights = b.Div(weights, b.Where(normalize, total, b.const(1.0, np.float32)))
    weights = b.Mul(weights, b.Constant(value_float=Ref("scaling")), _name="routing_weights")
    gates = b.ScatterElements(b.ConstantOfShape(b.Shape(scores)), idx, weights, axis=1,
                              _name="expert_weights")  # [N,E], zero for the experts not chosen

    h = b.Mul(b.Swish(b.MatMul(x, "w_gate")), b.MatMul(x, "w_up"), _name="expert_hidden")
    h = b.Reshape(h, b.Concat(b.const([0]), n_experts, b.const([-1]), axis=0))  # [N,E,F]
    h = b.Reshape(b.Mul(h, b.Unsqueeze(gates, b.const([-1]))), b.const([0, -1]))
    b.Reshape(b.MatMul(h, "w_down"), b.Shape("x"), _outputs=["y"])
    attributes = ["top_k", "normalize", "scaling"] + (["softmax"] if softmax else [])
    attributes += ["n_group", "topk_group"] if group_rank else []
    return b.function(
        PERSEUS_DOMAIN, OP_MOE, ["x", "router", "router_bias", "w_gate", "w_up", "w_down"], ["y"],
        attributes, moe.__doc__)


# ----------------------------------------------------------------------------- routing variants
def routing_variant(cfg) -> dict:
    """moe() arguments for a ModelConfig: {} is the default (sigmoid, ungrouped) body."""
    out = {}
    if cfg.scoring_func == "softmax":
        out["softmax"] = True
    if cfg.grouped_routing:
        out["group_rank"] = "top2" if cfg.topk_method == "noaux_tc" else "max"
    return out


def routing_attributes(cfg) -> dict:
    """The perseus.MoE node attributes of a routing variant (none for the default)."""
    out = {"softmax": 1} if cfg.scoring_func == "softmax" else {}
    if cfg.grouped_routing:
        out.update(n_group=cfg.n_group, topk_group=cfg.topk_group)
    return out


def _limit_to_groups(b: Builder, choice: str, rank: str) -> str:
    """choice [N,E] with -inf outside each token's topk_group best of n_group groups; a group
    ranks by its top-2 sum ("top2", DeepSeek-V3) or its best score ("max", DeepSeek-V2)."""
    n_group = b.Reshape(b.Constant(value_int=Ref("n_group", INT)), b.const([1]))
    groups = b.Reshape(choice, b.Concat(b.const([0]), n_group, b.const([-1]), axis=0))  # [N,G,E/G]
    if rank == "top2":
        top2, _ = b.TopK(groups, b.const([2]), axis=-1, _outputs=2)
        group_score = b.ReduceSum(top2, b.const([-1]), keepdims=0)
    else:
        group_score = b.ReduceMax(groups, b.const([-1]), keepdims=0)  # [N,G]
    topk_group = b.Reshape(b.Constant(value_int=Ref("topk_group", INT)), b.const([1]))
    _, best = b.TopK(group_score, topk_group, axis=-1, _outputs=2)
    chosen = b.ScatterElements(b.ConstantOfShape(b.Shape(group_score)), best,
                               b.Expand(b.const(1.0, np.float32), b.Shape(best)), axis=1)
    keep = b.Cast(b.Unsqueeze(chosen, b.const([-1])), to=onnx.TensorProto.BOOL)  # [N,G,1]
    masked = b.Where(keep, groups, b.const(-np.inf, np.float32))
    return b.Reshape(masked, b.Shape(choice), _name="group_limited_choice")


FUNCTIONS = {OP_LATENT_ATTENTION: latent_attention, OP_ATTENTION: attention, OP_MOE: moe}
