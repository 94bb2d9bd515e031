"""Stage `prepare`: the checkpoint's tensors in the layouts the graph consumes.

Everything the graph needs is computed here, once, at export time:
- linear layers transposed to [in, out], ONNX MatMul's layout (PyTorch stores [out, in]);
- projections of the same input side by side, so each is one GEMM: q | kv_a (or q_a | kv_a),
  q | k | v, gate | up; the MLA query rows are grouped as [all heads' nope | all heads' rope];
- RoPE lanes: DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ...; permuting the rope
  rows of the projections (and biases) to [even | odd] lanes lets the graph rotate halves (ONNX
  RotaryEmbedding, interleaved=0) and still yields exactly the k_rope the PyTorch model caches
  (its rotation outputs the rotated even lanes, then the odd ones). `rope_interleave: false`
  models already rotate halves and keep their rows;
- attention biases (`attention_bias`), in the same row order as their fused projection;
- MLA absorption: W_UK [H, nope, r] and W_UV^T [H, r, v], the per-head blocks of kv_b_proj
  that the absorbed attention applies to the query and to the attended latent;
- MoE: the routed experts side by side ([d, E*F], [E*F, d]) so an expert projection is one GEMM;
- RoPE tables cos/sin [max_context, rope_dim / 2], from the model's own `rope_cos_sin`: the
  scaled frequencies (linear, yarn, llama3) with YaRN's attention factor folded into both.

Tensor names are short and stable (`layers.3.attn.w_uk`) and become the initializer names.
"""

from __future__ import annotations

import numpy as np
import torch

from perseus_edge.model.config import ModelConfig
from perseus_edge.model.rope import rope_cos_sin
from perseus_edge.model.transformer import PerseusLM


def rope_rows(heads: int, head_dim: int, rope_dim: int, offset: int) -> np.ndarray:
    """Row order of a [heads * head_dim, in] projection that puts each head's rope lanes
    (rows offset..offset+rope_dim) as [even lanes | odd lanes], everything else unchanged."""
    lanes = np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)]) + offset
    head = np.concatenate([np.arange(offset), lanes, np.arange(offset + rope_dim, head_dim)])
    return (np.arange(heads)[:, None] * head_dim + head).ravel()


def prepare(model: PerseusLM, max_context: int) -> dict[str, np.ndarray]:
    """All graph tensors of `model`, as float32 numpy arrays keyed by graph name."""
    cfg = model.cfg
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {"embed_tokens": sd["model.embed_tokens.weight"],
                                  "norm": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = sd["lm_head.weight"].T
    rope_dim = model.rope_dim()
    cos, sin = rope_cos_sin(torch.arange(max_context), cfg, rope_dim)
    out["rope.cos"], out["rope.sin"] = cos.numpy(), sin.numpy()
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out[dst + "input_norm"] = sd[src + "input_layernorm.weight"]
        out[dst + "post_norm"] = sd[src + "post_attention_layernorm.weight"]
        attn = (_mla_weights if cfg.is_mla else _mha_weights)(cfg, sd, src + "self_attn.")
        out.update({dst + "attn." + k: v for k, v in attn.items()})
        ffn = _moe_weights(cfg, sd, src + "mlp.") if cfg.layer_is_moe(i) else _mlp_weights(sd, src + "mlp.")
        out.update({dst + "mlp." + k: v for k, v in ffn.items()})
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _mla_weights(cfg: ModelConfig, sd: dict, p: str) -> dict[str, np.ndarray]:
    h, nope, rope, r, v = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                           cfg.kv_lora_rank, cfg.v_head_dim)
    # query rows: every head's nope part, then every head's rope lanes ([even | odd] per head)
    if cfg.rope_interleave:
        per_head = rope_rows(h, nope + rope, rope, nope).reshape(h, nope + rope)
        kv_rows = rope_rows(1, r + rope, rope, r)
    else:  # already rotates halves
        per_head, kv_rows = np.arange(h * (nope + rope)).reshape(h, nope + rope), np.arange(r + rope)
    q_rows = np.concatenate([per_head[:, :nope].ravel(), per_head[:, nope:].ravel()])
    kv_a = sd[p + "kv_a_proj_with_mqa.weight"][kv_rows]  # [c_kv | k_rope] rows
    out = {}
    if cfg.q_lora_rank:  # q_a and kv_a read the same input: one [d, q_lora + r + rope] weight
        out["q_a_kv_a_proj"] = np.concatenate([sd[p + "q_a_proj.weight"], kv_a]).T
        out["q_a_norm"] = sd[p + "q_a_layernorm.weight"]
        out["q_b_proj"] = sd[p + "q_b_proj.weight"][q_rows].T
    else:  # one [d, H*nope + H*rope + r + rope] weight
        out["q_kv_a_proj"] = np.concatenate([sd[p + "q_proj.weight"][q_rows], kv_a]).T
    if cfg.attention_bias:  # q_a / kv_a / o_proj carry biases (q_proj and q_b_proj never do)
        q_bias = sd[p + "q_a_proj.bias"] if cfg.q_lora_rank else np.zeros(h * (nope + rope), np.float32)
        out["q_kv_a_bias"] = np.concatenate([q_bias, sd[p + "kv_a_proj_with_mqa.bias"][kv_rows]])
        out["o_bias"] = sd[p + "o_proj.bias"]
    out["kv_norm"] = sd[p + "kv_a_layernorm.weight"]
    kv_b = sd[p + "kv_b_proj.weight"].reshape(h, nope + v, r)
    out["w_uk"] = kv_b[:, :nope]  # [H, nope, r]: q_lat = q_nope @ W_UK
    out["w_uv"] = kv_b[:, nope:].transpose(0, 2, 1)  # [H, r, v]: out = latent @ W_UV^T
    out["o_proj"] = sd[p + "o_proj.weight"].T
    return out


def _mha_weights(cfg: ModelConfig, sd: dict, p: str) -> dict[str, np.ndarray]:
    rows = (rope_rows(cfg.num_attention_heads, cfg.head_dim, cfg.head_dim, 0) if cfg.rope_interleave
            else np.arange(cfg.hidden_size))
    qkv = [sd[p + "q_proj.weight"][rows], sd[p + "k_proj.weight"][rows], sd[p + "v_proj.weight"]]
    return {"qkv_proj": np.concatenate(qkv).T, "o_proj": sd[p + "o_proj.weight"].T}


def _mlp_weights(sd: dict, p: str) -> dict[str, np.ndarray]:
    gate_up = np.concatenate([sd[f"{p}gate_proj.weight"], sd[f"{p}up_proj.weight"]])
    return {"gate_up_proj": gate_up.T, "down_proj": sd[f"{p}down_proj.weight"].T}


def _moe_weights(cfg: ModelConfig, sd: dict, p: str) -> dict[str, np.ndarray]:
    experts = range(cfg.n_routed_experts)

    def side_by_side(name: str, axis: int) -> np.ndarray:
        return np.concatenate([sd[f"{p}experts.{e}.{name}.weight"].T for e in experts], axis=axis)

    out = {"router": sd[p + "gate.weight"].T, "router_bias": sd[p + "gate.e_score_correction_bias"],
           "experts.gate_proj": side_by_side("gate_proj", 1),  # [d, E*F]
           "experts.up_proj": side_by_side("up_proj", 1),
           "experts.down_proj": side_by_side("down_proj", 0)}  # [E*F, d]
    if cfg.n_shared_experts:
        out.update({"shared." + k: v for k, v in _mlp_weights(sd, p + "shared_experts.").items()})
    return out
