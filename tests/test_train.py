"""Training: optimizer grouping, a short real run, resume, checkpoints, and 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perseus_edge.checkpoint import load_checkpoint, load_state, save_checkpoint
from perseus_edge.errors import PerseusError
from perseus_edge.model.config import ARCHS, preset
from perseus_edge.model.transformer import PerseusLM
from perseus_edge.train import NS_COEFFICIENTS, TrainConfig, build_optimizers, param_groups, train

# Expected after TRAIN_STEPS on CPU (the untrained model starts at ln(512) = 6.24 nats).
TRAIN_STEPS = 200
VALID_LOSS_BELOW = 5.0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied", [False, True])
def test_muon_and_adamw_groups_cover_every_parameter_once(arch, tied):
    model = PerseusLM(preset("tiny", arch, tie_word_embeddings=tied, q_lora_rank=16))
    muon, adam = param_groups(model)
    ids = [id(p) for p in muon + adam]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 for p in muon)
    assert not any(k in names[id(p)] for p in muon for k in ("embed", "lm_head", "norm", "gate.weight"))
    assert any("experts" in names[id(p)] for p in muon) == model.cfg.is_moe
    assert any("mlp.gate.weight" in names[id(p)] for p in adam) == model.cfg.is_moe
    opt_muon, opt_adam = build_optimizers(model, TrainConfig(optimizer="muon"))
    assert isinstance(opt_muon, torch.optim.Muon) and opt_muon.defaults["ns_coefficients"] == NS_COEFFICIENTS
    (only_adam,) = build_optimizers(model, TrainConfig(optimizer="adamw"))
    assert sum(len(g["params"]) for g in only_adam.param_groups) == len(ids)


def run_config(tmp_path: Path, tokenizer: Path, **kw) -> TrainConfig:
    base = dict(preset="tiny", batch_size=8, seq_len=64, steps=TRAIN_STEPS, warmup=20, lr=1e-2, adam_lr=1e-2,
                eval_every=100, eval_batches=8, max_chars=400_000, tokenizer=str(tokenizer),
                out=str(tmp_path / "run"), progress=False, log_every=20)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_tokenizer, monkeypatch_module):
    tmp = tmp_path_factory.mktemp("train")
    monkeypatch_module.setenv("PERSEUS_CACHE", str(tmp / "tokens"))
    cfg = run_config(tmp, tiny_tokenizer, router_bias_rate=2e-3)
    return cfg, train(cfg)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_tiny_model_learns_on_cpu(trained_run):
    cfg, result = trained_run
    assert result["val_loss"] < VALID_LOSS_BELOW
    log = [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == TRAIN_STEPS and "val_loss" in log[-1]
    assert log[0]["loss"] > log[-1]["loss"] + 0.8  # step 20 -> step 200 (measured: 4.69 -> 3.71)
    assert all(len(r["expert_load_max_over_mean"]) == 2 for r in log)
    saved = json.loads((Path(cfg.out) / "checkpoint" / "config.json").read_text())
    assert saved["router_bias_update_rate"] == 2e-3  # --router-bias-rate reaches the model


def test_resume_equals_one_uninterrupted_run(tmp_path, tiny_tokenizer):
    """6 steps in one go == 3 steps, then --resume to 6: same losses, same weights. Fails when
    the optimizer state (Muon momentum, AdamW moments, step counts) or the step is not restored.
    Its own runs, so the result does not depend on which tests ran before."""
    kw = dict(batch_size=4, seq_len=32, warmup=2, eval_every=3, eval_batches=1, max_chars=50_000, log_every=1)
    whole = run_config(tmp_path / "whole", tiny_tokenizer, steps=6, **kw)
    train(whole)
    part = run_config(tmp_path / "part", tiny_tokenizer, steps=3, **kw)
    train(part)
    assert json.loads((Path(part.out) / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    train(TrainConfig(**{**part.__dict__, "steps": 6, "resume": True}))

    def log(cfg):
        return [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]

    a, b = log(whole), log(part)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6), (ra, rb)
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-12)
    sa, sb = load_state(Path(whole.out) / "checkpoint"), load_state(Path(part.out) / "checkpoint")
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-6), k


def test_patience_stops_early_and_best_holds_the_best_weights(tmp_path, tiny_tokenizer):
    """lr 3.0 makes the valid loss climb after the first steps: with --patience 2 the run stops two
    evaluations after its best one, and OUT/best holds exactly the weights that scored it."""
    from perseus_edge.train import evaluate
    from perseus_edge.data import resolve_data_dir, token_cache_dir, tokenize_split
    from perseus_edge.tokenizer import load_tokenizer

    cfg = run_config(tmp_path, tiny_tokenizer, steps=40, warmup=1, lr=3.0, adam_lr=3.0, eval_every=2,
                     eval_batches=2, max_chars=50_000, log_every=2, patience=2, batch_size=4, seq_len=32)
    result = train(cfg)
    log = [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    vals = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    best_step, best_val = min(vals, key=lambda sv: sv[1])
    assert result["steps"] == log[-1]["step"] < cfg.steps and "early_stop" in log[-1]
    assert [s for s, _ in vals][-3] == best_step  # stopped after exactly 2 evaluations without a new best
    assert result["best"]["step"] == best_step
    model, _ = load_checkpoint(Path(cfg.out) / "best")
    manifest = json.loads((Path(cfg.out) / "best" / "manifest.json").read_text())
    assert manifest["step"] == best_step
    valid = tokenize_split(load_tokenizer(tiny_tokenizer), resolve_data_dir(None), "valid", token_cache_dir())
    again = evaluate(model, valid, cfg.seq_len, cfg.batch_size, cfg.eval_batches, torch.device("cpu"))
    assert again == pytest.approx(best_val, abs=1e-4)


def test_run_keeps_its_own_tokenizer_when_the_source_vanishes(tmp_path, tiny_tokenizer, monkeypatch):
    """A checkout re-synced under a running job (as the GPU machine's tool does) once deleted the
    tokenizer mid-run and killed it at its next checkpoint: the run reads the file once and
    writes its own copy into every checkpoint."""
    import shutil

    import perseus_edge.train as train_module

    source = tmp_path / "tok.json"
    shutil.copyfile(tiny_tokenizer, source)
    real_evaluate = train_module.evaluate

    def evaluate_then_delete(*args, **kwargs):
        source.unlink(missing_ok=True)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", evaluate_then_delete)
    cfg = run_config(tmp_path, source, steps=4, warmup=1, eval_every=2, eval_batches=1, max_chars=50_000,
                     log_every=2, patience=5, batch_size=2, seq_len=32)
    train(cfg)
    for folder in ("best", "checkpoint"):
        assert (Path(cfg.out) / folder / "tokenizer.json").read_bytes() == Path(tiny_tokenizer).read_bytes()


def test_checkpoint_round_trip_is_bit_exact(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    model = PerseusLM(preset("tiny"))
    for r in model.routers():
        r.e_score_correction_bias.normal_()
    save_checkpoint(tmp_path / "a", model, tiny_tokenizer)
    loaded, _ = load_checkpoint(tmp_path / "a")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    # sharded bf16 (the layout of the committed models) reloads to the same bf16 values
    save_checkpoint(tmp_path / "b", model, tiny_tokenizer, dtype="bf16", max_shard_bytes=100_000)
    assert len(list((tmp_path / "b").glob("model-*-of-*.safetensors"))) > 1
    state = load_state(tmp_path / "b")
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v.to(torch.bfloat16)), k


def test_tampered_or_truncated_checkpoint_is_refused(tmp_path, make_checkpoint):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint(), folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PerseusError, match="sha256"):
        load_checkpoint(folder)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(PerseusError, match="truncated"):
        load_checkpoint(folder)


def test_tokenizer_vocab_mismatch_is_refused(tmp_path, make_checkpoint):
    import shutil

    from perseus_edge.manifest import write_manifest
    from perseus_edge.tokenizer import DEFAULT_TOKENIZER

    folder = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint(), folder)
    shutil.copyfile(DEFAULT_TOKENIZER, folder / "tokenizer.json")  # 8192 tokens, model has 512
    write_manifest(folder, "checkpoint")
    with pytest.raises(PerseusError, match="8192 tokens but .*vocab_size is 512"):
        load_checkpoint(folder)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_process_ddp_matches_one_process(tmp_path, tiny_tokenizer):
    """2 gloo processes x batch 4 see the same global batch as 1 process x batch 8: same train
    loss, and validation scores the same windows, so the same validation loss."""
    env = {**os.environ, "PERSEUS_CACHE": str(tmp_path / "tokens"), "OMP_NUM_THREADS": "1"}
    common = ["--preset", "tiny", "--seq-len", "32", "--steps", "6", "--warmup", "2", "--eval-every", "6",
              "--eval-batches", "2", "--max-chars", "100000", "--tokenizer", str(tiny_tokenizer)]

    def run(nproc: int, batch: int, out: Path) -> list[dict]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "perseus_edge.cli", "train", *common, "--batch-size", str(batch), "-o", str(out)]
        if nproc == 1:
            cmd = [sys.executable, "-m", "perseus_edge.cli", "train", *common, "--batch-size", str(batch), "-o", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    one = run(1, 8, tmp_path / "one")
    two = run(2, 4, tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    gaps = [abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(one, two)]
    val_gap = abs(one[-1]["val_loss"] - two[-1]["val_loss"]) / one[-1]["val_loss"]
    # the log rounds to 5 decimals: equal up to that rounding (validation scores the same windows
    # in both runs; scoring fewer windows per process showed a 5.7e-4 gap)
    assert max(gaps) < 1e-5 and val_gap < 1e-5, (gaps, val_gap)


def test_compiled_layers_match_eager():
    """`--compile` (regional torch.compile of every decoder layer) computes the eager logits."""
    from perseus_edge.train import compile_layers

    torch.manual_seed(0)
    model = PerseusLM(preset("tiny")).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        eager = model(ids)
        compile_layers(model)
        assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
        compiled = model(ids)
    eager, compiled = (x[0] if isinstance(x, tuple) else x for x in (eager, compiled))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
