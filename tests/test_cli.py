"""Bad input through the real `perseus` entry point: one `error:` line, exit 1, no traceback, no output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def perseus(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "perseus_edge.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert fragment in lines[0], lines[0]
    assert proc.stdout == ""


@pytest.fixture
def ckpt_copy(tmp_path, make_checkpoint) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint(), folder)
    return folder


def test_missing_data_file(tmp_path):
    (tmp_path / "data").mkdir()
    proc = perseus("train", "--preset", "tiny", "--data-dir", tmp_path / "data", "-o", tmp_path / "run")
    assert_one_line_error(proc, "missing data file")
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_missing_data_folder(tmp_path):
    proc = perseus("train", "--preset", "tiny", "--data-dir", tmp_path / "nowhere", "-o", tmp_path / "run")
    assert_one_line_error(proc, "data folder not found")


@pytest.mark.parametrize("change, fragment", [
    ({"num_experts_per_tok": 12}, "num_experts_per_tok (top-k) 12"),
    ({"kv_lora_rank": 4096}, "kv_lora_rank 4096"),
    ({"arch": "rwkv"}, "unknown architecture 'rwkv'"),
])
def test_config_that_cannot_work(tmp_path, ckpt_copy, change, fragment):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**cfg, **change}))
    assert_one_line_error(perseus("info", "--config", tmp_path / "bad.json"), fragment)


def test_unknown_preset():
    assert_one_line_error(perseus("info", "--preset", "7b"), "unknown preset '7b'")


def test_truncated_checkpoint(ckpt_copy):
    weights = ckpt_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_one_line_error(perseus("generate", ckpt_copy, "-p", "Once"), "truncated")


def test_tampered_checkpoint(ckpt_copy):
    text = (ckpt_copy / "config.json").read_text()
    assert '"num_hidden_layers": 2,' in text
    (ckpt_copy / "config.json").write_text(text.replace('"num_hidden_layers": 2,', '"num_hidden_layers": 3,'))
    assert_one_line_error(perseus("eval", ckpt_copy, "--max-batches", "1"), "sha256")


def test_checkpoint_without_manifest(ckpt_copy):
    (ckpt_copy / "manifest.json").unlink()
    assert_one_line_error(perseus("generate", ckpt_copy, "-p", "Once"), "no manifest.json")


def test_tokenizer_that_does_not_match_the_vocab(ckpt_copy):
    from perseus_edge.manifest import write_manifest
    from perseus_edge.tokenizer import DEFAULT_TOKENIZER

    shutil.copyfile(DEFAULT_TOKENIZER, ckpt_copy / "tokenizer.json")
    write_manifest(ckpt_copy, "checkpoint")
    assert_one_line_error(perseus("generate", ckpt_copy, "-p", "Once"), "vocab_size is 512")


def test_generate_and_eval_match_references_on_a_good_checkpoint(make_checkpoint, data_dir):
    """The CLI's numbers, recomputed here: greedy text from the model's own argmax, and the loss
    as plain cross-entropy over the first 2 x 8 windows of 64 tokens of the valid split."""
    import lzma

    import numpy as np
    import torch
    import torch.nn.functional as F

    from perseus_edge.checkpoint import load_checkpoint
    from perseus_edge.tokenizer import load_tokenizer

    ckpt = make_checkpoint()
    model, tok_path = load_checkpoint(ckpt)
    tok = load_tokenizer(tok_path)
    ids = tok.encode("Once upon a time").ids
    with torch.no_grad():
        for _ in range(8):  # greedy, full forward each step (no cache): an independent path
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    proc = perseus("generate", ckpt, "-p", "Once upon a time", "-n", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Once upon a time" + tok.decode(ids[-8:], skip_special_tokens=False) + "\n"

    proc = perseus("eval", ckpt, "--max-batches", "2", "--seq-len", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    text = lzma.open(data_dir / "valid.txt.xz", "rt", encoding="utf-8", newline="").read(20_000)
    tokens = np.array(tok.encode(text).ids[: 16 * 64 + 1])
    x = torch.tensor(tokens[:-1].reshape(16, 64))
    y = torch.tensor(tokens[1:].reshape(16, 64))
    with torch.no_grad():
        loss = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item()
    assert result["split"] == "valid" and result["tokens"] == 2 * 8 * 64
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["ppl"] == pytest.approx(np.exp(loss), rel=1e-5)
