"""GroupedMuon (Newton-Schulz batched over same-shaped matrices) against torch.optim.Muon."""

from __future__ import annotations

import pytest
import torch

from perseus_edge.optim import GroupedMuon
from perseus_edge.train import NS_COEFFICIENTS

SHAPES = [(48, 64)] * 4 + [(64, 48)] * 3 + [(32, 32)] * 2 + [(20, 70)]  # wide, tall, square, a singleton


def params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.02) for s in SHAPES]


def step_both(ours, theirs, a, b, n_steps: int, first_seed: int = 0) -> None:
    for step in range(first_seed, first_seed + n_steps):
        g = torch.Generator().manual_seed(100 + step)
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_grouped_muon_equals_torch_muon(nesterov, weight_decay):
    kw = dict(lr=1e-2, weight_decay=weight_decay, momentum=0.95, nesterov=nesterov,
              ns_coefficients=NS_COEFFICIENTS, adjust_lr_fn="match_rms_adamw")
    a, b = params(), params()
    ours, theirs = GroupedMuon(a, **kw), torch.optim.Muon(b, **kw)
    step_both(ours, theirs, a, b, n_steps=5)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert a[0].abs().max() > 0.03  # the updates were not no-ops


def test_state_is_interchangeable_with_torch_muon():
    """Checkpoints resume across the two: same state layout (one momentum_buffer per parameter)."""
    kw = dict(lr=1e-2, ns_coefficients=NS_COEFFICIENTS, adjust_lr_fn="match_rms_adamw")
    a, b = params(), params()
    ours, theirs = GroupedMuon(a, **kw), torch.optim.Muon(b, **kw)
    step_both(ours, theirs, a, b, n_steps=2)
    resumed = GroupedMuon(b, **kw)
    resumed.load_state_dict(theirs.state_dict())
    step_both(ours, resumed, a, b, n_steps=2, first_seed=2)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
