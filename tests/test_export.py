"""perseus export: ONNX graph parity with PyTorch, graph structure, folder contents, bad input.

Parity runs the way the runtime does: a prefill, then greedy decode steps through IO binding
with each present.* bound to its past.* buffer (in-place cache), against PyTorch's own cached
decode. Tiny random checkpoints come from conftest's `make_checkpoint`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from perseus_edge import modelfile as mf
from perseus_edge.errors import PerseusError
from perseus_edge.manifest import verify_folder, write_manifest
from perseus_edge.model.config import ARCHS

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from perseus_edge.build import export_checkpoint  # noqa: E402
from graph_session import CachedSession  # noqa: E402  (tests/graph_session.py)

PROMPT, STEPS, TOL = 32, 64, 1e-4
MOE_ARCHS = [a for a in ARCHS if "moe" in a]
# every optional branch of the exporter at once: low-rank query, tied embeddings, a dense first
# layer, unnormalised routing weights with a scaling factor
VARIANT = dict(q_lora_rank=24, tie_word_embeddings=True, first_k_dense_replace=1,
               norm_topk_prob=False, routed_scaling_factor=2.5)


@pytest.fixture(scope="module")
def exported(make_checkpoint, tmp_path_factory):
    """exported(arch, target, **overrides) -> model folder, cached for the module."""
    cache = {}

    def get(arch: str, target: str = "portable", **overrides) -> Path:
        key = (arch, target, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"onnx-{arch}-{target}") / "model"
            cache[key] = export_checkpoint(make_checkpoint(arch, **overrides), out, target=target)
        return cache[key]

    return get


def torch_greedy(ckpt: Path, prompt: np.ndarray, steps: int):
    """PyTorch reference: prefill, then cached (absorbed-MLA) greedy decode."""
    from perseus_edge.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        logits, cache = model(torch.from_numpy(prompt), use_cache=True)
        outs, tokens = [logits.numpy()], []
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt.numpy())
            logits, cache = model(nxt, cache=cache)
            outs.append(logits.numpy())
    return outs, np.concatenate(tokens, axis=1)


def assert_parity(folder: Path, ckpt: Path, batch: int = 1, steps: int = STEPS) -> None:
    vocab = json.loads((folder / mf.CONFIG).read_text())["vocab_size"]
    prompt = np.random.default_rng(0).integers(2, vocab, (batch, PROMPT))
    ref_logits, ref_tokens = torch_greedy(ckpt, prompt, steps)
    logits, tokens = CachedSession(folder / mf.MODEL_ONNX, batch=batch).greedy(prompt, steps)
    np.testing.assert_array_equal(tokens, ref_tokens)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(logits, ref_logits))
    assert worst <= TOL, f"max |onnx - torch| = {worst:.2e} over prefill + {steps} decode steps"


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("arch", ARCHS)
def test_portable_matches_pytorch(arch, exported, make_checkpoint):
    assert_parity(exported(arch), make_checkpoint(arch))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_lowered_matches_pytorch(arch, exported, make_checkpoint):
    folder = exported(arch, "ort-cpu")
    meta = verify_folder(folder)[mf.LOWER_META]
    assert meta["target"] == "ort-cpu" and meta["passes"] == ["moe_to_ort", "skip_norm_to_ort", "head_to_linear"]
    model = onnx.load(str(folder / mf.MODEL_ONNX))
    nodes = model.graph.node
    ops = {(n.domain, n.op_type) for n in nodes}
    assert (mf.PERSEUS_DOMAIN, mf.OP_SPARSE_MOE) in ops and (mf.PERSEUS_DOMAIN, mf.OP_MOE) not in ops
    head = next(n for n in nodes if mf.LOGITS in n.output)  # the float head: the native Linear
    assert (head.domain, head.op_type) == (mf.PERSEUS_DOMAIN, mf.OP_LINEAR)
    body = {(n.domain, n.op_type) for f in model.functions if f.name == mf.OP_SPARSE_MOE for n in f.node}
    assert (mf.MS_DOMAIN, "MoE") in body  # the body stock onnxruntime runs
    # every residual add feeding a norm is fused into it: all norms but the first
    layers = json.loads((folder / mf.CONFIG).read_text())["num_hidden_layers"]
    fused = [n for n in nodes if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert len(fused) == 2 * layers and sum(n.op_type == "RMSNormalization" for n in nodes) == 1
    assert_parity(folder, make_checkpoint(arch))


@pytest.mark.parametrize("target", ["portable", "ort-cpu"])
def test_variant_config_matches_pytorch(target, exported, make_checkpoint):
    assert_parity(exported("moe-mla-rope", target, **VARIANT), make_checkpoint("moe-mla-rope", **VARIANT),
                  steps=16)


def test_batch_of_two_matches_pytorch(exported, make_checkpoint):
    assert_parity(exported("moe-mla-rope"), make_checkpoint("moe-mla-rope"), batch=2, steps=8)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_equals_one_prefill(arch, exported):
    """Several tokens after a cached prefix (chunked prompts, speculative steps): causal mask
    and RoPE positions offset by `position`."""
    path = exported(arch) / mf.MODEL_ONNX
    prompt = np.random.default_rng(2).integers(2, 500, (1, 24))
    whole = CachedSession(path)(prompt, 0)
    chunked = CachedSession(path)
    parts = [chunked(prompt[:, :10], 0), chunked(prompt[:, 10:11], 10), chunked(prompt[:, 11:], 11)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, atol=1e-5)


def test_dense_archs_only_fuse_norms(exported, make_checkpoint):
    folder = exported("mha", "ort-cpu")
    meta = verify_folder(folder)[mf.LOWER_META]
    assert meta["target"] == "ort-cpu" and meta["passes"] == ["skip_norm_to_ort", "head_to_linear"]
    assert_parity(folder, make_checkpoint("mha"), steps=8)


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_rows_equal_pytorch_cache(arch, exported, make_checkpoint):
    """The RoPE lane permutation keeps even the cached tensors identical to PyTorch's."""
    from perseus_edge.checkpoint import load_checkpoint

    model, _ = load_checkpoint(make_checkpoint(arch))
    prompt = np.random.default_rng(1).integers(2, model.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        _, cache = model(torch.from_numpy(prompt), use_cache=True)
    session = CachedSession(exported(arch) / mf.MODEL_ONNX)
    session(prompt, 0)
    for layer, pair in enumerate(cache):
        for slot, ref in zip(mf.cache_slots(model.cfg.is_mla), pair):
            if ref.dim() == 4:  # MHA: [B, H, S, D] -> the graph's [B, S, H*D]
                ref = ref.transpose(1, 2).flatten(2)
            got = session.caches[mf.past_name(layer, slot)][:, :12]
            np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)


def test_cache_is_written_in_place_and_only_new_rows(exported):
    """present.* is the past.* buffer itself; a step writes exactly its own rows."""
    session = CachedSession(exported("moe-mla-rope") / mf.MODEL_ONNX)
    buffers = list(session.caches.values())
    session(np.array([[5, 6, 7]]), 0)
    before = [b.copy() for b in buffers]
    assert all(np.abs(b[0, :3]).sum() > 0 and not b[0, 3:].any() for b in before)
    session(np.array([[8]]), 3)
    for old, new in zip(before, session.caches.values()):
        np.testing.assert_array_equal(new[0, :3], old[0, :3])
        assert np.abs(new[0, 3]).sum() > 0 and not new[0, 4:].any()


# ----------------------------------------------------------------------------- graph and folder
@pytest.mark.parametrize("arch", ARCHS)
def test_graph_contract_and_custom_ops(arch, exported):
    from perseus_edge.model.config import ModelConfig

    folder = exported(arch)
    path = folder / mf.MODEL_ONNX
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    cfg = ModelConfig.load(folder)
    slots = mf.cache_slots(cfg.is_mla)
    layers = range(cfg.num_hidden_layers)
    assert [i.name for i in model.graph.input] == [mf.INPUT_IDS, mf.POSITION, mf.LOGITS_ROWS] + [
        mf.past_name(i, s) for i in layers for s in slots]
    assert [o.name for o in model.graph.output] == [mf.LOGITS] + [
        mf.present_name(i, s) for i in layers for s in slots]
    context = json.loads((folder / mf.GENERATION_CONFIG).read_text())["max_context"]
    assert context == cfg.max_position_embeddings
    for value, width in zip(model.graph.input[3:5], mf.cache_widths(cfg)):
        assert [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim] == ["batch", context, width]

    attention = mf.OP_LATENT_ATTENTION if cfg.is_mla else mf.OP_ATTENTION
    expected = {attention} | ({mf.OP_MOE} if cfg.is_moe else set())
    custom = [n.op_type for n in model.graph.node if n.domain == mf.PERSEUS_DOMAIN]
    assert sorted(set(custom)) == sorted(expected)
    assert custom.count(attention) == cfg.num_hidden_layers
    functions = {f.name: f for f in model.functions if f.domain == mf.PERSEUS_DOMAIN}
    assert set(functions) == expected
    assert any(n.op_type == "TensorScatter" for n in functions[attention].node)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 24), (mf.PERSEUS_DOMAIN, 1)}
    assert verify_folder(folder)[mf.EXPORT_META]["perseus_ops"] == sorted(expected)


def test_folder_files_and_generation_config(exported):
    from perseus_edge.tokenizer import EOS, load_tokenizer

    folder = exported("moe-mla-rope")
    manifest = verify_folder(folder, mf.KIND_ONNX)
    assert set(manifest["files"]) == {mf.MODEL_ONNX, mf.CONFIG, mf.TOKENIZER, mf.GENERATION_CONFIG}
    meta = manifest[mf.EXPORT_META]
    assert meta["opset"] == 24 and len(meta["source_checkpoint"]["sha256"]) == 64
    assert manifest[mf.LOWER_META]["target"] == "portable"
    gen = json.loads((folder / mf.GENERATION_CONFIG).read_text())
    assert gen["eos_token_id"] == load_tokenizer(folder / mf.TOKENIZER).token_to_id(EOS)
    assert gen["max_context"] == 256 and 0 < gen["temperature"]
    assert not list(folder.parent.glob(".*tmp-*")), "temp folder left behind"


def test_large_weights_go_to_page_aligned_external_data(exported, make_checkpoint, tmp_path, monkeypatch):
    from perseus_edge.modelfile import writer as save

    monkeypatch.setattr(save, "EXTERNAL_BYTES", 0)  # the tiny model is under the real 2 MB limit
    folder = export_checkpoint(make_checkpoint("mha"), tmp_path / "m", max_context=64)
    assert (folder / mf.MODEL_DATA).is_file() and mf.MODEL_DATA in verify_folder(folder)["files"]
    model = onnx.load(str(folder / mf.MODEL_ONNX), load_external_data=False)
    offsets = [int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % save.ALIGN == 0 for o in offsets)
    assert (folder / mf.MODEL_ONNX).stat().st_size < 64 * 1024
    session = CachedSession(folder / mf.MODEL_ONNX)
    assert session.max_context == 64
    assert np.isfinite(session(np.array([[3, 4]]), 0)).all()


def test_inspect_reports_ops_by_name(exported):
    from perseus_edge.export.inspect import inspect_folder

    report, problem = inspect_folder(exported("moe-mla-rope"))
    assert problem is None
    lines = report.splitlines()
    main = lines[lines.index("ops (main graph)"):]
    assert any(ln.split() == ["perseus.LatentAttention", "2"] for ln in main)
    assert any(ln.split() == ["perseus.MoE", "2"] for ln in main)
    assert any(ln.startswith("ops inside function perseus.LatentAttention(") for ln in lines)
    assert any(ln.split()[:1] == ["ai.onnx.TensorScatter"] for ln in main)  # inside the function


# ----------------------------------------------------------------------------- bad input
def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_checkpoint_is_refused(make_checkpoint, tmp_path):
    ckpt = _copy(make_checkpoint("mha"), tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PerseusError, match="sha256 check"):
        export_checkpoint(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_unknown_arch_is_refused(make_checkpoint, tmp_path):
    ckpt = _copy(make_checkpoint("mha"), tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "arch": "rwkv"}))
    write_manifest(ckpt, "checkpoint")  # a consistent manifest: the config itself is the problem
    with pytest.raises(PerseusError, match="unknown architecture 'rwkv'"):
        export_checkpoint(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_folder_of_another_model_needs_force(make_checkpoint, exported, tmp_path):
    out = _copy(exported("mha"), tmp_path / "model")
    before = (out / mf.MANIFEST).read_bytes()
    with pytest.raises(PerseusError, match="already holds a model exported from .*--force"):
        export_checkpoint(make_checkpoint("mla-dense"), out)
    assert (out / mf.MANIFEST).read_bytes() == before  # untouched
    export_checkpoint(make_checkpoint("mha"), out, max_context=32)  # same checkpoint: re-export
    export_checkpoint(make_checkpoint("mla-dense"), out, force=True)
    assert verify_folder(out)[mf.EXPORT_META]["arch"] == "mla-dense"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(PerseusError, match="not empty"):
        export_checkpoint(make_checkpoint("mha"), tmp_path / "other")


def test_unwritable_output_is_refused(make_checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PerseusError, match="cannot write to"):
        export_checkpoint(make_checkpoint("mha"), blocker / "model")
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PerseusError, match="cannot write to"):
            export_checkpoint(make_checkpoint("mha"), locked / "model")


def test_bad_max_context_and_target(make_checkpoint, tmp_path):
    with pytest.raises(PerseusError, match="exceeds the model's max_position_embeddings"):
        export_checkpoint(make_checkpoint("mha"), tmp_path / "a", max_context=10_000)
    with pytest.raises(PerseusError, match="unknown target"):
        export_checkpoint(make_checkpoint("mha"), tmp_path / "b", target="tpu")
    with pytest.raises(PerseusError, match="inside the checkpoint"):
        export_checkpoint(make_checkpoint("mha"), make_checkpoint("mha") / "model")


def _perseus(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from perseus_edge.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_line(make_checkpoint, tmp_path):
    ckpt = _copy(make_checkpoint("mha"), tmp_path / "ckpt")
    text = (ckpt / "config.json").read_text()
    (ckpt / "config.json").write_text(text.replace('"hidden_size": 64', '"hidden_size": 65'))
    proc = _perseus("export", str(ckpt), "-o", str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and "sha256" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    proc = _perseus("inspect", str(tmp_path / "missing"))
    assert proc.returncode == 1 and proc.stderr.startswith("error: model folder not found")


def test_cli_export_defaults_to_ort_cpu_with_the_portable_graphs_tokens(make_checkpoint, exported, tmp_path):
    """`perseus export CKPT -o X` with no flags writes the ort-cpu graph (what `perseus run` is
    fastest on): the portable export's greedy tokens, logits within the parity tolerance."""
    from perseus_edge.cli import main

    out = tmp_path / "model"
    with pytest.raises(SystemExit) as done:
        main(["export", str(make_checkpoint("moe-mla-rope")), "-o", str(out)])
    assert not done.value.code
    assert verify_folder(out)[mf.LOWER_META] == {"target": "ort-cpu",
                                                  "passes": ["moe_to_ort", "skip_norm_to_ort", "head_to_linear"]}
    prompt = np.random.default_rng(1).integers(2, 256, (1, PROMPT))
    logits, tokens = CachedSession(out / mf.MODEL_ONNX).greedy(prompt, 32)
    ref_logits, ref_tokens = CachedSession(exported("moe-mla-rope") / mf.MODEL_ONNX).greedy(prompt, 32)
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert max(float(np.abs(a - b).max()) for a, b in zip(logits, ref_logits)) <= TOL


def test_cli_export_and_inspect(make_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from perseus_edge.cli import _register, app

    _register()
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["export", str(make_checkpoint("mla-dense")), "-o", str(out),
                                      "--max-context", "48"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / mf.GENERATION_CONFIG).read_text())["max_context"] == 48
    result = CliRunner().invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0 and "perseus.LatentAttention" in result.output
    (out / mf.CONFIG).write_text("{not json")
    result = CliRunner().invoke(app, ["inspect", str(out)])  # the report still comes, then the error
    assert result.exit_code == 1 and "config.json is 9 bytes" in str(result.exception)
    assert "config        unreadable" in result.output and "perseus.LatentAttention" in result.output
