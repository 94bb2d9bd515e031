"""What an exported graph holds, read from model.onnx without loading its weights (onnx only).

    weights = initializers(folder)                 # [Tensor(name, nbytes, dims, dtype)]
    component(name)                                # "attention", "experts", "router", ...
    cost = decode_cost(folder, context=900)        # bytes and FLOPs one decode step needs

Weight bytes come from the initializers themselves (the external-data `length`, else the
raw/typed data, else dims x item size), so a quantized folder (int8 / int4 tensors plus their
scales and zero points) is measured as stored. Component names are matched on the exporter's
initializer names (`perseus_edge.export.weights`), which a quantizer keeps as a prefix of the
tensors it writes (`layers.0.attn.q_proj_quantized`, `..._scale`, `..._zero_point`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perseus_edge import modelfile as mf

# Component order used by every table and plot.
COMPONENTS = ("embeddings", "attention", "experts", "shared experts", "mlp", "router", "norms", "head",
              "rope tables", "other")
SPARSE_MOE_OPS = ("MoE", "QMoE")  # onnxruntime kernels that run only the selected experts

_DTYPE_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64,
               16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4}


@dataclass
class Tensor:
    name: str
    nbytes: int
    dims: tuple
    dtype: int  # onnx TensorProto data type

    @property
    def component(self) -> str:
        return component(self.name)


def component(name: str) -> str:
    """The model component an initializer belongs to, from its (exporter-given) name."""
    n = name.lower()
    if "embed_tokens" in n:
        return "embeddings"
    if "lm_head" in n:
        return "head"
    if n.startswith("rope.") or "rope.cos" in n or "rope.sin" in n:
        return "rope tables"
    if re.search(r"(^|\.)(input_norm|post_norm|kv_norm|q_a_norm|norm)($|[._])", n):
        return "norms"
    if ".mlp.router" in n:
        return "router"
    if ".mlp.shared." in n:
        return "shared experts"
    if ".mlp.experts." in n or re.search(r"\.mlp\.experts?\.?fc[12]", n):
        return "experts"
    if ".mlp." in n:
        return "mlp"
    if ".attn." in n:
        return "attention"
    return "other"


def _load(folder: Path):
    import onnx

    path = Path(folder) / mf.MODEL_ONNX
    return onnx.load(str(path), load_external_data=False)


def _nbytes(t) -> int:
    ext = {e.key: e.value for e in t.external_data}
    if "length" in ext:
        return int(ext["length"])
    if t.raw_data:
        return len(t.raw_data)
    count = int(np.prod(t.dims)) if len(t.dims) else 1
    return (count * _DTYPE_BITS.get(t.data_type, 32) + 7) // 8


def initializers(folder: str | Path, model=None) -> list[Tensor]:
    """Every initializer of the main graph with its stored size (weights are not read)."""
    model = model if model is not None else _load(Path(folder))
    return [Tensor(t.name, _nbytes(t), tuple(t.dims), t.data_type) for t in model.graph.initializer]


def _is_sparse_moe_experts(t: Tensor) -> bool:
    """An input of perseus.SparseMoE's experts (fc1 / fc2, their codes, scales, zero points)."""
    return bool(t.dims) and re.search(r"\.fc[12]($|\.)", t.name) is not None


def _folded_shared(t: Tensor, routed: int) -> int:
    """How many shared experts the ort-cpu lowering folded in after the `routed` ones ([E + S, ...])."""
    return max(0, t.dims[0] - routed)


def weight_breakdown(folder: str | Path, model=None) -> dict[str, int]:
    """Bytes per component (every key of COMPONENTS, zeros included); sums to the initializer total."""
    out = dict.fromkeys(COMPONENTS, 0)
    routed = None
    for t in initializers(folder, model):
        shared = 0
        if t.component == "experts" and _is_sparse_moe_experts(t):
            routed = routed if routed is not None else read_config(folder).n_routed_experts
            shared = t.nbytes * _folded_shared(t, routed) // t.dims[0]
        out[t.component] += t.nbytes - shared
        out["shared experts"] += shared
    return out


def read_config(folder: str | Path):
    from perseus_edge.model.config import ModelConfig

    return ModelConfig.load(folder)


def cache_layout(folder: str | Path, model=None) -> dict:
    """The cache buffers the graph declares: per-token bytes, max context, bytes at full context."""
    model = model if model is not None else _load(Path(folder))
    per_token, context, buffers = 0, 0, 0
    for inp in model.graph.input:
        if not inp.name.startswith("past."):
            continue
        tt = inp.type.tensor_type
        dims = [d.dim_value for d in tt.shape.dim]
        bits = _DTYPE_BITS.get(tt.elem_type, 32)
        per_token += dims[2] * bits // 8
        context = max(context, dims[1])
        buffers += 1
    return {"bytes_per_token": per_token, "max_context": context, "buffers": buffers,
            "bytes_full_context": per_token * context}


def is_sparse_moe(model) -> bool:
    """Whether the graph runs only the selected experts: perseus.SparseMoE calls (ort-cpu), or
    onnxruntime's MoE / QMoE inline (4-bit experts with fp32 activations)."""
    return any((n.domain, n.op_type) == (mf.PERSEUS_DOMAIN, mf.OP_SPARSE_MOE)
               or (n.domain == mf.MS_DOMAIN and n.op_type in SPARSE_MOE_OPS) for n in model.graph.node)


def decode_cost(folder: str | Path, context: int, model=None) -> dict:
    """Bytes read and FLOPs of one decode step (batch 1) attending to `context` cached tokens.

    Weights: every initializer is read once per step, except the embedding table and the RoPE
    tables (one row each) and, when the graph runs a sparse MoE kernel (`ort-cpu` target), the
    routed experts (top_k of n_routed_experts, plus the shared experts folded in after them); the
    portable graph's perseus.MoE body multiplies
    every expert (zeroing the unselected ones), so all of them are read.
    Cache: the `context` valid rows are read and one row is written.
    FLOPs: 2 per multiply-add of the weight matmuls (all experts for the dense MoE body) plus the
    absorbed attention over the cache (MLA: scores against c_kv and k_rope, probs . c_kv; MHA:
    q.K and p.V per head).
    """
    model = model if model is not None else _load(Path(folder))
    cfg = read_config(folder)
    sparse = is_sparse_moe(model)
    frac = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.is_moe else 1.0
    weight_bytes = 0.0
    for t in initializers(folder, model):
        comp = t.component
        if comp in ("embeddings", "rope tables") and t.dims:
            rows = max(t.dims[0], 1)
            weight_bytes += t.nbytes / rows
            if comp == "embeddings" and cfg.tie_word_embeddings:
                weight_bytes += t.nbytes  # also the LM head
        elif comp == "experts" and sparse:
            # the shared experts folded in after the routed ones are always read
            shared = _folded_shared(t, cfg.n_routed_experts) if _is_sparse_moe_experts(t) else 0
            weight_bytes += t.nbytes * (frac if not shared else
                                        (cfg.num_experts_per_tok + shared) / (cfg.n_routed_experts + shared))
        else:
            weight_bytes += t.nbytes
    cache = cache_layout(folder, model)
    cache_bytes = cache["bytes_per_token"] * (context + 1)
    flops = decode_flops(cfg, context, all_experts=cfg.is_moe and not sparse)
    return {"weight_bytes": int(weight_bytes), "cache_bytes": int(cache_bytes),
            "bytes": int(weight_bytes + cache_bytes), "flops": int(flops), "sparse_moe": sparse,
            "context": context}


def decode_flops(cfg, context: int, all_experts: bool = False) -> int:
    """FLOPs of one decode step: weight matmuls + attention over `context` cached tokens."""
    d, L, h = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    matmul = L * cfg.attention_params() + cfg.vocab_size * d
    for i in range(L):
        total, active = cfg.ffn_params(i)
        matmul += total if all_experts else active
    s = context + 1
    if cfg.is_mla:
        attn = 2 * s * h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + 2 * s * h * cfg.kv_lora_rank
    else:
        attn = 4 * s * h * cfg.head_dim
    return 2 * matmul + L * attn
