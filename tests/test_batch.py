"""Per-sequence positions: a batch of sequences at different positions equals each run alone.

The graph's `position` input is one absolute position per row, so a server can decode several
requests in one run. Here three sequences with prompts of different lengths are prefilled into
three cache slots, then decoded together (one token and two tokens per row) at their own
positions; logits and cache rows must equal those of each sequence run alone in a batch of one.
Covered: MLA and MHA, portable and ort-cpu graphs, fp32 and int8 (weights and cache) folders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from perseus_edge.errors import PerseusError

pytest.importorskip("onnx")
pytest.importorskip("torch")

from perseus_edge.build import export_checkpoint, quantize_model  # noqa: E402
from perseus_edge.runtime.model import Model  # noqa: E402

LENGTHS = [5, 11, 8]  # prompt lengths: the rows decode at positions 5, 11 and 8
STEPS = [1, 1, 2, 1]  # new tokens per row in each batched run after the prefills


def assert_close(got: np.ndarray, want: np.ndarray, scheme: str, what: str) -> None:
    """fp32: the same arithmetic up to GEMM blocking. int8: DynamicQuantizeMatMul picks one
    activation scale per run over all rows of the batch, so a row's codes depend on its
    neighbours: a few quantization steps of difference, bounded relative to the tensor's norm."""
    if scheme == "fp32":
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=what)
    else:
        rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        assert rel <= REL_INT8, f"{what}: relative error {rel:.4f}"


REL_INT8 = 0.03  # measured up to 0.012 (logits) and 0.007 (cache rows)


@pytest.fixture(scope="module")
def folder(make_checkpoint, tmp_path_factory):
    cache = {}

    def get(arch: str, target: str, scheme: str) -> Path:
        key = (arch, target, scheme)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"batch-{arch}-{target}-{scheme}")
            out = export_checkpoint(make_checkpoint(arch), root / "fp32", target="portable" if scheme == "int8" else target)
            if scheme == "int8":  # lowering comes after quantization
                out = quantize_model(out, root / "int8", "int8", kv_cache="int8", target=target)
            cache[key] = out
        return cache[key]

    return get


def tokens(vocab: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(3)
    prompts = [rng.integers(2, vocab, n) for n in LENGTHS]
    steps = [rng.integers(2, vocab, (len(LENGTHS), t)) for t in STEPS]
    return prompts, steps


def cache_rows(model: Model, slot: int, rows: int) -> list[np.ndarray]:
    """A slot's cached rows 0..rows-1 as float (int8 slots: codes times their row scales)."""
    arrays = dict(zip((s.past for s in model.cache.specs), model.cache.arrays))
    out = []
    for name, a in arrays.items():
        if name.endswith("_scale"):
            continue
        rows_a = a[slot, :rows].astype(np.float64)
        scale = arrays.get(name + "_scale")
        out.append(rows_a * scale[slot, :rows] if scale is not None else rows_a)
    return out


@pytest.mark.parametrize("scheme", ["fp32", "int8"])
@pytest.mark.parametrize("target", ["portable", "ort-cpu"])
@pytest.mark.parametrize("arch", ["moe-mla-rope", "mha"])
def test_batch_at_different_positions_equals_each_alone(folder, arch, target, scheme):
    path = folder(arch, target, scheme)
    alone = Model(path, threads=1)
    prompts, steps = tokens(alone.config.vocab_size)
    expected, expected_cache = [], []
    for b, prompt in enumerate(prompts):
        alone.forward(prompt[None], 0)
        position, outs = len(prompt), []
        for step in steps:
            outs.append(alone.forward(step[b:b + 1], position)[0].copy())
            position += step.shape[1]
        expected.append(outs)
        expected_cache.append(cache_rows(alone, 0, position))

    batch = Model(path, threads=1, batch=len(prompts))
    for b, prompt in enumerate(prompts):  # each prompt into its own slot, alone
        batch.forward(prompt[None], 0, slot=b)
    positions = np.array(LENGTHS)
    for i, step in enumerate(steps):
        logits = batch.forward(step, positions)
        for b in range(len(prompts)):
            assert_close(logits[b], expected[b][i], scheme, f"logits of row {b}, run {i}")
        positions = positions + step.shape[1]
    for b, want in enumerate(expected_cache):
        for got, ref in zip(cache_rows(batch, b, positions[b]), want):
            assert_close(got, ref, scheme, f"cache rows of slot {b}")


def test_subset_of_slots_runs_in_place_and_leaves_the_others(folder):
    path = folder("moe-mla-rope", "portable", "fp32")
    model = Model(path, threads=1, batch=3)
    prompts, _ = tokens(model.config.vocab_size)
    for b, prompt in enumerate(prompts):
        model.forward(prompt[None], 0, slot=b)
    first = [a[0].copy() for a in model.cache.arrays]
    step = np.array([[7], [9]])
    pair = model.forward(step, [LENGTHS[1], LENGTHS[2]], slot=1).copy()  # slots 1 and 2 only
    for a, before in zip(model.cache.arrays, first):
        np.testing.assert_array_equal(a[0], before)
    # slot 2's prompt moved to slot 0 decodes there exactly as it did in slot 2
    model.copy_slot(2, 0, LENGTHS[2])
    again = model.forward(np.array([[9]]), LENGTHS[2], slot=0)[0]
    np.testing.assert_allclose(again, pair[1], atol=1e-5)


def test_positions_are_checked(folder):
    model = Model(folder("moe-mla-rope", "portable", "fp32"), threads=1, batch=2)
    with pytest.raises(PerseusError, match="exceed the model's context"):
        model.forward(np.array([[1], [2]]), [3, model.max_context])
    with pytest.raises(PerseusError, match="negative position"):
        model.forward(np.array([[1], [2]]), [-1, 0])
    with pytest.raises(ValueError, match="positions must be an int or 2 ints"):
        model.forward(np.array([[1], [2]]), [1, 2, 3])
    with pytest.raises(ValueError, match="outside the model's batch"):
        model.forward(np.array([[1], [2]]), 0, slot=1)
