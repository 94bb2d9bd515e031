"""perseus export --format gguf: the file read back with gguf-py holds the checkpoint's tensors
under llama.cpp's deepseek2 names and the metadata its loader needs; llama.cpp's logits match
ours when llama-cpp-python is installed (an optional extra, not built in CI)."""

from __future__ import annotations

import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")


def expected_tensors(ckpt) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as llama.cpp's converter lays them out, spelled out here."""
    from perseus_edge.checkpoint import load_state
    from perseus_edge.model.config import ModelConfig

    cfg = ModelConfig.load(ckpt)
    state = {k: v.float().numpy() for k, v in load_state(ckpt).items()}
    plain = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
                 "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.o_proj": "attn_output",
                 "mlp.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
                 "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp"}
    out = {f"{v}.weight": state[f"{k}.weight"] for k, v in plain.items()}
    h, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({f"blk.{i}.{g}.weight": state[f"{p}{hf}.weight"] for hf, g in per_layer.items()})
        out[f"blk.{i}.exp_probs_b.bias"] = state[f"{p}mlp.gate.e_score_correction_bias"]
        kv_b = state[f"{p}self_attn.kv_b_proj.weight"].reshape(h, nope + v, cfg.kv_lora_rank)
        out[f"blk.{i}.attn_k_b.weight"] = kv_b[:, :nope].transpose(0, 2, 1)  # [h, kv_lora, nope]
        out[f"blk.{i}.attn_v_b.weight"] = kv_b[:, nope:]
        for proj in ("gate", "up", "down"):
            out[f"blk.{i}.ffn_{proj}_exps.weight"] = np.stack(
                [state[f"{p}mlp.experts.{e}.{proj}_proj.weight"] for e in range(cfg.n_routed_experts)])
    assert len(out) == len(state) + cfg.num_hidden_layers * (1 - 3 * cfg.n_routed_experts + 3)
    return out


def export_app():
    import typer

    from perseus_edge.cli.export import register

    app = typer.Typer()  # only the export commands, the global CLI app untouched
    register(app)
    return app


def field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint()


@pytest.fixture(scope="module")
def written(ckpt, tmp_path_factory):
    from typer.testing import CliRunner

    app = export_app()
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for outtype in ("f32", "q8_0"):
        path = root / f"tiny-{outtype}.gguf"
        res = CliRunner().invoke(app, ["export", str(ckpt), "--format", "gguf", "--outtype", outtype, "-o", str(path)])
        assert res.exit_code == 0, res.output
        assert f"(gguf {outtype}," in res.output and not list(root.glob(".*tmp*"))
        out[outtype] = path
    return out


def test_f32_tensors_equal_the_checkpoint(ckpt, written):
    reader = gguf.GGUFReader(written["f32"])
    want = expected_tensors(ckpt)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    for name, t in got.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_array_equal(np.asarray(t.data).reshape(want[name].shape), want[name], err_msg=name)


def test_q8_0_types_and_values(ckpt, written):
    reader = gguf.GGUFReader(written["q8_0"])
    want = expected_tensors(ckpt)
    Q = gguf.GGMLQuantizationType
    for t in reader.tensors:
        ref = want[t.name]
        if ref.ndim == 1 or t.name.endswith("_norm.weight") or "ffn_gate_inp" in t.name:
            assert t.tensor_type == Q.F32, t.name  # as llama.cpp's converter keeps them
        else:  # rows of 16 (tiny expert width, nope head) are not 32-blocks: F16, as llama.cpp does
            assert t.tensor_type == (Q.Q8_0 if ref.shape[-1] % 32 == 0 else Q.F16), t.name
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(ref.shape)
        tol = np.abs(ref).max(axis=-1, keepdims=True) / 127 * 0.51 + 1e-3 * np.abs(ref)  # half a q8 step
        assert np.all(np.abs(values - ref) <= tol + 1e-7), t.name


def test_metadata(ckpt, written):
    from perseus_edge.model.config import ModelConfig

    cfg = ModelConfig.load(ckpt)
    r = gguf.GGUFReader(written["q8_0"])
    assert field(r, "general.architecture") == "deepseek2"
    assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    want = {"block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
            "embedding_length": cfg.hidden_size, "attention.head_count": cfg.num_attention_heads,
            "attention.head_count_kv": 1, "attention.q_lora_rank": 0, "attention.kv_lora_rank": cfg.kv_lora_rank,
            "attention.key_length": cfg.kv_lora_rank + cfg.qk_rope_head_dim, "attention.value_length": cfg.kv_lora_rank,
            "attention.key_length_mla": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
            "attention.value_length_mla": cfg.v_head_dim, "rope.dimension_count": cfg.qk_rope_head_dim,
            "expert_count": cfg.n_routed_experts, "expert_used_count": cfg.num_experts_per_tok,
            "expert_shared_count": cfg.n_shared_experts, "expert_feed_forward_length": cfg.moe_intermediate_size,
            "leading_dense_block_count": 0, "expert_gating_func": int(gguf.ExpertGatingFuncType.SIGMOID),
            "expert_weights_norm": True}
    for key, value in want.items():
        assert field(r, f"deepseek2.{key}") == value, key
    assert field(r, "deepseek2.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field(r, "deepseek2.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and tokens[0] == "<|endoftext|>"
    assert field(r, "tokenizer.ggml.token_type")[:2] == [gguf.TokenType.CONTROL] * 2
    assert re.fullmatch(r"\S+ \S+", field(r, "tokenizer.ggml.merges")[0])
    assert field(r, "tokenizer.ggml.add_bos_token") is False


@pytest.mark.parametrize("args, message", [
    (["--outtype", "q2_k"], "unknown --outtype 'q2_k' (choose from f32, f16, q8_0, q4_0)"),
    (["--format", "safetensors"], "unknown --format 'safetensors' (choose from onnx, gguf)"),
])
def test_gguf_errors(ckpt, tmp_path, args, message):
    from typer.testing import CliRunner

    res = CliRunner().invoke(export_app(), ["export", str(ckpt), "--format", "gguf", "-o", str(tmp_path / "m.gguf")]
                             + args)
    assert res.exit_code == 1 and message in str(res.exception), res.output


def test_gguf_refusals(make_checkpoint, ckpt, tmp_path):
    from perseus_edge.errors import PerseusError
    from perseus_edge.export.gguf import export_gguf

    with pytest.raises(PerseusError, match=r"^GGUF export needs an MLA architecture \(llama.cpp's deepseek2\); "
                                           r"'mha' is not one$"):
        export_gguf(make_checkpoint("mha"), tmp_path / "m.gguf")
    from perseus_edge.export.gguf import check_config
    from perseus_edge.model.config import preset

    with pytest.raises(PerseusError, match=r"^GGUF export does not support rope_scaling yet"):
        check_config(preset("tiny", rope_scaling={"rope_type": "linear", "factor": 2.0}))
    with pytest.raises(PerseusError, match=r"^GGUF export does not support group-limited routing yet \(n_group 2\)"):
        check_config(preset("tiny", n_group=2, topk_group=1, scoring_func="softmax", topk_method="group_limited_greedy"))
    with pytest.raises(PerseusError, match=r"^GGUF export needs rope_interleave=true"):
        check_config(preset("tiny", rope_interleave=False))
    with pytest.raises(PerseusError, match=r"a GGUF output is a file named \*.gguf"):
        export_gguf(ckpt, tmp_path / "m.bin")
    (tmp_path / "m.gguf").write_text("x")
    with pytest.raises(PerseusError, match=r"exists \(use --force to replace it\)"):
        export_gguf(ckpt, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_text() == "x"


@pytest.mark.parametrize("routing", [{}, dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False)],
                         ids=["sigmoid", "softmax"])
def test_llama_cpp_logits_match(make_checkpoint, routing):
    """llama.cpp runs the f32 file and gives our logits, with V3's and V2's routing (skipped
    without llama-cpp-python)."""
    pytest.importorskip("llama_cpp")
    from studies.llama_cpp.check_gguf import check

    result = check(make_checkpoint(**routing), "f32", tokens=64)
    assert result["max_rel_diff"] <= 1e-3 and result["argmax_agreement"] == 1.0, result


def test_bench_times_gguf_beside_a_folder(ckpt, written, tmp_path):
    """perseus bench runs both engines in one call; every depth holds its prefix in llama.cpp's
    cache after shallower tests removed it (skipped without llama-cpp-python)."""
    pytest.importorskip("llama_cpp")
    from perseus_edge.bench.rounds import make_tests, run_bench
    from perseus_edge.build import export_checkpoint
    from perseus_edge.model.config import ModelConfig

    folder = export_checkpoint(ckpt, tmp_path / "onnx", target="ort-cpu")
    records = run_bench([str(folder), str(written["q8_0"])], make_tests([16], [4], [0, 40]), [1], reps=2)
    assert [(r["backend"], r["test"]) for r in records] == [
        (b, t) for b in ("onnxruntime", "llama.cpp") for t in ("pp16", "pp16 @ d40", "tg4", "tg4 @ d40")]
    assert all(len(r["samples_ts"]) == 2 and r["avg_ts"] > 0 and r["peak_rss_bytes"] > 0 for r in records)
    # same model, counted by each engine: llama.cpp also counts the router bias (a buffer in ours)
    cfg = ModelConfig.load(ckpt)
    assert records[4]["params"] - records[0]["params"] == cfg.num_hidden_layers * cfg.n_routed_experts
