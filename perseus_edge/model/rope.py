"""RoPE frequencies and scaling, exactly as transformers computes them for DeepSeek-V2/V3.

`ModelConfig.rope_scaling` holds transformers' rope parameters other than `rope_theta` (None for
plain RoPE). Supported types, each reproducing `transformers.modeling_rope_utils` to the bit
(float32 torch ops in the same order):

    linear   positions divided by `factor`
    dynamic  NTK-aware base that only grows beyond max_position_embeddings: plain RoPE within the
             context, which is as far as perseus ever runs (the cache has that many rows at most)
    yarn     per-frequency blend of interpolation and extrapolation (`beta_fast`, `beta_slow`,
             `original_max_position_embeddings`, `truncate`); cos/sin scaled by
             `attention_factor` (from `mscale` / `mscale_all_dim` when not given), and DeepSeek's
             softmax scale multiplied by mscale(factor, mscale_all_dim)^2
    llama3   wavelength-dependent division by `factor` (`low_freq_factor`, `high_freq_factor`)

Refused: longrope (its frequencies switch with the running sequence length, which a position-
indexed cache table cannot express), proportional and anything else, and partial rotation.
The checks are torch-free (the config imports them); the tables need torch.
"""

from __future__ import annotations

import json
import math
from typing import Callable

# keys each rope type reads (rope_type itself excluded), as transformers validates them
ROPE_KEYS = {
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}
REQUIRED = {"linear": {"factor"}, "dynamic": {"factor"}, "yarn": {"factor"},
            "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}}


def split_rope_parameters(data: dict) -> dict:
    """transformers 5's `rope_parameters` (or 4.x's `rope_scaling`, `type` spelling) -> our keys:
    `rope_theta` and `rope_scaling` (None for the default type)."""
    data = dict(data)
    params = data.pop("rope_parameters", None)
    if params is None:
        params = data.get("rope_scaling")
    if params is None:
        return data
    if not isinstance(params, dict):
        return {**data, "rope_scaling": params}  # check_rope_scaling refuses it
    params = dict(params)
    if "rope_theta" in params:
        data["rope_theta"] = params.pop("rope_theta")
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    if params.get("partial_rotary_factor", 1.0) == 1.0:
        params.pop("partial_rotary_factor", None)
    data["rope_scaling"] = None if params == {"rope_type": "default"} else params
    return data


def check_rope_scaling(params: dict | None, bad: Callable[[str], None]) -> None:
    if params is None:
        return
    if not isinstance(params, dict):
        bad(f"rope_scaling must be an object, got {json.dumps(params)}")
    kind = params.get("rope_type")
    if kind not in ROPE_KEYS:
        bad(f"rope_scaling rope_type = {json.dumps(kind)} is not supported "
            f"(supported: default, {', '.join(ROPE_KEYS)})")
    unknown = sorted(set(params) - ROPE_KEYS[kind] - {"rope_type"})
    if unknown:
        bad(f"rope_scaling key {unknown[0]} = {json.dumps(params[unknown[0]])} is not supported "
            f"for rope_type {kind}")
    missing = sorted(REQUIRED[kind] - {k for k, v in params.items() if v is not None})
    if missing:
        bad(f"rope_scaling of rope_type {kind} needs {missing[0]}")
    factor = params.get("factor")
    if factor is not None and (not isinstance(factor, (int, float)) or factor <= 0):
        bad(f"rope_scaling factor must be a positive number, got {json.dumps(factor)}")


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's Eq. 21: 0.1 * mscale * log(scale) + 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def mscale_squared(params: dict | None) -> float:
    """Factor on DeepSeek's softmax scale (transformers' `yarn_apply_mscale`)."""
    if params and params.get("rope_type", "default") != "default" and params.get("mscale_all_dim"):
        m = yarn_get_mscale(params["factor"], params["mscale_all_dim"])
        return m * m
    return 1.0


def inv_freq(cfg, dim: int):
    """(inverse frequencies [dim / 2] float32 tensor, attention factor on cos/sin)."""
    import torch

    base = cfg.rope_theta
    params = cfg.rope_scaling or {"rope_type": "default"}
    kind = params["rope_type"]
    default = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind in ("default", "dynamic"):  # dynamic: base unchanged up to max_position_embeddings
        return default, 1.0
    if kind == "linear":
        return default / params["factor"], 1.0
    if kind == "llama3":
        return _llama3(default, params), 1.0
    return _yarn(cfg, dim, params)


def _yarn(cfg, dim: int, p: dict):
    import torch

    base = cfg.rope_theta
    original = p.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = p.get("factor") or cfg.max_position_embeddings / original
    attention_factor = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return freq, attention_factor


def _llama3(freq, p: dict):
    import torch

    factor, low_f, high_f = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low_f, old / high_f
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_wavelen, freq / factor, freq)
    smooth = (old / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions, cfg, dim: int):
    """cos/sin [*positions.shape, dim / 2] (one angle per rotated pair), times the attention factor."""
    import torch

    freq, factor = inv_freq(cfg, dim)
    angles = positions.to(torch.float32)[..., None] * freq.to(positions.device)
    return angles.cos() * factor, angles.sin() * factor
