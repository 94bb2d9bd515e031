"""transformers DeepSeek-V2/V3 config.json -> ModelConfig, exactly or not at all (torch-free).

A folder written by `save_pretrained` has no `arch` key: the member of the family is inferred
(MLA attention; MoE unless every layer is dense). Keys absent from the file take the defaults of
transformers' config class, as `from_pretrained` would. What transformers does differently per
model type is pinned here, and where a key is ambiguous (its value would make transformers and
DeepSeek's reference code disagree) it is refused rather than guessed:

    deepseek_v3  sigmoid scores + selection bias, group-limited top-k ("noaux_tc", top-2 sum per
                 group); `scoring_func` / `topk_method` may only say so.
    deepseek_v2  softmax scores, "greedy" or "group_limited_greedy" (max per group), no selection
                 bias, always interleaved RoPE; transformers ignores `norm_topk_prob`, DeepSeek's
                 code applies it: only false is accepted.

Every remaining key goes through `ModelConfig.from_dict`, which implements it, keeps it as inert
metadata, or refuses it in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from perseus_edge.errors import PerseusError
from perseus_edge.model.config import ModelConfig

# transformers' DeepseekV3Config / DeepseekV2Config defaults for every key that shapes the model
V3_DEFAULTS = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
    routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
    qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
    norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_interleave=True, attention_bias=False)
V2_DEFAULTS = dict(
    vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
    attention_bias=False, first_k_dense_replace=0, kv_lora_rank=512, q_lora_rank=1536, n_group=None,
    n_routed_experts=64, n_shared_experts=2, qk_nope_head_dim=128, qk_rope_head_dim=64,
    routed_scaling_factor=1.0, topk_group=None, topk_method="greedy", norm_topk_prob=False,
    v_head_dim=128, num_experts_per_tok=None, moe_intermediate_size=1407)
MODEL_TYPES = {"deepseek_v3": V3_DEFAULTS, "deepseek_v2": V2_DEFAULTS}


def is_transformers_config(data: dict) -> bool:
    return "arch" not in data and data.get("model_type") in MODEL_TYPES


def is_transformers_folder(folder) -> bool:
    """Whether `folder` is a transformers DeepSeek-V2/V3 folder (save_pretrained), which needs no
    manifest. A config.json that is neither ours nor DeepSeek's raises its one-line error here,
    which says more than "no manifest" would."""
    try:
        data = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or "arch" in data:
        return False
    config_from_transformers(data)  # refuses what it cannot read
    return True


def refuse(key: str, value, why: str) -> None:
    raise PerseusError(f"unsupported model config: {key} = {json.dumps(value)} ({why})")


def config_from_transformers(data: dict) -> ModelConfig:
    """ModelConfig of a transformers DeepSeek-V2/V3 config.json (as a dict)."""
    model_type = data.get("model_type")
    if model_type not in MODEL_TYPES:
        supported = ", ".join(MODEL_TYPES)
        raise PerseusError(f"config.json has model_type {json.dumps(model_type)}: perseus reads "
                           f"transformers folders of model_type {supported}")
    d = {**MODEL_TYPES[model_type], **data}
    if model_type == "deepseek_v3":
        _only(d, "scoring_func", "sigmoid", "transformers' DeepseekV3 always scores with a sigmoid")
        _only(d, "topk_method", "noaux_tc", "transformers' DeepseekV3 always routes with noaux_tc")
    else:
        _only(d, "scoring_func", "softmax", "transformers' DeepseekV2 always scores with a softmax")
        _only(d, "rope_interleave", True, "DeepseekV2 always rotates interleaved pairs")
        if d["norm_topk_prob"]:
            refuse("norm_topk_prob", True, "transformers' DeepseekV2 ignores it while DeepSeek's code "
                   "normalises: ambiguous")
        if d["num_experts_per_tok"] is None:
            raise PerseusError("invalid model config: deepseek_v2 needs num_experts_per_tok")
        d["n_group"] = d["n_group"] or 1
        d["topk_group"] = d["topk_group"] or 1
    moe = d["first_k_dense_replace"] < d["num_hidden_layers"]
    d["arch"] = "moe-mla-rope" if moe else "mla-dense"
    if not moe:
        d["first_k_dense_replace"] = 0  # every layer dense: ours spells it with the arch
    return ModelConfig.from_dict(d)


def _only(d: dict, key: str, value, why: str) -> None:
    if d.get(key, value) != value:
        refuse(key, d[key], why)
    d[key] = value
