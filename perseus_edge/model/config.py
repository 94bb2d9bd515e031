"""Model configuration for the MoE-MLA-RoPE family (torch-free).

One dataclass holds every shape. Field names are those of transformers' `DeepseekV3Config`, so
a checkpoint's config.json maps 1:1 onto HF; `arch` selects the family member:

    moe-mla-rope  MLA attention + shared/routed micro-experts (the family's main member)
    mla-dense     MLA attention + dense SwiGLU MLP
    mha           vanilla multi-head attention with full RoPE + dense SwiGLU MLP
    mha-moe       vanilla multi-head attention + shared/routed micro-experts

Parameter, KV-cache and FLOP counts are computed here analytically so `perseus info` and the
runtime can report them without torch (a test checks them against the real module).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from perseus_edge.errors import PerseusError
from perseus_edge.modelfile.names import CONFIG

ARCHS = ("moe-mla-rope", "mla-dense", "mha", "mha-moe")
# scoring_func -> the topk_methods transformers implements with it (V3: sigmoid; V2: softmax)
ROUTING = {"sigmoid": ("noaux_tc",), "softmax": ("greedy", "group_limited_greedy")}
# DeepSeek's q_a_layernorm and kv_a_layernorm use RMSNorm's default epsilon, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6

# Keys of a config.json that do not change the forward pass: metadata, training-only and
# generation settings (transformers' PretrainedConfig generics and DeepSeek's own). They are kept
# in `extra` and written back; any other key that is not a field is refused, so nothing that
# changes the math is silently dropped.
INERT_KEYS = frozenset("""
    architectures model_type transformers_version dtype torch_dtype _name_or_path auto_map
    _commit_hash _attn_implementation_autoset use_cache bos_token_id eos_token_id pad_token_id
    sep_token_id decoder_start_token_id initializer_range attention_dropout output_router_logits
    router_aux_loss_coef aux_loss_alpha seq_aux ep_size pretraining_tp head_dim qk_head_dim
    num_nextn_predict_layers num_mtp_layers output_attentions output_hidden_states return_dict
    torchscript use_bfloat16 tf_legacy_loss is_decoder is_encoder_decoder add_cross_attention
    tie_encoder_decoder finetuning_task id2label label2id task_specific_params problem_type
    tokenizer_class prefix max_length min_length do_sample early_stopping num_beams
    num_beam_groups diversity_penalty temperature top_k top_p typical_p repetition_penalty
    length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids
    num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
    forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
    begin_suppress_tokens cross_attention_hidden_size
""".split())
# Keys allowed only at the value that leaves the forward pass unchanged.
NEUTRAL_VALUES = {"hidden_act": "silu", "mlp_bias": False, "moe_layer_freq": 1, "quantization_config": None,
                  "pruned_heads": {}, "chunk_size_feed_forward": 0, "partial_rotary_factor": 1.0}


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "int | None": "an integer or null", "dict": "an object"}


def _has_type(value, annotation: str) -> bool:
    if annotation == "int | None" and value is None:
        return True
    if annotation in ("int", "int | None"):
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, {"bool": bool, "str": str, "dict": dict}.get(annotation, object))


@dataclass
class ModelConfig:
    arch: str = "moe-mla-rope"
    vocab_size: int = 8192
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    max_position_embeddings: int = 1024
    # MLA (DeepSeek-V2/V3): latent KV of rank kv_lora_rank, decoupled RoPE key of qk_rope_head_dim.
    kv_lora_rank: int = 256
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    # MHA baselines: head_dim = hidden_size // num_attention_heads, RoPE over the whole head.
    # Feed-forward: dense SwiGLU width, and micro-expert width for MoE layers.
    intermediate_size: int = 384
    moe_intermediate_size: int = 48
    n_routed_experts: int = 62
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 0
    # Routing: DeepSeek-V3 scores experts with a sigmoid and picks top-k by score + selection bias
    # ("noaux_tc"); DeepSeek-V2 with a softmax, top-k over all experts ("greedy") or within the
    # best groups ("group_limited_greedy"). n_group > 1 limits each token to its topk_group best
    # groups of n_routed_experts / n_group experts (V3 ranks a group by its top-2 sum, V2 by its max).
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    # Aux-loss-free balancing: per-expert bias step applied after each optimizer step.
    router_bias_update_rate: float = 1e-3
    rope_theta: float = 10000.0
    # transformers' rope parameters other than rope_theta ({"rope_type": "yarn", "factor": ..});
    # None is plain RoPE. The math is in perseus_edge/model/rope.py.
    rope_scaling: dict | None = None
    rope_interleave: bool = True  # rotate pairs (x0, x1), (x2, x3).. (DeepSeek) or halves (Llama)
    attention_bias: bool = False  # biases on q_a_proj, kv_a_proj_with_mqa and o_proj (MLA)
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    extra: dict = field(default_factory=dict, repr=False)  # inert keys (INERT_KEYS) kept, never lost

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise PerseusError(f"invalid model config: {msg}")

        if self.arch not in ARCHS:
            bad(f"unknown architecture {self.arch!r} (choose from {', '.join(ARCHS)})")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.is_mla:
            if not 0 < self.kv_lora_rank <= self.hidden_size:
                bad(f"kv_lora_rank {self.kv_lora_rank} must be in 1..hidden_size ({self.hidden_size})")
            if self.q_lora_rank is not None and not 0 < self.q_lora_rank <= self.hidden_size:
                bad(f"q_lora_rank {self.q_lora_rank} must be in 1..hidden_size ({self.hidden_size})")
            if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
                bad(f"qk_rope_head_dim must be a positive even number, got {self.qk_rope_head_dim}")
            if self.qk_nope_head_dim <= 0 or self.v_head_dim <= 0:
                bad("qk_nope_head_dim and v_head_dim must be positive")
        else:
            if self.hidden_size % self.num_attention_heads:
                bad(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}")
            if self.head_dim % 2:
                bad(f"head_dim {self.head_dim} must be even for RoPE")
        if self.is_moe:
            if self.n_routed_experts <= 0:
                bad("n_routed_experts must be positive for a MoE architecture")
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                bad(f"num_experts_per_tok (top-k) {self.num_experts_per_tok} must be in "
                    f"1..n_routed_experts ({self.n_routed_experts})")
            if self.n_shared_experts < 0 or self.moe_intermediate_size <= 0:
                bad("n_shared_experts must be >= 0 and moe_intermediate_size positive")
            if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
                bad(f"first_k_dense_replace {self.first_k_dense_replace} must be in "
                    f"0..num_hidden_layers ({self.num_hidden_layers})")
        if (not self.is_moe or self.first_k_dense_replace > 0) and self.intermediate_size <= 0:
            bad("intermediate_size must be positive for dense layers")
        if self.is_moe:
            self._validate_routing(bad)
        if self.attention_bias and not self.is_mla:
            bad("attention_bias is implemented for MLA attention only")
        from perseus_edge.model.rope import check_rope_scaling  # torch-free

        check_rope_scaling(self.rope_scaling, bad)

    def _validate_routing(self, bad) -> None:
        methods = ROUTING.get(self.scoring_func)
        if methods is None:
            bad(f"scoring_func {self.scoring_func!r} is not supported (choose from {', '.join(ROUTING)})")
        if self.topk_method not in methods:
            bad(f"topk_method {self.topk_method!r} does not go with scoring_func {self.scoring_func!r} "
                f"(supported: {', '.join(methods)})")
        if self.n_group < 1 or self.n_routed_experts % self.n_group:
            bad(f"n_group {self.n_group} must divide n_routed_experts ({self.n_routed_experts})")
        if not 1 <= self.topk_group <= self.n_group:
            bad(f"topk_group {self.topk_group} must be in 1..n_group ({self.n_group})")
        if self.grouped_routing:
            per_group = self.n_routed_experts // self.n_group
            if self.topk_method == "noaux_tc" and per_group < 2:
                bad(f"n_group {self.n_group} leaves {per_group} expert per group; noaux_tc ranks groups "
                    "by their top-2 experts")
            if self.num_experts_per_tok > self.topk_group * per_group:
                bad(f"num_experts_per_tok {self.num_experts_per_tok} exceeds the {self.topk_group * per_group} "
                    f"experts of topk_group {self.topk_group} groups")

    # ----------------------------------------------------------------- structure
    @property
    def is_mla(self) -> bool:
        return self.arch in ("moe-mla-rope", "mla-dense")

    @property
    def is_moe(self) -> bool:
        return self.arch in ("moe-mla-rope", "mha-moe")

    @property
    def head_dim(self) -> int:
        """Per-head width of the MHA baselines."""
        return self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def grouped_routing(self) -> bool:
        """Whether routing first picks topk_group of n_group expert groups (a no-op at n_group 1)."""
        return self.n_group > 1 and self.topk_method != "greedy"

    def softmax_scale(self) -> float:
        """Attention softmax scale: qk_head_dim^-0.5, times YaRN's mscale^2 (as transformers'
        `yarn_apply_mscale` for DeepSeek: scaled rope types with `mscale_all_dim` set)."""
        from perseus_edge.model.rope import mscale_squared

        return self.qk_head_dim ** -0.5 * mscale_squared(self.rope_scaling)

    def layer_is_moe(self, layer: int) -> bool:
        return self.is_moe and layer >= self.first_k_dense_replace

    # ----------------------------------------------------------------- counts
    def attention_params(self) -> int:
        d, h = self.hidden_size, self.num_attention_heads
        if not self.is_mla:
            return 4 * d * d
        q = (d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
             if self.q_lora_rank else d * h * self.qk_head_dim)
        kv_a = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv_b = self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv_a + kv_b + h * self.v_head_dim * d

    def ffn_params(self, layer: int) -> tuple[int, int]:
        """(total, active per token) parameters of one layer's feed-forward block."""
        d = self.hidden_size
        if not self.layer_is_moe(layer):
            p = 3 * d * self.intermediate_size
            return p, p
        expert = 3 * d * self.moe_intermediate_size
        router = self.n_routed_experts * d  # (its bias is a buffer, not a parameter)
        total = (self.n_routed_experts + self.n_shared_experts) * expert + router
        active = (self.num_experts_per_tok + self.n_shared_experts) * expert + router
        return total, active

    def param_counts(self) -> dict:
        d, L = self.hidden_size, self.num_hidden_layers
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        attn = L * self.attention_params()
        ffn = [self.ffn_params(i) for i in range(L)]
        norms = L * 2 * d + d
        total = embed + head + attn + sum(t for t, _ in ffn) + norms
        active = embed + head + attn + sum(a for _, a in ffn) + norms
        return {"total": total, "active": active, "embedding": embed, "head": head,
                "attention": attn, "ffn": sum(t for t, _ in ffn), "norms": norms}

    def kv_elems_per_token(self) -> int:
        """Cached elements per token, all layers: latent c_kv + k_rope (MLA) or K and V (MHA)."""
        per_layer = (self.kv_lora_rank + self.qk_rope_head_dim if self.is_mla
                     else 2 * self.num_attention_heads * self.head_dim)
        return per_layer * self.num_hidden_layers

    def kv_bytes_per_token(self, bytes_per_elem: int = 4) -> int:
        return self.kv_elems_per_token() * bytes_per_elem

    def flops_per_token(self, context: int) -> int:
        """Forward FLOPs for one token attending to `context` tokens (2 per multiply-add).

        Matmul weights count once per active parameter (embedding lookup excluded, LM head
        included); attention adds QK^T and PV over the context at full (naive) head widths.
        """
        c = self.param_counts()
        matmul = c["active"] - c["embedding"] - c["norms"]
        if self.tie_word_embeddings:
            matmul += c["embedding"]
        h = self.num_attention_heads
        v_dim = self.v_head_dim if self.is_mla else self.head_dim
        attn = 2 * context * h * (self.qk_head_dim + v_dim) * self.num_hidden_layers
        return 2 * matmul + attn

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Fields by name, inert keys into `extra`; a key that could change the math and is not
        implemented is refused with one line naming it and its value."""
        from perseus_edge.model.rope import split_rope_parameters

        if not isinstance(data, dict):
            raise PerseusError(f"invalid model config: a JSON {type(data).__name__}, expected an object")
        data = split_rope_parameters(data)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        for f in dataclasses.fields(cls):  # config.json is untrusted: types before any arithmetic
            if f.name in known and not _has_type(known[f.name], str(f.type)):
                raise PerseusError(f"invalid model config: {f.name} must be {_TYPE_WORDS[str(f.type)]}, "
                                   f"got {known[f.name]!r}")
        extra = {k: v for k, v in data.items() if k not in names}
        for key, value in extra.items():
            if key in NEUTRAL_VALUES:
                if value != NEUTRAL_VALUES[key] and not (key == "quantization_config" and not value):
                    raise PerseusError(f"unsupported model config: {key} = {json.dumps(value)} "
                                       f"(only {json.dumps(NEUTRAL_VALUES[key])} is implemented)")
            elif key == "num_key_value_heads":
                # MLA expands the latent to every head (transformers' DeepSeek ignores it); for
                # the MHA members it would mean grouped-query attention, not implemented
                if value not in (None, data.get("num_attention_heads")) and data.get("arch") in ("mha", "mha-moe"):
                    raise PerseusError(f"unsupported model config: num_key_value_heads = {value} "
                                       "(grouped-query attention is not implemented)")
            elif key not in INERT_KEYS:
                raise PerseusError(f"unknown model config key {key!r} = {json.dumps(value)}: refusing it "
                                   "rather than ignoring something that may change the forward pass")
        try:
            return cls(**known, extra=extra)
        except TypeError as e:
            raise PerseusError(f"invalid model config: {e}") from None

    def to_hf_dict(self) -> dict:
        """`to_dict` plus the keys transformers' DeepseekV3Config needs (MLA architectures only),
        so a checkpoint folder also loads with `DeepseekV3ForCausalLM.from_pretrained`."""
        out = self.to_dict()
        if self.is_mla:
            v2 = self.scoring_func == "softmax"  # DeepSeek-V2's routing; V3's otherwise
            out.update(
                model_type="deepseek_v2" if v2 else "deepseek_v3",
                architectures=["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"],
                num_key_value_heads=self.num_attention_heads, hidden_act="silu", attention_dropout=0.0,
                # a dense MLA model is DeepseekV3 with every layer dense
                first_k_dense_replace=self.first_k_dense_replace if self.is_moe else self.num_hidden_layers,
                n_routed_experts=self.n_routed_experts if self.is_moe else 1,
                bos_token_id=0, eos_token_id=0,
            )
        return out

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """config.json of any perseus folder (checkpoint or model), or the folder itself.

        The one reader of config.json: the inverse of `save` (HF's spelling of a dense MLA model,
        every layer dense, comes back as first_k_dense_replace 0)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG
        if not path.is_file():
            raise PerseusError(f"config not found: {path}")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PerseusError(f"{path} is not valid JSON ({e})") from None
        except OSError as e:
            raise PerseusError(f"cannot read {path}: {e.strerror}") from None
        if not isinstance(data, dict):
            raise PerseusError(f"{path} holds a JSON {type(data).__name__}, expected an object")
        if "arch" not in data:  # a transformers DeepSeek-V2/V3 folder, or refused in one line
            from perseus_edge.model.hf import config_from_transformers

            return config_from_transformers(data)
        if data.get("model_type") == "deepseek_v3" and data["arch"] == "mla-dense":
            data["first_k_dense_replace"] = 0
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """config.json in the form every perseus folder uses (`to_hf_dict`)."""
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def replace(self, **changes) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})


# --------------------------------------------------------------------- presets
# Seed sizes of arXiv 2508.01261 (17M, 53.9M, 202M total parameters) at vocab 8192, each with the
# seed's expert layout (2 shared + top-6 of 62 routed micro-experts) and kv_lora_rank = d/2.
PRESETS: dict[str, dict] = {
    # For unit tests: a few hundred thousand parameters, seconds on CPU.
    "tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=256, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, intermediate_size=128,
                 moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                 num_experts_per_tok=2),
    "17m": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8,
                kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                moe_intermediate_size=28),
    "54m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                moe_intermediate_size=46),
    "202m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 kv_lora_rank=384, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                 moe_intermediate_size=88),
}
PRESET_SIZES = {"17m": 17e6, "54m": 53.9e6, "202m": 202e6}


def preset(name: str, arch: str = "moe-mla-rope", **overrides) -> ModelConfig:
    """A preset in any architecture of the family.

    Dense members get `intermediate_size = (shared + top-k) * moe_intermediate_size`, i.e. the
    same active feed-forward parameters per token as the MoE target: the matched-active baseline.
    """
    if name not in PRESETS:
        raise PerseusError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    base = dict(PRESETS[name])
    base.setdefault("intermediate_size",
                    (base.get("n_shared_experts", 2) + base.get("num_experts_per_tok", 6))
                    * base["moe_intermediate_size"])
    return ModelConfig.from_dict({**base, "arch": arch, **overrides})
