"""The sampler in the mode users get by default, against references that share none of its code.

Exported folders carry temperature 0.8, top-k 40, top-p 0.95 in generation_config.json, so this
is what `perseus run` does unless told otherwise. The PyTorch generator uses the same Sampler, so
parity tests cannot see a sampler bug; these can: a plain-numpy reference written from the
definitions (full sort, softmax, nucleus), transformers' logits warpers, and the frequencies of
real draws. Temperature ignored or squared, or a nucleus one token short, fail here.
"""

from __future__ import annotations

import numpy as np
import pytest

from perseus_edge.sampling import Sampler

DEFAULT = dict(temperature=0.8, top_k=40, top_p=0.95)


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """From the definitions, float64, no shortcut: scale, keep the k largest, softmax, then the
    smallest most-likely-first prefix whose mass reaches top_p, renormalised."""
    x = logits.astype(np.float64) / temperature
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))[:top_k]  # ties: lower id first
    z = np.array([x[i] for i in order])
    p = np.exp(z - z.max())
    p = p / p.sum()
    kept, mass = [], 0.0
    for i, pi in zip(order, p):
        kept.append((i, pi))
        mass += pi
        if mass >= top_p:
            break
    out = np.zeros(len(x))
    total = sum(pi for _, pi in kept)
    for i, pi in kept:
        out[i] = pi / total
    return out


def random_logits(seed: int, vocab: int = 512, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab) * scale).astype(np.float32)


@pytest.mark.parametrize("seed", range(12))
def test_default_mode_probabilities_equal_the_reference(seed):
    # scales from flat (nucleus keeps ~all 40) to peaked (nucleus keeps a handful)
    x = random_logits(seed, scale=[0.5, 1.0, 3.0, 8.0][seed % 4])
    got = Sampler(**DEFAULT).probs(x)
    want = reference_probs(x, **DEFAULT)
    assert np.array_equal(np.flatnonzero(got), np.flatnonzero(want))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_default_mode_equals_transformers_warpers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    warpers = [transformers.TemperatureLogitsWarper(0.8), transformers.TopKLogitsWarper(40),
               transformers.TopPLogitsWarper(0.95)]
    for seed in range(20):
        x = random_logits(100 + seed, vocab=8192, scale=2.0 + seed % 5)
        scores = torch.tensor(x, dtype=torch.float64)[None]
        for w in warpers:
            scores = w(None, scores)
        want = torch.softmax(scores, -1)[0].numpy()
        np.testing.assert_allclose(Sampler(**DEFAULT).probs(x), want, rtol=1e-9, atol=1e-12)


def test_the_nucleus_boundary_exactly():
    """Masses built so the boundary is known: 0.5, 0.3, 0.15 reach 0.95 exactly at the 3rd token."""
    p = np.array([0.5, 0.3, 0.15, 0.04, 0.01])
    x = (np.log(p) * 0.8).astype(np.float64)  # after temperature 0.8: exactly these masses
    got = Sampler(**DEFAULT).probs(x)
    assert np.count_nonzero(got) == 3  # reaches 0.95 at token 2 (float rounding aside, not 4, not 2)
    np.testing.assert_allclose(got[:3], p[:3] / p[:3].sum(), rtol=1e-9)
    got = Sampler(temperature=0.8, top_k=40, top_p=0.96).probs(x)
    assert np.count_nonzero(got) == 4


def test_temperature_changes_the_distribution_as_defined():
    x = random_logits(7, scale=1.0)
    for t in (0.5, 0.8, 1.0, 1.7):
        got = Sampler(temperature=t, top_k=0, top_p=1.0).probs(x)
        z = np.exp(x.astype(np.float64) / t - (x.astype(np.float64) / t).max())
        np.testing.assert_allclose(got, z / z.sum(), rtol=1e-12)


def test_draws_follow_the_reference_distribution():
    x = random_logits(3, vocab=256, scale=1.5)
    want = reference_probs(x, **DEFAULT)
    s = Sampler(**DEFAULT, seed=123)
    n = 40_000
    counts = np.bincount([s.sample(x) for _ in range(n)], minlength=len(x)) / n
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(want))
    # each frequency within 5 standard errors of its probability
    se = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(counts - want) <= 5 * se + 1e-12)


def test_folders_default_to_this_mode(make_checkpoint, tmp_path):
    """What `perseus run` samples with when no flag is given: generation_config.json's settings."""
    pytest.importorskip("onnx")
    from perseus_edge.build import export_checkpoint
    from perseus_edge.runtime.generate import Generator

    folder = export_checkpoint(make_checkpoint(), tmp_path / "m")
    s = Generator(folder).sampler()
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (0.8, 40, 0.95, 1.0)
