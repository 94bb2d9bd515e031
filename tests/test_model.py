"""The model family: sizes, causality, cache equivalence, absorbed MLA, routing, HF parity."""

from __future__ import annotations

import pytest
import torch

from perseus_edge.errors import PerseusError
from perseus_edge.model.config import ARCHS, PRESET_SIZES, ModelConfig, preset
from perseus_edge.model.transformer import MoE, PerseusLM


def tiny_model(arch: str, seed: int = 0, **overrides) -> PerseusLM:
    torch.manual_seed(seed)
    model = PerseusLM(preset("tiny", arch, **overrides)).eval()
    for router in model.routers():
        router.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("name", sorted(PRESET_SIZES))
def test_seed_presets_match_their_names_and_the_analytic_count(name):
    for arch in ("moe-mla-rope", "mha-moe"):
        cfg = preset(name, arch)
        with torch.device("meta"):
            model = PerseusLM(cfg)
        assert model.num_parameters() == cfg.param_counts()["total"]
        assert abs(model.num_parameters() / PRESET_SIZES[name] - 1) < 0.05
    # the dense baselines have the MoE model's active parameters (within 3%: router, attention shapes)
    moe = preset(name).param_counts()["active"]
    for arch in ("mla-dense", "mha"):
        assert abs(preset(name, arch).param_counts()["active"] / moe - 1) < 0.03


def test_kv_cache_sizes():
    mla, mha = preset("54m"), preset("54m", "mha")
    assert mla.kv_lora_rank == mla.hidden_size // 2  # seed rank r = d/2
    assert mla.kv_elems_per_token() == 8 * (256 + 32)
    assert mha.kv_elems_per_token() == 8 * 2 * 512
    assert mla.kv_bytes_per_token(2) == 2 * mla.kv_elems_per_token()


@pytest.mark.parametrize("arch", ARCHS)
def test_causality_future_tokens_do_not_change_past_logits(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 512, (2, 24))
    changed = ids.clone()
    changed[:, 16:] = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :16], b[:, :16], rtol=0, atol=1e-6)
    assert (a[:, 16:] - b[:, 16:]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decode_equals_full_forward(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        full, _ = model(ids)
        logits, cache = model(ids[:, :25], use_cache=True)
        steps = [logits]
        for t in range(25, 40):
            logits, cache = model(ids[:, t:t + 1], cache)
            steps.append(logits)
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    if model.cfg.is_mla:  # only the latent is cached
        c_kv, k_rope = cache[0]
        assert c_kv.shape == (2, 40, model.cfg.kv_lora_rank)
        assert k_rope.shape == (2, 40, model.cfg.qk_rope_head_dim)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_absorbed_mla_equals_naive(q_lora_rank):
    model = tiny_model("moe-mla-rope", q_lora_rank=q_lora_rank)
    ids = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        _, cache = model(ids[:, :20], use_cache=True)
        naive, _ = model(ids[:, 20:], [c for c in cache], absorb=False)
        absorbed, _ = model(ids[:, 20:], [c for c in cache], absorb=True)
        full_naive, _ = model(ids, absorb=False)
        full_absorbed, _ = model(ids, absorb=True)
    assert (naive - absorbed).abs().max() < 1e-5
    assert (full_naive - full_absorbed).abs().max() < 1e-5


def test_router_topk_selection_uses_bias_but_weights_do_not():
    model = tiny_model("moe-mla-rope")
    router = model.routers()[0]
    x = torch.randn(32, model.cfg.hidden_size)
    scores = torch.sigmoid(x @ router.weight.T)
    router.e_score_correction_bias.zero_()
    router.e_score_correction_bias[3] = 10.0  # forces expert 3 into every top-k
    weights, idx = router(x)
    assert idx.shape == (32, model.cfg.num_experts_per_tok)
    assert (idx == 3).any(dim=1).all()
    expected = scores.gather(1, idx)
    expected = expected / expected.sum(-1, keepdim=True)  # norm_topk_prob, scaling factor 1
    torch.testing.assert_close(weights, expected)


def test_router_bias_balancing_moves_load_toward_uniform():
    cfg = preset("tiny", router_bias_update_rate=0.002)
    torch.manual_seed(0)
    moe = MoE(cfg).train()
    with torch.no_grad():
        moe.gate.weight[0] += 0.05  # a skewed router: expert 0 wins far more than its share
    held_out = torch.randn(2048, cfg.hidden_size)

    def imbalance() -> float:
        moe.gate.load.zero_()
        moe.gate(held_out)
        load = moe.gate.load.clone()
        moe.gate.load.zero_()
        return float(load.max() / load.mean())

    before = imbalance()
    for _ in range(150):  # fresh tokens every step, as in training
        moe.gate(torch.randn(256, cfg.hidden_size))
        moe.gate.update_bias()
    after = imbalance()
    assert before > 1.5
    assert after < 1.25
    assert moe.gate.e_score_correction_bias[0] < 0  # the overloaded expert was pushed down
    assert all(p.grad is None for p in moe.gate.parameters())  # balancing is not a loss term


@pytest.mark.parametrize("n_tokens", [1, 64])
def test_grouped_moe_path_equals_per_expert_loop(n_tokens):
    """The GPU training path (grouped GEMM, aligned + padded groups) against the loop, empty experts included."""
    cfg = preset("tiny", moe_intermediate_size=12)  # not a multiple of 8: exercises the width padding
    torch.manual_seed(1)
    moe = MoE(cfg).train()
    x = torch.randn(n_tokens, cfg.hidden_size)
    weights, idx = moe.gate(x)
    weights = weights.detach()
    loop, batched = moe.routed(x, weights, idx), moe.routed_grouped(x, weights, idx)
    torch.testing.assert_close(loop, batched)
    grads = []
    for out in (loop, batched):
        moe.zero_grad()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([p.grad.clone() for p in moe.experts.parameters()])
    for g_loop, g_batched in zip(*grads):
        torch.testing.assert_close(g_loop, g_batched)


@pytest.mark.parametrize("arch", ["moe-mla-rope", "mla-dense"])
@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_hf_deepseek_v3_logits_match(arch, q_lora_rank, make_checkpoint):
    transformers = pytest.importorskip("transformers")
    from perseus_edge.checkpoint import load_checkpoint

    folder = make_checkpoint(arch, q_lora_rank=q_lora_rank)
    ours, _ = load_checkpoint(folder)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        diff = (ours(ids)[0] - hf(ids).logits).abs().max()
    assert diff < 1e-4


@pytest.mark.parametrize("change, message", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(kv_lora_rank=65), "kv_lora_rank 65"),
    (dict(arch="transformer-xl"), "unknown architecture"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(n_group=3), "n_group 3 must divide n_routed_experts"),
    (dict(scoring_func="softmax"), 'topk_method .noaux_tc. does not go with scoring_func .softmax.'),
])
def test_impossible_configs_are_refused(change, message):
    with pytest.raises(PerseusError, match=message):
        preset("tiny", **change)


def test_config_round_trip_keeps_unknown_keys():
    cfg = preset("tiny")
    data = {**cfg.to_dict(), "model_type": "deepseek_v3"}
    again = ModelConfig.from_dict(data)
    assert again == ModelConfig.from_dict(again.to_dict())
    assert again.to_dict()["model_type"] == "deepseek_v3"
