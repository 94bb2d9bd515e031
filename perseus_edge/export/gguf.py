"""Checkpoint -> GGUF file for llama.cpp's deepseek2 loader (the same weights in llama.cpp / ollama).

    export_gguf("ckpt/", "model.gguf", outtype="q8_0")    # f32 | f16 | q8_0 | q4_0

Written with gguf-py (`gguf` package) the way llama.cpp's own converter writes a DeepseekV3
checkpoint (`convert_hf_to_gguf.py`, class DeepseekV2Model), which our MLA checkpoints are:
  - names      HF tensor names through gguf-py's deepseek2 name map; experts stacked into one
               [n_expert, out, in] tensor per projection; kv_b_proj split into k_b (transposed,
               for absorbed attention) and v_b; e_score_correction_bias -> exp_probs_b.bias
  - metadata   MLA as MQA (head_count_kv 1, key length kv_lora_rank + rope), MLA head sizes,
               expert counts and widths, the gating function always written (llama.cpp assumes
               softmax, DeepSeek-V2's, when the key is absent, and our models use sigmoid), `attention.q_lora_rank` always written (0 without q LoRA:
               the loader reads it for most layer counts)
  - tokenizer  our byte-level BPE as llama.cpp's "gpt2" model with GPT-2 pre-tokenization (our
               pre-tokenizer is ByteLevel with GPT-2's regex); no BOS added
  - types      1-D tensors, norms, the router and biases stay F32; other weights take `outtype`,
               and a tensor whose rows are not a multiple of the 32-element block (expert width
               46 in the 54M) falls back to F16, as llama.cpp's converter and quantizer do
RoPE: llama.cpp's deepseek2 rotates adjacent pairs, which is what rope_interleave=True means
for these weights, so they are written as stored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from perseus_edge.errors import PerseusError

OUTTYPES = ("f32", "f16", "q8_0", "q4_0")
ARCH = "deepseek2"


def _types(outtype: str):
    import gguf

    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (q.F32, f.ALL_F32), "f16": (q.F16, f.MOSTLY_F16),
            "q8_0": (q.Q8_0, f.MOSTLY_Q8_0), "q4_0": (q.Q4_0, f.MOSTLY_Q4_0)}[outtype]


def check_config(cfg) -> None:
    """One-line refusals for what llama.cpp's deepseek2 graph would compute differently (or what
    this exporter has not been checked against llama.cpp for)."""
    if not cfg.is_mla:
        raise PerseusError(f"GGUF export needs an MLA architecture (llama.cpp's deepseek2); "
                           f"{cfg.arch!r} is not one")
    if cfg.rope_scaling:
        raise PerseusError(f"GGUF export does not support rope_scaling yet ({cfg.rope_scaling!r})")
    if not cfg.rope_interleave:
        raise PerseusError("GGUF export needs rope_interleave=true (llama.cpp's deepseek2 rotates pairs)")
    if cfg.attention_bias:
        raise PerseusError("GGUF export does not support attention_bias=true (llama.cpp's deepseek2 has no "
                           "attention biases)")
    if cfg.is_moe and cfg.n_group > 1:
        raise PerseusError(f"GGUF export does not support group-limited routing yet (n_group {cfg.n_group})")


def hf_tensors(state: dict, cfg) -> dict[str, np.ndarray]:
    """Checkpoint tensors (HF DeepseekV3 names) -> the names and shapes llama.cpp's converter
    hands to gguf-py's name map, as float32 numpy arrays."""
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    heads, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    for name, tensor in state.items():
        data = tensor.float().numpy()
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight", name)
        if m:
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = data
        elif name.endswith("kv_b_proj.weight"):
            kv_b = data.reshape(heads, nope + v, data.shape[-1])
            out[name.replace("kv_b_proj", "k_b_proj")] = np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))
            out[name.replace("kv_b_proj", "v_b_proj")] = np.ascontiguousarray(kv_b[:, nope:])
        elif name.endswith("e_score_correction_bias"):
            out[name.replace("e_score_correction_bias", "e_score_correction.bias")] = data
        else:
            out[name] = data
    for (layer, proj), by_id in sorted(experts.items()):
        if sorted(by_id) != list(range(cfg.n_routed_experts)):
            raise PerseusError(f"layer {layer} {proj}: experts {sorted(by_id)[:4]}... do not cover "
                               f"0..{cfg.n_routed_experts - 1}")
        out[f"model.layers.{layer}.mlp.experts.{proj}.weight"] = np.stack([by_id[i] for i in range(len(by_id))])
    return out


def gguf_tensors(state: dict, cfg) -> dict[str, np.ndarray]:
    """{gguf name: float32 array} in llama.cpp's naming."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, cfg.num_hidden_layers)
    out = {}
    for name, data in hf_tensors(state, cfg).items():
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise PerseusError(f"no llama.cpp deepseek2 name for checkpoint tensor {name!r}")
        out[new] = data
    return out


def tensor_type(name: str, data: np.ndarray, qtype):
    """What llama.cpp's converter stores: F32 for 1-D, norms, the router and biases, else qtype."""
    import gguf

    if data.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return qtype


def add_metadata(w, cfg, file_type, name: str) -> None:
    import gguf

    w.add_name(name)
    w.add_file_type(file_type)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs as MQA over the latent
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace if cfg.is_moe else cfg.num_hidden_layers)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size if cfg.is_moe else cfg.intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts if cfg.is_moe else 0)
    if cfg.is_moe:
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
        gating = gguf.ExpertGatingFuncType
        w.add_expert_gating_func(gating.SIGMOID if cfg.scoring_func == "sigmoid" else gating.SOFTMAX)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        if cfg.norm_topk_prob:
            w.add_expert_weights_norm(True)


def add_tokenizer(w, tokenizer_json: dict, vocab_size: int) -> None:
    """Byte-level BPE as llama.cpp's gpt2 tokenizer: tokens by id, types, merges, special ids."""
    import gguf

    model = tokenizer_json.get("model", {})
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise PerseusError("GGUF export needs a byte-level BPE tokenizer with GPT-2's regex")
    by_id = {i: t for t, i in model["vocab"].items()}
    special = {a["id"]: a["content"] for a in tokenizer_json.get("added_tokens", [])}
    by_id.update(special)
    if len(by_id) > vocab_size or max(by_id) >= vocab_size:
        raise PerseusError(f"the tokenizer has ids up to {max(by_id)}, the model's vocabulary is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    names = {v: k for k, v in special.items()}
    eos = names.get("<|endoftext|>", 0)
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    if "<|pad|>" in names:
        w.add_pad_token_id(names["<|pad|>"])
    w.add_add_bos_token(False)


def export_gguf(checkpoint: str | os.PathLike, out: str | os.PathLike, outtype: str = "f32",
                force: bool = False) -> Path:
    """Write `out` (atomically: a temp file renamed into place); returns its path."""
    import json

    if outtype not in OUTTYPES:
        raise PerseusError(f"unknown --outtype {outtype!r} (choose from {', '.join(OUTTYPES)})")
    try:
        import gguf
    except ImportError:
        raise PerseusError("GGUF export needs the gguf package: pip install gguf") from None
    from rich.progress import Progress

    from perseus_edge.checkpoint import load_state
    from perseus_edge.model.config import ModelConfig

    ckpt, out = Path(checkpoint), Path(out)
    if out.suffix != ".gguf":
        raise PerseusError(f"a GGUF output is a file named *.gguf, got {out}")
    if out.exists() and not force:
        raise PerseusError(f"{out} exists (use --force to replace it)")
    cfg = ModelConfig.load(ckpt)
    check_config(cfg)
    tok_path = ckpt / "tokenizer.json"
    if not tok_path.is_file():
        raise PerseusError(f"{ckpt} has no tokenizer.json")
    qtype, file_type = _types(outtype)
    tensors = gguf_tensors(load_state(ckpt), cfg)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        add_metadata(w, cfg, file_type, ckpt.resolve().name)
        add_tokenizer(w, json.loads(tok_path.read_text()), cfg.vocab_size)
        with Progress(transient=True) as bar:
            task = bar.add_task(f"GGUF {outtype}", total=len(tensors))
            for name, data in tensors.items():
                kind = tensor_type(name, data, qtype)
                try:
                    stored = gguf.quants.quantize(data, kind)
                except gguf.QuantError:  # rows not a multiple of the block: F16, as llama.cpp does
                    kind = gguf.GGMLQuantizationType.F16
                    stored = gguf.quants.quantize(data, kind)
                w.add_tensor(name, stored, raw_dtype=kind)
                bar.advance(task)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
