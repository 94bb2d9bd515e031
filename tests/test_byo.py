"""Bring your own checkpoint: transformers DeepSeek-V2/V3 folders export exactly, or are refused.

Each variant is built by transformers itself (tiny sizes, random seeded weights, router biases
perturbed so selection depends on them), written with `save_pretrained` beside the shipped
tokenizer.json (vocab 8192), then loaded and exported with perseus' own API. transformers'
logits are the reference:
- the PyTorch model (`load_checkpoint`): prefill, and cached decode in the absorbed form;
- the exported graph run by the runtime (`Model`): prefill at position 0, then one token at a
  time from the cache. Both within 1e-4 (fp32 end to end; measured ~1e-6).
- one int8 quantization per variant, within test_quantize's int8 bound (relative logits error
  against our fp32 export).
Refusals are checked by their exact one-line messages.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnx")

from perseus_edge.checkpoint import load_checkpoint  # noqa: E402
from perseus_edge.errors import PerseusError  # noqa: E402
from perseus_edge.build import export_checkpoint  # noqa: E402
from perseus_edge.runtime.model import Model  # noqa: E402
from perseus_edge.tokenizer import DEFAULT_TOKENIZER  # noqa: E402

VOCAB, PROMPT, STEPS, TOL = 8192, 12, 6, 1e-4
INT8_REL_TOL = 0.05  # tests/test_quantize.py's int8 bound
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, q_lora_rank=None,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
            num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
            max_position_embeddings=64, initializer_range=0.1)
V3 = dict(TINY, n_group=1, topk_group=1, routed_scaling_factor=1.0)
V2 = dict(TINY)
YARN = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 8, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}

VARIANTS = {
    # our own layout
    "v3": ("deepseek_v3", V3),
    # q LoRA, a dense first layer, routed scaling, unnormalised weights, attention biases
    "v3-qlora-dense-bias": ("deepseek_v3", dict(V3, q_lora_rank=12, first_k_dense_replace=1,
                                               routed_scaling_factor=2.5, norm_topk_prob=False,
                                               attention_bias=True)),
    # DeepSeek-V3's own routing and RoPE: 4 groups of 2, the best 2 groups; yarn with mscale terms
    "v3-groups-yarn": ("deepseek_v3", dict(V3, n_group=4, topk_group=2, num_experts_per_tok=3,
                                          rope_parameters=YARN)),
    # Llama-style halves, tied embeddings, no shared expert, linear scaling
    "v3-halves-tied-noshared": ("deepseek_v3", dict(V3, rope_interleave=False, tie_word_embeddings=True,
                                                   n_shared_experts=0,
                                                   rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                    "rope_theta": 10000.0})),
    # DeepSeek-V2: softmax greedy; llama3 scaling
    "v2-greedy": ("deepseek_v2", dict(V2, rope_parameters={
        "rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 16, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "rope_theta": 10000.0})),
    # DeepSeek-V2: group-limited greedy, q LoRA, routed scaling; dynamic scaling (= plain in context)
    "v2-groups": ("deepseek_v2", dict(V2, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                      q_lora_rank=12, routed_scaling_factor=2.0, first_k_dense_replace=1,
                                      num_hidden_layers=3,
                                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
}


def build_hf(model_type: str, config: dict, seed: int = 0):
    torch.manual_seed(seed)
    if model_type == "deepseek_v3":
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**config))
    else:
        model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**config))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.3)
    return model.eval()


def save_hf(model, folder: Path, tokenizer: bool = True, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    if tokenizer:
        shutil.copyfile(DEFAULT_TOKENIZER, folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """name -> (transformers model, its folder, our fp32 export), built once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model_type, config = VARIANTS[name]
            hf = build_hf(model_type, config)
            root = tmp_path_factory.mktemp(name)
            folder = save_hf(hf, root / "hf")
            cache[name] = hf, folder, export_checkpoint(folder, root / "onnx")
        return cache[name]

    return get


def tokens(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (1, n))


def hf_logits(hf, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.from_numpy(ids)).logits.numpy()


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_transformers(variant, name):
    hf, folder, onnx_dir = variant(name)
    ids = tokens(PROMPT + STEPS)
    ref = hf_logits(hf, ids)

    # the PyTorch model: prefill, then cached (absorbed) decode
    ours, _ = load_checkpoint(folder)
    with torch.no_grad():
        logits, cache = ours(torch.from_numpy(ids[:, :PROMPT]), use_cache=True)
        got = [logits.numpy()]
        for i in range(PROMPT, PROMPT + STEPS):
            logits, cache = ours(torch.from_numpy(ids[:, i:i + 1]), cache)
            got.append(logits.numpy())
    assert max_diff(np.concatenate(got, 1), ref) < TOL

    # the exported graph in the runtime: prefill, then one token at a time from the cache
    model = Model(onnx_dir, threads=1)
    got = [model.forward(ids[:, :PROMPT], 0).copy()]
    got += [model.forward(ids[:, i:i + 1], i).copy() for i in range(PROMPT, PROMPT + STEPS)]
    assert max_diff(np.concatenate(got, 1), ref) < TOL
    assert np.abs(ref).max() > 0.1  # the logits are not near-constant


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_int8_within_quantization_goal(variant, name, tmp_path):
    """int8 against our fp32 export: relative error of all logits of a prefill + cached decode.
    (Over the whole run: these random routers are nearly flat, so int8 noise flips an expert at
    a position now and then, as it would not in a trained model.)"""
    from perseus_edge.build import quantize_model

    _, _, onnx_dir = variant(name)
    ids = tokens(PROMPT + STEPS)

    def run(folder: Path) -> np.ndarray:
        model = Model(folder, threads=1)
        out = [model.forward(ids[:, :PROMPT], 0).copy()]
        out += [model.forward(ids[:, i:i + 1], i).copy() for i in range(PROMPT, PROMPT + STEPS)]
        return np.concatenate(out, 1)

    ref, got = run(onnx_dir), run(quantize_model(onnx_dir, tmp_path / "int8", "int8"))
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < err <= INT8_REL_TOL, f"int8 relative logits error {err:.3g}"


def test_export_writes_a_manifest_and_our_config(variant):
    _, folder, onnx_dir = variant("v3-groups-yarn")
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert manifest["kind"] == "onnx" and "model.onnx" in manifest["files"]
    assert manifest["export"]["arch"] == "moe-mla-rope"
    assert len(manifest["export"]["source_checkpoint"]["sha256"]) == 64
    cfg = json.loads((onnx_dir / "config.json").read_text())
    assert (cfg["n_group"], cfg["topk_group"], cfg["rope_scaling"]["rope_type"]) == (4, 2, "yarn")
    assert not (folder / "manifest.json").exists()  # the source folder is left as it was


@pytest.mark.parametrize("name", ["v3-qlora-dense-bias", "v3-groups-yarn", "v2-greedy"])
def test_ort_cpu_target_matches_transformers(variant, name, tmp_path):
    """--target ort-cpu: onnxruntime's MoE kernel for sigmoid ungrouped routing; the softmax and
    group-limited variants keep the portable perseus.MoE (ORT's kernel cannot route by groups)."""
    hf, folder, _ = variant(name)
    out = export_checkpoint(folder, tmp_path / "ort", target="ort-cpu")
    lowered = json.loads((out / "manifest.json").read_text())["lowering"]["passes"]
    assert lowered == (["moe_to_ort"] if name == "v3-qlora-dense-bias" else []) + ["skip_norm_to_ort", "head_to_linear"]
    ids = tokens(PROMPT + STEPS)
    model = Model(out, threads=1)
    got = [model.forward(ids[:, :PROMPT], 0).copy()]
    got += [model.forward(ids[:, i:i + 1], i).copy() for i in range(PROMPT, PROMPT + STEPS)]
    assert max_diff(np.concatenate(got, 1), hf_logits(hf, ids)) < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sharded_folder_with_index(tmp_path, dtype):
    """bf16/fp16 weights in several shards + model.safetensors.index.json: read exactly (upcast)."""
    hf = build_hf("deepseek_v3", V3)
    folder = save_hf(hf.to(dtype), tmp_path / "hf", max_shard_size="200KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    ref = hf_logits(hf.float(), tokens(PROMPT))
    ours, _ = load_checkpoint(folder)
    with torch.no_grad():
        assert max_diff(ours(torch.from_numpy(tokens(PROMPT)))[0].numpy(), ref) < TOL


# ----------------------------------------------------------------------------- refusals
def write_config(tmp_path: Path, kind: str, changes: dict) -> Path:
    folder = tmp_path / "hf"
    save_hf(build_hf(kind, V3 if kind == "deepseek_v3" else V2), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("model_type,changes,message", [
    ("deepseek_v3", {"moe_layer_freq": 2}, 'unsupported model config: moe_layer_freq = 2 (only 1 is implemented)'),
    ("deepseek_v3", {"hidden_act": "gelu"}, 'unsupported model config: hidden_act = "gelu" (only "silu" is implemented)'),
    ("deepseek_v3", {"scoring_func": "softmax"},
     "unsupported model config: scoring_func = \"softmax\" (transformers' DeepseekV3 always scores with a sigmoid)"),
    ("deepseek_v3", {"topk_method": "greedy"},
     "unsupported model config: topk_method = \"greedy\" (transformers' DeepseekV3 always routes with noaux_tc)"),
    ("deepseek_v2", {"norm_topk_prob": True},
     "unsupported model config: norm_topk_prob = true (transformers' DeepseekV2 ignores it while DeepSeek's "
     "code normalises: ambiguous)"),
    ("deepseek_v2", {"scoring_func": "sigmoid"},
     "unsupported model config: scoring_func = \"sigmoid\" (transformers' DeepseekV2 always scores with a softmax)"),
    ("deepseek_v3", {"quantization_config": {"quant_method": "fp8"}},
     'unsupported model config: quantization_config = {"quant_method": "fp8"} (only null is implemented)'),
    ("deepseek_v3", {"sliding_window": 16},
     "unknown model config key 'sliding_window' = 16: refusing it rather than ignoring something that may "
     "change the forward pass"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0],
                                         "long_factor": [1.0], "original_max_position_embeddings": 16}},
     'invalid model config: rope_scaling rope_type = "longrope" is not supported '
     "(supported: default, linear, dynamic, yarn, llama3)"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                                         "partial_rotary_factor": 0.5}},
     "invalid model config: rope_scaling key partial_rotary_factor = 0.5 is not supported for rope_type yarn"),
    ("deepseek_v3", {"n_group": 8, "topk_group": 2},
     "invalid model config: n_group 8 leaves 1 expert per group; noaux_tc ranks groups by their top-2 experts"),
    ("deepseek_v3", {"model_type": "llama"},
     'config.json has model_type "llama": perseus reads transformers folders of model_type deepseek_v3, '
     "deepseek_v2"),
])
def test_refused_in_one_line(tmp_path, model_type, changes, message):
    folder = write_config(tmp_path, model_type, changes)
    with pytest.raises(PerseusError) as e:
        export_checkpoint(folder, tmp_path / "out")
    assert str(e.value) == message
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_names_the_flag(tmp_path):
    folder = save_hf(build_hf("deepseek_v3", V3), tmp_path / "hf", tokenizer=False)
    with pytest.raises(PerseusError, match=r"has no tokenizer.json: give one with --tokenizer FILE$"):
        export_checkpoint(folder, tmp_path / "out")
    out = export_checkpoint(folder, tmp_path / "out", tokenizer=DEFAULT_TOKENIZER)
    assert (out / "tokenizer.json").read_bytes() == Path(DEFAULT_TOKENIZER).read_bytes()


# ----------------------------------------------------------------------------- the CLI
def perseus(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "perseus_edge.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_eval_text_on_the_folder_and_its_export(variant, tmp_path):
    """`perseus eval --text` scores the same windows with PyTorch (the transformers folder, its
    tokenizer given by flag) and with onnxruntime (the export): the same loss."""
    _, folder, onnx_dir = variant("v2-groups")
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time, in a house on a hill, there lived an old captain. " * 12, encoding="utf-8")
    tok = tmp_path / "tok.json"
    shutil.copyfile(folder / "tokenizer.json", tok)
    (folder / "tokenizer.json").rename(folder / "tokenizer.json.away")
    try:
        missing = perseus("generate", folder, "-p", "Once", "-n", "2")
        ours = perseus("eval", folder, "--text", text, "--tokenizer", tok, "--seq-len", 32, "--json")
    finally:
        (folder / "tokenizer.json.away").rename(folder / "tokenizer.json")
    exported = perseus("eval", onnx_dir, "--text", text, "--seq-len", 32, "--json")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.strip() == f"error: {folder} has no tokenizer.json: give one with --tokenizer FILE"
    a, b = json.loads(ours.stdout), json.loads(exported.stdout)
    assert a["split"] == b["split"] == str(text) and a["tokens"] == b["tokens"] > 0
    assert abs(a["loss"] - b["loss"]) < 1e-4 and a["loss"] > 0


def test_own_tokenizer_without_our_end_token_uses_the_config_eos(variant, tmp_path):
    """A user's tokenizer spells end-of-text its own way: the runtime stops on the config's id."""
    _, folder, _ = variant("v3")
    text = Path(DEFAULT_TOKENIZER).read_text(encoding="utf-8").replace("<|endoftext|>", "</s>")
    tok = tmp_path / "tokenizer.json"
    tok.write_text(text, encoding="utf-8")
    out = export_checkpoint(folder, tmp_path / "onnx", tokenizer=tok)
    eos = json.loads((folder / "config.json").read_text())["eos_token_id"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos == 1
