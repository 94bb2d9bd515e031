"""The Python API (`perseus_edge.load`): same tokens as the runtime, logits as PyTorch, score as eval."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import perseus_edge
from perseus_edge.errors import PerseusError

pytest.importorskip("onnx")
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def folder(make_checkpoint, tmp_path_factory):
    from perseus_edge.build import export_checkpoint

    return export_checkpoint(make_checkpoint("moe-mla-rope"), tmp_path_factory.mktemp("api") / "onnx")


@pytest.fixture(scope="module")
def lm(folder):
    return perseus_edge.load(folder, threads=1)


def test_import_is_light_and_public():
    code = ("import sys, perseus_edge; heavy = {'numpy', 'onnxruntime', 'torch', 'tokenizers'} & set(sys.modules); "
            "print(sorted(heavy)); print(perseus_edge.__all__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "[]"
    assert {"load", "LanguageModel", "Score", "PerseusError"} <= set(eval(out.splitlines()[1]))
    assert perseus_edge.load.__annotations__["return"] == "LanguageModel"


def test_generate_and_stream_match_the_runtime(lm, folder):
    from perseus_edge.runtime.generate import Generator

    ref = Generator(folder, threads=1).generate("Once upon a time", 20, temperature=0.8, top_k=40, seed=3,
                                                ignore_eos=True)
    text = lm.generate("Once upon a time", 20, temperature=0.8, top_k=40, seed=3, ignore_eos=True)
    assert text == ref.text and lm.last_result.tokens == ref.tokens
    pieces = list(lm.stream("Once upon a time", 20, temperature=0.8, top_k=40, seed=3, ignore_eos=True))
    assert len(pieces) > 1 and "".join(pieces) == text
    assert lm.decode(lm.last_result.tokens) == text  # no EOS: ignore_eos, no stop string


def test_stop_string_accepts_one_string(lm):
    full = lm.generate("Once upon a time", 30, temperature=0.0, ignore_eos=True)
    cut = full[5:8]
    assert lm.generate("Once upon a time", 30, temperature=0.0, ignore_eos=True, stop=cut) == full[:full.index(cut)]
    assert lm.last_result.stop_reason == "stop"


def test_logits_match_pytorch(lm, make_checkpoint):
    import torch

    from perseus_edge.checkpoint import load_checkpoint

    model, _ = load_checkpoint(make_checkpoint("moe-mla-rope"))
    model.eval()
    ids = lm.encode("The old captain looked at the sea and said")
    with torch.no_grad():
        ref, _ = model(torch.tensor([ids]))
    got = lm.logits(ids)
    assert got.shape == (len(ids), lm.tokenizer.get_vocab_size()) and got.dtype == np.float32
    assert np.abs(got - ref[0].numpy()).max() < 1e-4


def test_score_matches_runtime_evaluate(lm, folder, valid_text):
    from perseus_edge.runtime.evaluate import evaluate

    ctx = lm.max_context
    ids = lm.encode(valid_text[:20_000])[: 2 * ctx + 1]  # exactly two windows of the context
    text = lm.decode(ids)
    assert lm.encode(text) == ids
    score = lm.score(text)
    ref = evaluate(folder, np.asarray(ids), seq_len=ctx, batch_size=1, threads=1)
    assert score.tokens == ref["tokens"] == 2 * ctx
    assert abs(score.loss - ref["loss"]) < 1e-5
    assert abs(score.perplexity - np.exp(score.loss)) < 1e-9
    short = lm.score("Once upon a time, there was")  # one partial window
    assert short.tokens == len(lm.encode("Once upon a time, there was")) - 1 and short.loss > 0


def test_errors_are_perseus_errors(lm, tmp_path):
    with pytest.raises(PerseusError, match="at least two tokens"):
        lm.score("a")
    with pytest.raises(PerseusError, match="outside the vocabulary"):
        lm.logits([1, 2, 10**6])
    with pytest.raises(PerseusError, match="exceed the model's context"):
        lm.logits([1] * (lm.max_context + 1))
    with pytest.raises(PerseusError, match="temperature"):
        lm.generate("hi", 4, temperature=-1)
    with pytest.raises(PerseusError):
        perseus_edge.load(tmp_path / "missing")


def test_prompt_longer_than_a_prefill_chunk(folder, make_checkpoint):
    """low_memory prefills 32 tokens per run: a 150-token prompt takes five chunks, and its logits
    and greedy tokens equal one PyTorch pass over the whole sequence."""
    import torch

    from perseus_edge.checkpoint import load_checkpoint
    from perseus_edge.runtime.model import PREFILL_CHUNK_LOW_MEMORY

    small = perseus_edge.load(folder, threads=1, low_memory=True)
    ids = [int(i) for i in np.arange(150) * 37 % small.tokenizer.get_vocab_size()]
    assert len(ids) > 2 * PREFILL_CHUNK_LOW_MEMORY
    model, _ = load_checkpoint(make_checkpoint("moe-mla-rope"))
    model.eval()
    small.generate(ids, 12, temperature=0.0, ignore_eos=True)  # first: the cache holds nothing yet
    tokens = small.last_result.tokens
    assert small.last_result.prompt_tokens == ids and len(tokens) == 12
    with torch.no_grad():
        full, _ = model(torch.tensor([ids + tokens]))
    assert tokens == full[0, len(ids) - 1:-1].argmax(-1).tolist()
    got = small.logits(ids)
    assert np.abs(got - full[0, :len(ids)].numpy()).max() < 1e-4
