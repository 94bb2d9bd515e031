"""Training throughput of one configuration: tokens/s, MFU and peak memory, measured solo.

One process per configuration (the suite runs each under a timeout, since torch.compile can take
long): build the model, run warm-up steps (compilation happens there), then time N steps of the
real training step (`perseus_edge.train.train_step`, router-bias update included) between two
device synchronisations. Batches are real text windows of the valid split, so routing is as in
training. Prints one JSON line and appends it to --out.

    python3 studies/gpu/throughput.py --preset 54m --arch moe-mla-rope --optimizer muon [--compile] --out probe.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from perseus_edge.data import TokenWindows, resolve_data_dir, token_cache_dir, tokenize_split
from perseus_edge.model.config import preset
from perseus_edge.model.transformer import PerseusLM
from perseus_edge.tokenizer import DEFAULT_TOKENIZER, load_tokenizer
from perseus_edge.train import H100_BF16_PEAK, TrainConfig, build_optimizers, compile_layers, train_step


def measure(preset_name: str, arch: str, optimizer: str, compile_: bool, muon_impl: str, batch: int, seq: int,
            warmup: int, steps: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    tokenizer = load_tokenizer(DEFAULT_TOKENIZER)
    tokens = tokenize_split(tokenizer, resolve_data_dir(), "valid", token_cache_dir(), progress=False)
    windows = TokenWindows(tokens, seq, batch, seed=0)
    cfg = preset(preset_name, arch, vocab_size=tokenizer.get_vocab_size())
    model = PerseusLM(cfg).to(device).train()
    optimizers = build_optimizers(model, TrainConfig(optimizer=optimizer, lr=3e-3, adam_lr=3e-3))
    if muon_impl == "torch" and optimizer == "muon":  # the before-picture: torch's per-matrix Muon
        optimizers[0] = torch.optim.Muon(optimizers[0].param_groups[0]["params"], **{
            k: v for k, v in optimizers[0].defaults.items() if k in
            ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps", "adjust_lr_fn")})
    if compile_:
        compile_layers(model)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(first: int, n: int) -> None:
        for step in range(first, first + n):
            x, y = windows.torch_batch(step, device)
            train_step(model, optimizers, x, y, autocast, 1.0)
            for r in model.routers():
                r.update_bias()

    t0 = time.perf_counter()
    run(0, warmup)
    sync()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(warmup, steps)
    sync()
    elapsed = time.perf_counter() - t0
    tok_s = steps * batch * seq / elapsed
    flops_per_token = 3 * cfg.flops_per_token(seq // 2)
    out = {"preset": preset_name, "arch": arch, "optimizer": optimizer, "muon_impl": muon_impl,
           "compile": compile_, "batch": batch, "seq_len": seq, "steps_timed": steps,
           "step_ms": round(1000 * elapsed / steps, 2), "tokens_per_s": round(tok_s, 1),
           "flops_per_token": flops_per_token, "warmup_s": round(warm_s, 1), "device": str(device)}
    if device.type == "cuda":
        out["mfu"] = round(tok_s * flops_per_token / H100_BF16_PEAK, 4)
        out["max_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="17m")
    ap.add_argument("--arch", default="moe-mla-rope")
    ap.add_argument("--optimizer", default="muon", choices=["muon", "adamw"])
    ap.add_argument("--muon-impl", default="grouped", choices=["grouped", "torch"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    row = measure(a.preset, a.arch, a.optimizer, a.compile, a.muon_impl, a.batch, a.seq_len, a.warmup, a.steps)
    print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
