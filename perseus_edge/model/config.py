"""Model configuration for the MoE-MLA-RoPE family (torch-free).

One dataclass holds every shape. Field names are those of transformers' `DeepseekV3Config`, so
a checkpoint's config.json maps 1:1 onto HF; `arch` selects the family member:

    moe-mla-rope  MLA attention + shared/routed micro-experts (the target)
    mla-dense     MLA attention + dense SwiGLU MLP
    mha           vanilla multi-head attention with full RoPE + dense SwiGLU MLP
    mha-moe       vanilla multi-head attention + shared/routed micro-experts

Parameter, KV-cache and FLOP counts are computed here analytically so `perseus info` and the
runtime can report them without torch (a test checks them against the real module).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from perseus_edge.errors import PerseusError
from perseus_edge.modelfile.names import CONFIG

ARCHS = ("moe-mla-rope", "mla-dense", "mha", "mha-moe")


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
    # Aux-loss-free balancing: per-expert bias step applied after each optimizer step.
    router_bias_update_rate: float = 1e-3
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys kept, never lost

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
        if self.vocab_size > 65535:
            bad(f"vocab_size {self.vocab_size} does not fit the uint16 token files (max 65535)")
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
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        try:
            return cls(**known, extra=extra)
        except TypeError as e:
            raise PerseusError(f"invalid model config: {e}") from None

    def to_hf_dict(self) -> dict:
        """`to_dict` plus the keys transformers' DeepseekV3Config needs (MLA architectures only),
        so a checkpoint folder also loads with `DeepseekV3ForCausalLM.from_pretrained`."""
        out = self.to_dict()
        if self.is_mla:
            out.update(
                model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
                num_key_value_heads=self.num_attention_heads, n_group=1, topk_group=1,
                hidden_act="silu", attention_bias=False, attention_dropout=0.0, rope_interleave=True,
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
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PerseusError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise PerseusError(f"{path} holds a JSON {type(data).__name__}, expected an object")
        if "arch" not in data:
            raise PerseusError(f"{path} has no 'arch' key: not a perseus model config")
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
PRESET_TARGETS = {"17m": 17e6, "54m": 53.9e6, "202m": 202e6}


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
