"""Training loop: Muon on hidden matrices, AdamW on the rest; one GPU, CPU, or torchrun DDP.

Reads top to bottom like nanoGPT's train.py: config -> data -> model -> optimizers -> loop
(warmup + cosine decay, grad clipping, bf16 autocast on GPU, periodic eval, JSON-lines log,
router-bias balancing) -> checkpoint folder. Resume reloads weights, optimizer state and step
from the checkpoint (all safetensors + JSON, no pickle).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from perseus_edge.atomic import atomic_write, describe_oserror, fault
from perseus_edge.checkpoint import load_checkpoint, save_checkpoint
from perseus_edge.data import (
    TokenWindows,
    eval_batches,
    is_bundled_sample,
    resolve_data_dir,
    token_cache_dir,
    tokenize_split,
)
from perseus_edge.errors import PerseusError
from perseus_edge.model.config import preset
from perseus_edge.model.transformer import PerseusLM, RMSNorm, Router
from perseus_edge.optim import GroupedMuon
from perseus_edge.tokenizer import DEFAULT_TOKENIZER, check_vocab, load_tokenizer
from perseus_edge.train_config import TrainConfig

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Newton-Schulz quintic of Muon (Su, 2024)
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM, for MFU


# ----------------------------------------------------------------------------- optimizers
def param_groups(model: PerseusLM) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices for Muon, everything else for AdamW).

    Muon orthogonalises updates of 2-D weights *inside* the network (attention projections,
    experts, dense MLPs). Embeddings, the LM head, norms and the router are AdamW's: their rows
    are looked up or scored one by one, where orthogonalised updates are not meaningful.
    """
    embed_like = {id(model.model.embed_tokens.weight), id(model.lm_head.weight)}
    adam_ids = set(embed_like)
    for m in model.modules():
        if isinstance(m, (RMSNorm, Router)):
            adam_ids.update(id(p) for p in m.parameters(recurse=False))
    muon, adam = [], []
    for p in model.parameters():
        (adam if id(p) in adam_ids or p.ndim != 2 else muon).append(p)
    return muon, adam


def build_optimizers(model: PerseusLM, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    muon_params, adam_params = param_groups(model)
    no_decay = [p for p in adam_params if p.ndim < 2]
    decay = [p for p in adam_params if p.ndim >= 2]
    adam_kw = dict(betas=(0.9, 0.95), eps=1e-8)
    if cfg.optimizer == "muon":
        # match_rms_adamw scales each update to AdamW's RMS, so one lr range serves both optimizers.
        # GroupedMuon = torch.optim.Muon with Newton-Schulz batched over same-shaped experts.
        muon = GroupedMuon(muon_params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.95,
                           nesterov=True, ns_coefficients=NS_COEFFICIENTS, adjust_lr_fn="match_rms_adamw")
        adam = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=cfg.adam_lr, **adam_kw)
        return [muon, adam]
    if cfg.optimizer == "adamw":
        return [torch.optim.AdamW([{"params": muon_params, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
                                   {"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.adam_lr, **adam_kw)]
    raise PerseusError(f"unknown optimizer {cfg.optimizer!r} (choose muon or adamw)")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio of the peak."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def flatten_optimizer(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    """Optimizer state as (tensors for safetensors, JSON-able rest): no pickle."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, t in tensors.items():
        p, idx, k = name.split(".", 2)
        if p == prefix:
            state.setdefault(int(idx), {})[k] = t
    for name, v in meta["scalars"].items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: PerseusLM, tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None,
             device: torch.device, autocast=nullcontext) -> float:
    """Mean next-token cross-entropy over sequential windows of `tokens` (same windows every call)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, seq_len, batch_size, max_batches):
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        with autocast():
            logits, _ = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


def load_balance(model: PerseusLM) -> list[float]:
    """Per MoE layer: max expert load / mean load since the last router update (1.0 = perfect)."""
    out = []
    for r in model.routers():
        load = r.load
        out.append(float(load.max() / load.mean()) if load.sum() > 0 else 1.0)
    return out


# ----------------------------------------------------------------------------- main loop
def train_step(model: nn.Module, optimizers: list[torch.optim.Optimizer], x: torch.Tensor, y: torch.Tensor,
               autocast, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, clip, step: (loss, grad norm), both still on the device (no host sync)."""
    with autocast():
        logits, _ = model(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss, grad_norm


def compile_layers(model: PerseusLM) -> None:
    """Regional torch.compile: the decoder layers are alike, so compile time is about one layer's."""
    for layer in model.model.layers:
        layer.compile()


def setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


def train(cfg: TrainConfig) -> dict:
    rank, world, device = setup_distributed()
    master = rank == 0
    torch.manual_seed(cfg.seed)
    cfg.validate()
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoint"
    if out.exists() and not out.is_dir():
        raise PerseusError(f"the run folder {out} exists and is not a folder")
    earlier = [n for n in ("checkpoint", "log.jsonl", "train_config.json") if (out / n).exists()]
    if earlier and not (cfg.resume or cfg.force):
        raise PerseusError(f"{out} already holds a run ({', '.join(earlier)}): --resume continues it, "
                           f"--force starts over, or choose another -o")

    tok_path = Path(cfg.tokenizer) if cfg.tokenizer else DEFAULT_TOKENIZER
    if cfg.resume:
        if not (ckpt_dir / "trainer_state.json").is_file():
            raise PerseusError(f"nothing to resume: {ckpt_dir} has no trainer_state.json")
        model, tok_path = load_checkpoint(ckpt_dir)
        model_cfg = model.cfg
    else:
        overrides = {} if cfg.router_bias_rate is None else {"router_bias_update_rate": cfg.router_bias_rate}
        model_cfg = preset(cfg.preset, cfg.arch, **overrides)
    tokenizer = load_tokenizer(tok_path)
    try:  # read once: every checkpoint of the run writes these bytes, whatever happens to the source file
        tok_bytes = tok_path.read_bytes()
    except OSError as e:
        raise PerseusError(f"cannot read the tokenizer {tok_path}: {describe_oserror(e)}") from None
    if not cfg.resume and tokenizer.get_vocab_size() != model_cfg.vocab_size:
        model_cfg = model_cfg.replace(vocab_size=tokenizer.get_vocab_size())
    check_vocab(tokenizer, model_cfg.vocab_size, f"preset {cfg.preset}")
    if cfg.seq_len > model_cfg.max_position_embeddings:
        raise PerseusError(f"seq_len {cfg.seq_len} exceeds the model context {model_cfg.max_position_embeddings}")

    data_dir = resolve_data_dir(cfg.data_dir)
    if master and is_bundled_sample(data_dir):
        print(f"note: training on the corpus sample in {data_dir} (~400k characters of train); "
              f"for the full corpus set --data-dir or PERSEUS_DATA_DIR", file=sys.stderr)
    cache_dir = token_cache_dir()
    # rank 0 tokenizes; the others wait and then map the same file
    if master:
        train_tokens = tokenize_split(tokenizer, data_dir, "train", cache_dir, cfg.max_chars, cfg.progress)
        valid_tokens = tokenize_split(tokenizer, data_dir, "valid", cache_dir, None, cfg.progress)
    if world > 1:
        dist.barrier()
    if not master:
        train_tokens = tokenize_split(tokenizer, data_dir, "train", cache_dir, cfg.max_chars, False)
        valid_tokens = tokenize_split(tokenizer, data_dir, "valid", cache_dir, None, False)
    windows = TokenWindows(train_tokens, cfg.seq_len, cfg.batch_size, cfg.seed, rank, world)

    if not cfg.resume:
        model = PerseusLM(model_cfg)
    model.to(device).train()
    optimizers = build_optimizers(model, cfg)
    start_step = 0
    if cfg.resume:
        state, tensors = _read_trainer_state(ckpt_dir, len(optimizers))
        for i, opt in enumerate(optimizers):
            unflatten_optimizer(opt, f"opt{i}", {k: v.to(device) for k, v in tensors.items()}, state["optimizers"][i])
        start_step = state["step"]
        if start_step >= cfg.steps:
            raise PerseusError(f"{ckpt_dir} is already at step {start_step}: --steps must be larger to "
                               f"train more (got {cfg.steps})")
    for opt in optimizers:
        for g in opt.param_groups:
            g.setdefault("initial_lr", g["lr"])

    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        compile_layers(model)
    use_bf16 = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext

    n_params = model.num_parameters()
    flops_per_token = 3 * model_cfg.flops_per_token(cfg.seq_len // 2)  # fwd + bwd, mean context
    tokens_per_step = cfg.batch_size * cfg.seq_len * world
    log_path = out / "log.jsonl"
    if master:
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
            atomic_write(out / "tokenizer.json", tok_bytes)
            log = open(log_path, "a" if cfg.resume else "w")
        except OSError as e:
            raise PerseusError(f"cannot write the run folder {out}: {describe_oserror(e)}") from None
    bar = None
    if master and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"train {cfg.preset}/{cfg.arch}/{cfg.optimizer}",
                   dynamic_ncols=True)

    record: dict = {}
    t_last, tokens_since = time.perf_counter(), 0
    val_loss = float("nan")
    best = _best_so_far(out / "best") if cfg.resume and cfg.patience else None
    evals_without_best = 0
    early_stop = False
    stop = _StopAfterStep() if master and world == 1 else None
    done_steps = cfg.steps
    for step in range(start_step, cfg.steps):
        if stop is not None and stop.requested:
            done_steps = step
            break
        factor = lr_factor(step, cfg)
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * factor
        x, y = windows.torch_batch(step, device)
        loss, grad_norm = train_step(ddp_model, optimizers, x, y, autocast, cfg.grad_clip)
        balance = load_balance(model) if (step + 1) % cfg.log_every == 0 else None
        for r in model.routers():  # loads summed over ranks so every replica moves its bias alike
            if world > 1:
                dist.all_reduce(r.load)
            r.update_bias()
        tokens_since += tokens_per_step

        last = step + 1 == cfg.steps
        evaluating = (step + 1) % cfg.eval_every == 0 or last
        log_now = (step + 1) % cfg.log_every == 0 or evaluating
        if log_now:  # the global batch's loss, not just this rank's share
            mean_loss = loss.detach().clone()
            if world > 1:
                dist.all_reduce(mean_loss)
                mean_loss /= world
        if evaluating:
            # the global batch size: every process count scores the same windows of valid
            val_loss = evaluate(model, valid_tokens, cfg.seq_len, cfg.batch_size * world, cfg.eval_batches,
                                device, autocast)
            if cfg.patience:  # every rank scored the same windows, so every rank decides alike
                if best is None or val_loss < best["val_loss"]:
                    best, evals_without_best = {"step": step + 1, "val_loss": val_loss}, 0
                    if master:
                        save_checkpoint(out / "best", model, out / "tokenizer.json", meta={"params": n_params, **best})
                else:
                    evals_without_best += 1
                    early_stop = evals_without_best >= cfg.patience and step + 1 < cfg.steps
        if master and log_now:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            tok_s = tokens_since / (now - t_last)
            record = {"step": step + 1, "loss": round(mean_loss.item(), 5), "lr": optimizers[0].param_groups[0]["lr"],
                      "grad_norm": round(float(grad_norm), 4), "tokens": (step + 1) * tokens_per_step,
                      "tokens_per_s": round(tok_s, 1), "flops": (step + 1) * tokens_per_step * flops_per_token}
            if device.type == "cuda":
                record["mfu"] = round(tok_s * flops_per_token / (H100_BF16_PEAK * world), 4)
                record["max_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if balance is not None:
                record["expert_load_max_over_mean"] = [round(b, 3) for b in balance]
            if evaluating:
                record["val_loss"] = round(val_loss, 5)
            if early_stop:
                record["early_stop"] = f"no better valid loss in {cfg.patience} evaluations (best {best})"
            log.write(json.dumps(record) + "\n")
            log.flush()
            t_last, tokens_since = now, 0
        fault("train.step")
        if bar is not None:
            bar.update(1)
            if log_now:  # .item() waits for the GPU: only on log steps
                bar.set_postfix(loss=f"{mean_loss.item():.3f}", val=f"{val_loss:.3f}")
        if early_stop:
            done_steps = step + 1
            break
    if bar is not None:
        bar.close()
    if stop is not None:
        stop.restore()

    if master:
        save_training_checkpoint(ckpt_dir, model, out / "tokenizer.json", optimizers, cfg, n_params, done_steps)
        log.close()
        if early_stop:
            print(f"early stop at step {done_steps}: the valid loss last improved at step {best['step']} "
                  f"({best['val_loss']:.4f}, saved in {out / 'best'})", file=sys.stderr)
        elif done_steps < cfg.steps:
            print(f"interrupted: checkpoint of step {done_steps} saved in {ckpt_dir}; "
                  f"continue with --resume", file=sys.stderr)
            raise KeyboardInterrupt
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"final_loss": record.get("loss"), "val_loss": val_loss, "params": n_params, "out": str(out),
            "best": best, "steps": done_steps}


def _best_so_far(folder: Path) -> dict | None:
    """The best evaluation an earlier part of a resumed run saved in OUT/best (None: none yet)."""
    from perseus_edge.manifest import read_manifest

    if not (folder / "manifest.json").is_file():
        return None
    meta = read_manifest(folder)
    if not (isinstance(meta.get("step"), int) and isinstance(meta.get("val_loss"), (int, float))):
        raise PerseusError(f"{folder}/manifest.json does not record the step and valid loss of the best weights")
    return {"step": meta["step"], "val_loss": float(meta["val_loss"])}


class _StopAfterStep:
    """First Ctrl-C: finish the current step, save a resumable checkpoint, stop. Second: abort."""

    def __init__(self):
        import signal
        import threading

        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _read_trainer_state(ckpt_dir: Path, n_optimizers: int) -> tuple[dict, dict]:
    """trainer_state.json and optimizer.safetensors of a checkpoint (sha256-verified on load)."""
    path = ckpt_dir / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
        tensors = load_file(ckpt_dir / "optimizer.safetensors")
    except (OSError, UnicodeDecodeError, ValueError, SafetensorError) as e:
        raise PerseusError(f"cannot resume from {ckpt_dir}: {e}") from None
    if not (isinstance(state, dict) and isinstance(state.get("step"), int)
            and isinstance(state.get("optimizers"), list) and len(state["optimizers"]) == n_optimizers):
        raise PerseusError(f"cannot resume from {ckpt_dir}: trainer_state.json does not match "
                           f"{n_optimizers} optimizer(s) (was the run made with another --optimizer?)")
    return state, tensors


def save_training_checkpoint(folder: Path, model: PerseusLM, tokenizer: Path, optimizers, cfg: TrainConfig,
                             n_params: int, step: int | None = None) -> None:
    """Checkpoint folder plus optimizer.safetensors and trainer_state.json for --resume."""
    import tempfile

    step = cfg.steps if step is None else step
    tensors, metas = {}, []
    for i, opt in enumerate(optimizers):
        t, meta = flatten_optimizer(opt, f"opt{i}")
        tensors.update(t)
        metas.append(meta)
    try:
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".trainer-") as tmp:
            opt_file = Path(tmp) / "optimizer.safetensors"
            save_file(tensors, opt_file)
            state_file = Path(tmp) / "trainer_state.json"
            state_file.write_text(json.dumps({"step": step, "optimizers": metas,
                                              "train_config": dataclasses.asdict(cfg)}, indent=2))
            save_checkpoint(folder, model, tokenizer, meta={"params": n_params, "step": step},
                            extra_files={"optimizer.safetensors": opt_file, "trainer_state.json": state_file})
    except (OSError, SafetensorError) as e:
        why = describe_oserror(e) if isinstance(e, OSError) else str(e)
        raise PerseusError(f"cannot write the checkpoint {folder}: {why}") from None
