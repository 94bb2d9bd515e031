"""PyTorch reference generation: the behaviour the ONNX runtime is checked against.

Sampling is `perseus_edge.sampling.Sampler`, the numpy sampler the runtime uses too, so given
equal logits the two generators pick the same tokens; any divergence is an export problem.
"""

from __future__ import annotations

from typing import Iterator

import torch

from perseus_edge.errors import PerseusError
from perseus_edge.model.transformer import PerseusLM
from perseus_edge.sampling import Sampler


@torch.no_grad()
def generate_tokens(model: PerseusLM, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
                    eos_id: int | None = None) -> Iterator[int]:
    """Prefill the prompt, then decode one token at a time from the latent cache."""
    if not prompt_ids:
        raise PerseusError("empty prompt: give at least one token of text")
    ctx = model.cfg.max_position_embeddings
    if len(prompt_ids) >= ctx:
        raise PerseusError(f"prompt has {len(prompt_ids)} tokens, the model's context is {ctx}")
    device = next(model.parameters()).device
    history = list(prompt_ids)
    logits, cache = model(torch.tensor([prompt_ids], device=device), use_cache=True)
    for _ in range(min(max_new_tokens, ctx - len(prompt_ids))):
        token = sampler.sample(logits[0, -1].float().cpu().numpy(), history)
        yield token
        history.append(token)
        if token == eos_id:
            return
        logits, cache = model(torch.tensor([[token]], device=device), cache)
