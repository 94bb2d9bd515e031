"""The deployable model folder as data: every file name, graph input/output and key in one place.

Like gguf-py's constants module, this is the single source of truth shared by the exporter (which
writes these names), the quantizer (which rewrites the graph and keeps them) and the runtime (which
binds them). Torch- and onnx-free; `perseus_edge.modelfile` re-exports all of it.

Folder layout (kind "onnx" in manifest.json):
    model.onnx            the graph; large weights in model.onnx.data (external data)
    config.json           ModelConfig of the exported model (the checkpoint's config)
    tokenizer.json        byte-level BPE tokenizer
    generation_config.json  defaults for the runtime (max_context, eos ids, sampling)
    manifest.json         sha256 of every file + export/quantization metadata

Graph contract (one graph serves prefill and decode):
    inputs   input_ids   int64 [batch, seq]        tokens to process
             position    int64 [batch]             absolute position of input_ids[b, 0] per row (= tokens
                                                   that row has cached); rows may differ
             logits_rows int64 [rows]              which of the seq new tokens get logits (a
                                                   generation's prefill needs only the last one)
             past.{i}.{slot}  float [batch, max_context, ...] preallocated cache buffers, per layer i
    outputs  logits      float [batch, rows, vocab]
             present.{i}.{slot}  same shape as past; the same buffer with each row b's rows
                                 position[b]..position[b]+seq-1 written

Cache slots: MLA layers cache the latent `c_kv` [B, C, kv_lora_rank] and `k_rope` [B, C, qk_rope_head_dim];
MHA layers cache `key` and `value` [B, C, num_heads * head_dim]. Bind present.* to the same
OrtValue as past.* (IO binding) so ORT updates the cache in place.
"""

from __future__ import annotations

MODEL_ONNX = "model.onnx"
MODEL_DATA = "model.onnx.data"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
GENERATION_CONFIG = "generation_config.json"
MANIFEST = "manifest.json"
# ORT mobile format (optional, the compiler's last serialize step, beside model.onnx)
MODEL_ORT = "model.ort"
REQUIRED_OPS = "model.required_operators.config"  # op list for a minimal ORT build

INPUT_IDS = "input_ids"
POSITION = "position"
LOGITS_ROWS = "logits_rows"  # absent from folders exported before it: logits for every new token
LOGITS = "logits"

PERSEUS_DOMAIN = "perseus"
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops (MatMulNBits, MoE, QMoE, ...)
OP_LATENT_ATTENTION = "LatentAttention"
OP_ATTENTION = "Attention"  # MHA baseline, same cache contract
OP_MOE = "MoE"
OP_SPARSE_MOE = "SparseMoE"  # ort-cpu: routing + the selected experts (lower/passes.py)
OP_LINEAR = "Linear"  # ort-cpu: x W^T with W [N, K], the float LM head (lower/passes.py)

# manifest.json of an exported folder: kind, and the key holding the export metadata
# ({"opset", "perseus_ops", "max_context", "source_checkpoint": {"path", "sha256"}, ...})
KIND_ONNX = "onnx"
EXPORT_META = "export"

# Lowering targets: `portable` (standard ONNX + the perseus functions, any ONNX runtime) and
# `ort-cpu` (onnxruntime CPU kernels where they measure faster). The manifest key LOWER_META holds
# {"target", "passes", ...}; a folder without it is portable.
TARGETS = ("portable", "ort-cpu")
LOWER_META = "lowering"


def cache_slots(is_mla: bool) -> tuple[str, str]:
    return ("c_kv", "k_rope") if is_mla else ("key", "value")


def past_name(layer: int, slot: str) -> str:
    return f"past.{layer}.{slot}"


def present_name(layer: int, slot: str) -> str:
    return f"present.{layer}.{slot}"


def cache_widths(cfg) -> tuple[int, int]:
    """Last-dimension widths of the two cache slots of every layer, from a ModelConfig."""
    if cfg.is_mla:
        return cfg.kv_lora_rank, cfg.qk_rope_head_dim
    return cfg.hidden_size, cfg.hidden_size


# int8 cache (`perseus quantize --kv-cache int8`): each cache slot holds int8 codes and, beside it,
# one float32 scale per cached row: past.{i}.{slot}_scale / present.{i}.{slot}_scale
# [batch, max_context, 1], bound in place like the slot itself.
CACHE_SCALE_SUFFIX = "_scale"


def cache_scale_slot(slot: str) -> str:
    return slot + CACHE_SCALE_SUFFIX


# manifest.json of a quantized folder: kind "onnx-<scheme>" and this key holding the scheme and
# its settings ({"scheme", "isa", "target", "weights": {...}, "kv_cache", "source": {"path", "sha256"}, ...})
QUANT_META = "quantization"

__all__ = [name for name in dir() if name.isupper() or name in (
    "cache_slots", "past_name", "present_name", "cache_widths", "cache_scale_slot")]
