"""The MoE-MLA-RoPE decoder family in PyTorch: one code path, configured by `ModelConfig.arch`.

Module and parameter names follow transformers' DeepseekV3 (and Llama for the MHA baselines),
so `state_dict()` keys are the HF tensor names: `model.layers.3.self_attn.kv_b_proj.weight`,
`model.layers.3.mlp.experts.17.up_proj.weight`, ...

Generation cache, per layer, as a tuple of two tensors:
    MLA: (c_kv [B, S, kv_lora_rank], k_rope [B, S, qk_rope_head_dim])   the latent cache
    MHA: (k [B, H, S, head_dim], v [B, H, S, head_dim])                  the full K/V cache
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from perseus_edge.model.config import LATENT_NORM_EPS, ModelConfig
from perseus_edge.model.rope import rope_cos_sin

GROUP_ALIGN = 16  # rows: each expert's token group starts 16-row aligned in the grouped GEMM buffer

Cache = list[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ----------------------------------------------------------------------------- RoPE
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... as DeepSeek does, or halves
    (x_i, x_{i+D/2}) as Llama does (`interleave=False`, transformers' `rope_interleave: false`).

    Interleaved, the output lists the rotated even lanes then the odd lanes (HF's
    `apply_rotary_pos_emb_interleave`); q and k get the same layout, so q.k is unchanged.
    x: [B, T, H, D]; cos, sin: [B, T, D/2] (broadcast over heads).
    """
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """Boolean [q_len, k_len] mask, True where attending is allowed; queries are the last q_len keys."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= q_pos


# ----------------------------------------------------------------------------- attention
class LatentAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3) with decoupled RoPE.

    Keys and values are rebuilt from a shared latent `c_kv` (rank r) by per-head up-projections
    (W_UK, W_UV packed in `kv_b_proj`); only `c_kv` and the shared RoPE key `k_rope` are cached.
    The absorbed form folds W_UK into the query and W_UV into the output, so decoding attends over
    the latent cache directly and never materialises per-head keys.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, d, bias = cfg.num_attention_heads, cfg.hidden_size, cfg.attention_bias
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=bias)
        self.scale = cfg.softmax_scale()

    def query(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.q_lora_rank:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return self.q_proj(x)

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, r] and W_UV [H, v, r], the per-head slices of kv_b_proj."""
        c = self.cfg
        w = self.kv_b_proj.weight.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]

    def forward(self, x, cos, sin, past=None, absorb: bool = False):
        c = self.cfg
        b, t, _ = x.shape
        q = self.query(x).view(b, t, c.num_attention_heads, c.qk_head_dim)
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_rope = apply_rope(q_rope, cos, sin, c.rope_interleave)
        k_rope = apply_rope(k_rope[:, :, None, :], cos, sin, c.rope_interleave)[:, :, 0]
        if past is not None:
            c_kv = torch.cat([past[0], c_kv], dim=1)
            k_rope = torch.cat([past[1], k_rope], dim=1)
        mask = causal_mask(t, c_kv.shape[1], x.device)
        attn = self._absorbed if absorb else self._naive
        out = attn(q_nope, q_rope, c_kv, k_rope, mask)
        return self.o_proj(out.reshape(b, t, -1)), (c_kv, k_rope)

    def _naive(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Expand the latent into per-head K/V, then standard attention (training, prefill)."""
        c = self.cfg
        b, s, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(b, s, c.num_attention_heads, -1)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(-1, -1, c.num_attention_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        is_causal = mask.shape[0] == mask.shape[1]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if is_causal else mask, is_causal=is_causal, scale=self.scale)
        return out.transpose(1, 2)

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Attend over the latent cache directly: q.k = (W_UK^T q_nope).c_kv + q_rope.k_rope."""
        w_uk, w_uv = self.up_weights()
        q_latent = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)
        scores = torch.einsum("bthr,bsr->bhts", q_latent, c_kv) + torch.einsum("bthd,bsd->bhts", q_rope, k_rope)
        scores = (scores * self.scale).masked_fill(~mask, float("-inf"))
        probs = scores.float().softmax(-1).to(c_kv.dtype)
        out_latent = torch.einsum("bhts,bsr->bthr", probs, c_kv)
        return torch.einsum("bthr,hvr->bthv", out_latent, w_uv)


class MultiHeadAttention(nn.Module):
    """Vanilla multi-head attention with RoPE over the whole head (the Llama layout)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, past=None, absorb: bool = False):
        c = self.cfg
        b, t, _ = x.shape
        shape = (b, t, c.num_attention_heads, c.head_dim)
        q = apply_rope(self.q_proj(x).view(shape), cos, sin, c.rope_interleave).transpose(1, 2)
        k = apply_rope(self.k_proj(x).view(shape), cos, sin, c.rope_interleave).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        s = k.shape[2]
        is_causal = t == s
        mask = None if is_causal else causal_mask(t, s, x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), (k, v)


# ----------------------------------------------------------------------------- feed-forward
class MLP(nn.Module):
    """SwiGLU feed-forward: a dense layer, one micro-expert, or the fused shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def count_per_expert(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Token-slots routed to each expert. Unlike bincount (which reads the max index back to the
    host on CUDA), scatter_add never makes the CPU wait for the GPU."""
    flat = idx.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))


class Router(nn.Module):
    """Sigmoid top-k router with auxiliary-loss-free balancing (DeepSeek-V3), optionally limited
    to the best expert groups; softmax scoring (DeepSeek-V2) with the same code.

    `e_score_correction_bias` is added to the scores for *selection only*; the mixing weights come
    from the unbiased scores. After each optimizer step the trainer calls `update_bias`, which
    nudges under-loaded experts up and over-loaded ones down by a fixed rate: balance without a
    loss term fighting the language-modelling gradient.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.randn(cfg.n_routed_experts, cfg.hidden_size) * cfg.initializer_range)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        # Tokens routed to each expert since the last update (not saved in checkpoints).
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] -> (weights [N, k], expert indices [N, k])."""
        c = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if c.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias
        if c.grouped_routing:
            choice = self.limit_to_groups(choice)
        idx = torch.topk(choice, c.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, idx)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if self.training:
            self.load += count_per_expert(idx, c.n_routed_experts).to(self.load.dtype)
        return weights * c.routed_scaling_factor, idx

    def limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask (-inf) every expert outside the token's topk_group best groups. A group ranks by
        the sum of its top-2 choice scores (V3's noaux_tc) or by its best score (V2's
        group_limited_greedy). (V2 masks with 0 rather than -inf; no masked expert is ever picked
        since top-k fits in the allowed groups, a config invariant, so the result is the same.)"""
        c = self.cfg
        groups = choice.view(-1, c.n_group, c.n_routed_experts // c.n_group)
        rank = groups.topk(2, dim=-1).values.sum(-1) if c.topk_method == "noaux_tc" else groups.amax(-1)
        best = torch.topk(rank, c.topk_group, dim=-1).indices
        keep = torch.zeros_like(rank, dtype=torch.bool).scatter_(1, best, True)
        return groups.masked_fill(~keep[..., None], float("-inf")).view_as(choice)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None) -> None:
        load = self.load if load is None else load
        # sign() is 0 for every expert when nothing was routed, so no host-syncing emptiness check
        self.e_score_correction_bias += self.cfg.router_bias_update_rate * torch.sign(load.mean() - load)
        self.load.zero_()


class MoE(nn.Module):
    """Shared experts (always on) + top-k of fine-grained routed micro-experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx = self.gate(x)
        out = self.routed_grouped(x, weights, idx) if x.is_cuda else self.routed(x, weights, idx)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)

    def dispatch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token-slots sorted by expert: (slot order, token of each sorted slot, tokens per expert)."""
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        return order, order // idx.shape[1], count_per_expert(idx, len(self.experts))

    def routed(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Sort token-slots by expert, run each expert once on its contiguous slice, scatter back."""
        order, token, counts = self.dispatch(idx)
        counts = counts.tolist()
        xs = x[token]
        # Idle experts still run (on zero rows) while training so every parameter gets a gradient,
        # which DDP requires; in inference they are skipped.
        ys = torch.cat([self.experts[e](chunk) if (n or self.training) else chunk
                        for e, (n, chunk) in enumerate(zip(counts, xs.split(counts)))])
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))

    def routed_grouped(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Same result as `routed` with three grouped GEMMs (torch._grouped_mm) over all experts.

        Training on a GPU, the per-expert loop is bound by kernel launches (hundreds per layer).
        Here every expert's token-slots sit in one row-sorted buffer and each projection is one
        grouped GEMM. Shapes are static (no host sync, no capacity padding whose memory would
        follow the routing imbalance): each expert's group starts on a multiple of GROUP_ALIGN rows
        and the expert width is padded with zeros to a multiple of 8, the 16-byte alignment the
        kernels need. The last group runs to the end of the buffer, so no output row is undefined.
        Grouped GEMM on CUDA is bf16 only, so the experts run in bf16 there (as under autocast).
        """
        n_experts, n_slots, dim = len(self.experts), idx.numel(), x.shape[-1]
        order, token, counts = self.dispatch(idx)
        expert = idx.flatten()[order]
        padded = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
        n_rows = n_slots + n_experts * (GROUP_ALIGN - 1)  # upper bound of sum(padded)
        ends = padded.cumsum(0)
        ends[-1] = n_rows
        row = (ends - padded)[expert] + torch.arange(n_slots, device=x.device) - (counts.cumsum(0) - counts)[expert]
        dtype = torch.bfloat16 if x.is_cuda else x.dtype
        buf = x.new_zeros(n_rows, dim, dtype=dtype).index_put((row,), x[token].to(dtype))
        width = self.cfg.moe_intermediate_size
        pad = -width % 8
        w_gate = F.pad(torch.stack([e.gate_proj.weight for e in self.experts]), (0, 0, 0, pad)).to(dtype)
        w_up = F.pad(torch.stack([e.up_proj.weight for e in self.experts]), (0, 0, 0, pad)).to(dtype)
        w_down = F.pad(torch.stack([e.down_proj.weight for e in self.experts]), (0, pad)).to(dtype)
        offs = ends.to(torch.int32)
        h = (F.silu(torch._grouped_mm(buf, w_gate.transpose(1, 2), offs=offs))
             * torch._grouped_mm(buf, w_up.transpose(1, 2), offs=offs))
        ys = torch._grouped_mm(h, w_down.transpose(1, 2), offs=offs)[row]
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = LatentAttention(cfg) if cfg.is_mla else MultiHeadAttention(cfg)
        self.mlp = MoE(cfg) if cfg.layer_is_moe(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, past=None, absorb=False):
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, past, absorb)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), present


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class PerseusLM(nn.Module):
    """Decoder-only language model of the family; `forward` serves training, prefill and decode."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        # Residual-branch outputs scaled down with depth (GPT-2 / nanoGPT).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers))

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding, Router)):
            nn.init.normal_(m.weight, std=self.cfg.initializer_range)

    def rope_dim(self) -> int:
        return self.cfg.qk_rope_head_dim if self.cfg.is_mla else self.cfg.head_dim

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None, use_cache: bool = False,
                absorb: bool | None = None) -> tuple[torch.Tensor, Cache | None]:
        """Logits [B, T, V] for `input_ids` [B, T] placed after the `cache` (if any).

        absorb: MLA form to use; None picks the absorbed form when decoding from a cache.
        Returns the grown cache when `use_cache` or a cache was given.
        """
        past_len = cache[0][0].shape[-2] if cache else 0
        t = input_ids.shape[1]
        if past_len + t > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {past_len + t} tokens exceeds the context of "
                             f"{self.cfg.max_position_embeddings}")
        if absorb is None:
            absorb = cache is not None
        positions = torch.arange(past_len, past_len + t, device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        cos, sin = rope_cos_sin(positions, self.cfg, self.rope_dim())
        x = self.model.embed_tokens(input_ids)
        presents = []
        for i, layer in enumerate(self.model.layers):
            x, present = layer(x, cos, sin, cache[i] if cache else None, absorb)
            presents.append(present)
        logits = self.lm_head(self.model.norm(x))
        return logits, (presents if (use_cache or cache is not None) else None)

    def routers(self) -> list[Router]:
        return [m for m in self.modules() if isinstance(m, Router)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
