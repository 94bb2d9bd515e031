"""The portable decoder graph, emitted from the prepared weights (`weights.prepare`).

One graph serves prefill and decode (the contract in `perseus_edge.modelfile`):

    input_ids [B,T], position [B], logits_rows [R], past.{i}.* [B,C,w]
        ->  logits [B,R,V], present.{i}.* [B,C,w]

Per layer: RMSNorm -> projections (one GEMM, split) -> perseus.LatentAttention | perseus.Attention -> o_proj ->
residual -> RMSNorm -> perseus.MoE (+ shared-expert MLP) | SwiGLU MLP -> residual. The weight
matmuls stay in the main graph, where stock quantizers find them; the custom ops hold the parts
that are specific to this model family (latent-KV attention, routing).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from perseus_edge import __version__
from perseus_edge import modelfile as mf
from perseus_edge.export import ops
from perseus_edge.modelfile.graph import IR_VERSION, OPSET, Builder, value_info
from perseus_edge.model.config import LATENT_NORM_EPS, ModelConfig

PRODUCER = "perseus-edge"


def decoder_graph(cfg: ModelConfig, weights: dict[str, np.ndarray], max_context: int) -> onnx.ModelProto:
    """The portable ONNX model of `cfg` with `weights` (from `weights.prepare`)."""
    b = Builder()

    def w(name: str) -> str:
        """A weight's value name; the initializer is added on first use."""
        return name if name in b.weights else b.weight(name, weights[name])

    slots = mf.cache_slots(cfg.is_mla)
    widths = mf.cache_widths(cfg)
    inputs = [value_info(mf.INPUT_IDS, np.int64, ["batch", "seq"]),
              value_info(mf.POSITION, np.int64, ["batch"]),
              value_info(mf.LOGITS_ROWS, np.int64, ["rows"])]
    outputs = [value_info(mf.LOGITS, np.float32, ["batch", "rows", cfg.vocab_size])]
    for i in range(cfg.num_hidden_layers):
        for slot, width in zip(slots, widths):
            inputs.append(value_info(mf.past_name(i, slot), np.float32, ["batch", max_context, width]))
            outputs.append(value_info(mf.present_name(i, slot), np.float32, ["batch", max_context, width]))

    x = b.Gather(w("embed_tokens"), mf.INPUT_IDS, _name="embeddings")
    # absolute position of every new token [B, T], computed once and shared by every layer's op
    tokens = b.Squeeze(b.Shape(mf.INPUT_IDS, start=1, end=2))
    offsets = b.Range(b.Constant(value_int=0), tokens, b.Constant(value_int=1))
    positions = b.Add(b.Unsqueeze(mf.POSITION, b.const([1])), offsets, _name="position_ids")
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        h = b.RMSNormalization(x, w(p + "input_norm"), epsilon=cfg.rms_norm_eps, _name=p + "attn_in")
        attend = _latent_attention if cfg.is_mla else _attention
        attn = b.MatMul(attend(b, w, cfg, i, h, positions), w(p + "attn.o_proj"))
        if cfg.attention_bias:
            attn = b.Add(attn, w(p + "attn.o_bias"))
        x = b.Add(x, attn, _name=p + "resid_attn")
        h = b.RMSNormalization(x, w(p + "post_norm"), epsilon=cfg.rms_norm_eps, _name=p + "mlp_in")
        x = b.Add(x, _moe(b, w, cfg, i, h) if cfg.layer_is_moe(i) else _mlp(b, w, p + "mlp.", h),
                  _name=p + "resid_mlp")
    h = b.RMSNormalization(x, w("norm"), epsilon=cfg.rms_norm_eps, _name="final_norm")
    # only the rows that need logits reach the head: a prompt chunk of 64 tokens in a generation
    # needs one row of [d] x [d, vocab], not 64 (llama.cpp too computes the last row only)
    h = b.Gather(h, mf.LOGITS_ROWS, axis=1, _name="logits_input")
    if cfg.tie_word_embeddings:  # Gemm reads the shared [V, d] table transposed, no copy
        flat = b.Reshape(h, b.const([-1, cfg.hidden_size]))
        b.Reshape(b.Gemm(flat, w("embed_tokens"), transB=1),
                  b.Concat(b.Shape(h, end=2), b.const([cfg.vocab_size]), axis=0), _outputs=[mf.LOGITS])
    else:
        b.MatMul(h, w("lm_head"), _outputs=[mf.LOGITS])

    used = {n.op_type for n in b.nodes if n.domain == mf.PERSEUS_DOMAIN}
    graph = helper.make_graph(b.nodes, "perseus", inputs, outputs,
                              initializer=[numpy_helper.from_array(a, n) for n, a in b.weights.items()])
    return helper.make_model(
        graph, producer_name=PRODUCER, producer_version=__version__, ir_version=IR_VERSION,
        functions=[_function(name, cfg) for name in sorted(used)],
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(mf.PERSEUS_DOMAIN, 1)])


def _function(name: str, cfg: ModelConfig) -> onnx.FunctionProto:
    """The body of a perseus op for this model (MoE's depends on the routing variant)."""
    if name == mf.OP_MOE:
        return ops.moe(**ops.routing_variant(cfg))
    return ops.FUNCTIONS[name]()


def _latent_attention(b: Builder, w, cfg: ModelConfig, i: int, h: str, positions: str) -> str:
    """One GEMM for every projection of h (query | kv_a, or q_a | kv_a), split by width."""
    p = f"layers.{i}.attn."
    heads, nope, rope, rank = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                               cfg.kv_lora_rank)
    q_widths = [heads * nope, heads * rope]
    def project(name: str) -> str:
        y = b.MatMul(h, w(p + name + "_proj"), _name=p + name)
        return b.Add(y, w(p + "q_kv_a_bias")) if cfg.attention_bias else y

    if cfg.q_lora_rank:
        q_a, c_kv, k_rope = b.Split(project("q_a_kv_a"), b.const([cfg.q_lora_rank, rank, rope]), axis=-1,
                                    _outputs=3)
        q_a = b.RMSNormalization(q_a, w(p + "q_a_norm"), epsilon=LATENT_NORM_EPS)
        q_nope, q_rope = b.Split(b.MatMul(q_a, w(p + "q_b_proj"), _name=p + "q"), b.const(q_widths),
                                 axis=-1, _outputs=2)
    else:
        q_nope, q_rope, c_kv, k_rope = b.Split(project("q_kv_a"), b.const(q_widths + [rank, rope]), axis=-1,
                                               _outputs=4)
    c_kv_slot, k_rope_slot = mf.cache_slots(True)
    out, *_ = b.op(
        mf.OP_LATENT_ATTENTION, q_nope, q_rope, c_kv, k_rope, positions, w("rope.cos"), w("rope.sin"),
        mf.past_name(i, c_kv_slot), mf.past_name(i, k_rope_slot), w(p + "kv_norm"), w(p + "w_uk"),
        w(p + "w_uv"), _domain=mf.PERSEUS_DOMAIN,
        _outputs=[p + "out", mf.present_name(i, c_kv_slot), mf.present_name(i, k_rope_slot)],
        num_heads=heads, scale=cfg.softmax_scale(), epsilon=LATENT_NORM_EPS)
    return out


def _attention(b: Builder, w, cfg: ModelConfig, i: int, h: str, positions: str) -> str:
    p = f"layers.{i}.attn."
    key, value = mf.cache_slots(False)
    q, k, v = b.Split(b.MatMul(h, w(p + "qkv_proj"), _name=p + "qkv"), b.const([cfg.hidden_size] * 3),
                      axis=-1, _outputs=3)
    out, *_ = b.op(
        mf.OP_ATTENTION, q, k, v, positions, w("rope.cos"), w("rope.sin"),
        mf.past_name(i, key), mf.past_name(i, value), _domain=mf.PERSEUS_DOMAIN,
        _outputs=[p + "out", mf.present_name(i, key), mf.present_name(i, value)],
        num_heads=cfg.num_attention_heads, scale=cfg.head_dim ** -0.5)
    return out


def _mlp(b: Builder, w, p: str, h: str) -> str:
    """SwiGLU: down(silu(gate(h)) * up(h)); a dense layer or the fused shared experts.
    gate and up are one GEMM ([d, 2F], gate columns first)."""
    gate, up = b.Split(b.MatMul(h, w(p + "gate_up_proj"), _name=p + "gate_up"), num_outputs=2, axis=-1,
                       _outputs=2)
    act = b.Mul(b.Swish(gate), up, _name=p + "act")
    return b.MatMul(act, w(p + "down_proj"), _name=p + "out")


def _moe(b: Builder, w, cfg: ModelConfig, i: int, h: str) -> str:
    p = f"layers.{i}.mlp."
    routed = b.op(mf.OP_MOE, h, w(p + "router"), w(p + "router_bias"), w(p + "experts.gate_proj"),
                  w(p + "experts.up_proj"), w(p + "experts.down_proj"), _domain=mf.PERSEUS_DOMAIN,
                  _name=p + "routed", top_k=cfg.num_experts_per_tok, normalize=int(cfg.norm_topk_prob),
                  scaling=float(cfg.routed_scaling_factor), **ops.routing_attributes(cfg))
    if not cfg.n_shared_experts:
        return routed
    return b.Add(routed, _mlp(b, w, p + "shared.", h), _name=p + "out")
