"""GPU reference: PyTorch eager and torch.compile on CUDA, same prompts as the CPU benchmark.

On the GPU machine (repo checkout, torch with CUDA):

    python studies/cpu/gpu_reference.py --checkpoint perseus_edge/assets/default \\
        --device cuda --compile --out gpu_reference.json
    # -> gpu_reference.json (tok/s for pp / tg, eager and compiled) and gpu_reference.npz (logits)

Back on the CPU machine, parity of the GPU logits against the torch-free ONNX runtime:

    python studies/cpu/gpu_reference.py --compare gpu_reference.npz --onnx MODEL_DIR [--onnx MODEL_DIR2 ...]

Here (no GPU), the CPU side of the same check, PyTorch eager on the CPU vs the ONNX runtime:

    python studies/cpu/gpu_reference.py --checkpoint perseus_edge/assets/default --device cpu \\
        --onnx MODEL_DIR --out studies/results/cpu/parity.json

Timing: `torch_speed` runs every test once untimed (for torch.compile: compilation and its
recompiles for new shapes) before `--reps` timed repetitions; CUDA is synchronised around each
timed region. Output JSON: {"speed": {"eager": [...], "compile": [...]}, "parity": {...}} with
the benchmark's record keys (test, n_tokens, context, tok_s_median/min/max).

What is compared, per prompt (`prompts.prompt_ids`, the benchmark's prompt text cut into
`--prompts` consecutive windows of `--prompt-len` tokens):
  prefill      logits of every prompt position (max |diff|)
  decode       `--steps` greedy steps of the reference; the ONNX runtime is teacher-forced on the
               reference's tokens, so every step compares logits at the same history
               (max |diff|, and greedy agreement = fraction of steps whose argmax is the same)
  free run     the ONNX runtime's own greedy continuation: how many leading tokens equal the
               reference's (a single flip changes everything after it, so this is a strict test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the checkout's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def make_prompts(tokenizer_path: str | Path, n_prompts: int, length: int) -> list[list[int]]:
    from perseus_edge.bench.prompts import prompt_ids

    ids = prompt_ids(tokenizer_path, n_prompts * length)
    return [ids[i * length:(i + 1) * length] for i in range(n_prompts)]


# ----------------------------------------------------------------------------- PyTorch side
def torch_reference(model, prompts: list[list[int]], steps: int, device: str) -> list[dict]:
    """Prefill logits and `steps` greedy decode steps (tokens + logits) per prompt."""
    import torch

    out = []
    with torch.inference_mode():
        for p in prompts:
            logits, cache = model(torch.tensor([p], device=device), use_cache=True)
            prefill = logits[0].float().cpu().numpy()
            tokens, step_logits = [], []
            last = logits[0, -1]
            for _ in range(steps):
                tok = int(last.argmax())
                tokens.append(tok)
                logits, cache = model(torch.tensor([[tok]], device=device), cache)
                last = logits[0, -1]
                step_logits.append(last.float().cpu().numpy())
            out.append({"prompt": p, "prefill": prefill, "tokens": tokens, "steps": np.stack(step_logits)})
    return out


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def torch_speed(model, prompt: list[int], pp: list[int], tg: int, contexts: list[int], reps: int,
                device: str) -> list[dict]:
    """tok/s of prefill (pp) and decode (tg at each context) on `device`; median/min/max of reps."""
    import torch

    rows = []
    with torch.inference_mode():
        for n in pp:
            ids = torch.tensor([prompt[:n]], device=device)
            model(ids, use_cache=True)
            _sync(device)
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                model(ids, use_cache=True)
                _sync(device)
                ts.append(n / (time.perf_counter() - t0))
            rows.append({"test": "pp", "n_tokens": n, "context": 0, **_stats(ts)})
        for ctx in contexts:
            logits, cache0 = model(torch.tensor([prompt[:ctx]], device=device), use_cache=True)
            ts = []
            for r in range(reps + 1):
                cache, tok = cache0, int(logits[0, -1].argmax())
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(tg):
                    out, cache = model(torch.tensor([[tok]], device=device), cache)
                    tok = int(out[0, -1].argmax())  # the sync a generate loop has anyway
                _sync(device)
                if r:
                    ts.append(tg / (time.perf_counter() - t0))
            rows.append({"test": "tg", "n_tokens": tg, "context": ctx, **_stats(ts)})
    return rows


def _stats(ts: list[float]) -> dict:
    return {"tok_s_median": statistics.median(ts), "tok_s_min": min(ts), "tok_s_max": max(ts), "tok_s": ts}


# ----------------------------------------------------------------------------- ONNX side
def onnx_compare(model_dir: str | Path, reference: list[dict], threads: int = 1) -> dict:
    """The ONNX runtime on the reference's prompts: logits differences and greedy agreement."""
    from perseus_edge.runtime.model import Model

    model = Model(model_dir, threads=threads, verify=False)
    pre, dec, agree, total, free = 0.0, 0.0, 0, 0, []
    for ref in reference:
        p = np.asarray([ref["prompt"]], np.int64)
        logits = model.forward(p, 0)[0]
        pre = max(pre, float(np.abs(logits - ref["prefill"]).max()))
        pos = p.shape[1]
        last = logits[-1]
        for i, tok in enumerate(ref["tokens"]):  # teacher-forced on the reference's tokens
            agree += int(int(last.argmax()) == tok)
            total += 1
            step = model.forward(np.asarray([[tok]], np.int64), pos + i)[0, -1].copy()
            dec = max(dec, float(np.abs(step - ref["steps"][i]).max()))
            last = step
        # free-running greedy continuation of the runtime itself
        last = logits[-1]
        same = 0
        for i, tok in enumerate(ref["tokens"]):
            mine = int(last.argmax())
            if mine != tok:
                break
            same += 1
            last = model.forward(np.asarray([[mine]], np.int64), pos + i)[0, -1].copy()
        free.append(same)
    return {"model_dir": str(model_dir), "prefill_max_abs_diff": pre, "decode_max_abs_diff": dec,
            "greedy_agreement": agree / total if total else 1.0, "steps": total,
            "free_run_identical_prefix": free, "free_run_steps": len(reference[0]["tokens"]) if reference else 0}


def cpu_parity(checkpoint: str | Path, folders: dict, n_prompts: int = 3, prompt_len: int = 64,
               steps: int = 16, threads: int = 1) -> dict:
    """PyTorch eager on the CPU vs the ONNX runtime for each folder ({label: model dir})."""
    import torch

    from perseus_edge.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    model, tok = load_checkpoint(checkpoint, verify=False)
    prompts = make_prompts(tok, n_prompts, prompt_len)
    ref = torch_reference(model, prompts, steps, "cpu")
    return {"checkpoint": str(checkpoint), "reference": "pytorch eager fp32 cpu", "prompts": n_prompts,
            "prompt_len": prompt_len, "steps": steps,
            "folders": {label: onnx_compare(p, ref, threads) for label, p in folders.items()}}


def save_reference(path: Path, ref: list[dict]) -> None:
    arrays = {}
    for i, r in enumerate(ref):
        arrays[f"prompt{i}"] = np.asarray(r["prompt"], np.int64)
        arrays[f"prefill{i}"] = r["prefill"].astype(np.float32)
        arrays[f"tokens{i}"] = np.asarray(r["tokens"], np.int64)
        arrays[f"steps{i}"] = r["steps"].astype(np.float32)
    np.savez_compressed(path, **arrays)


def load_reference(path: Path) -> list[dict]:
    data = np.load(path)
    n = len([k for k in data.files if k.startswith("prompt")])
    return [{"prompt": data[f"prompt{i}"].tolist(), "prefill": data[f"prefill{i}"],
             "tokens": data[f"tokens{i}"].tolist(), "steps": data[f"steps{i}"]} for i in range(n)]


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="PyTorch reference (CUDA or CPU): speed and logits parity")
    ap.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: the shipped 17m)")
    ap.add_argument("--device", default="cuda", help="cuda | cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(dynamic=True)")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16, help="greedy steps compared")
    ap.add_argument("--pp", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--contexts", type=int, nargs="+", default=[16, 256, 512, 900])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch on cpu, and the ONNX runtime)")
    ap.add_argument("--onnx", type=Path, action="append", default=[], help="model folder(s) to compare")
    ap.add_argument("--compare", type=Path, help="a saved reference .npz (from the GPU run) to compare --onnx against")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("gpu_reference.json"))
    args = ap.parse_args(argv)

    if args.compare:
        ref = load_reference(args.compare)
        result = {"reference": str(args.compare),
                  "folders": {str(p): onnx_compare(p, ref, args.threads) for p in args.onnx}}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return

    import torch

    from studies.cpu.harness import DEFAULT_CHECKPOINT
    from perseus_edge.bench.prompts import prompt_ids
    from perseus_edge.checkpoint import load_checkpoint

    ckpt = args.checkpoint or DEFAULT_CHECKPOINT
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for the CPU-side parity check")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model, tok = load_checkpoint(ckpt, device=args.device, verify=False)
    prompts = make_prompts(tok, args.prompts, args.prompt_len)
    result = {"checkpoint": str(ckpt), "device": args.device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "prompts": args.prompts, "prompt_len": args.prompt_len, "steps": args.steps}
    ref = torch_reference(model, prompts, args.steps, args.device)
    npz = args.out.with_suffix(".npz")
    save_reference(npz, ref)
    result["logits"] = str(npz)
    if not args.no_speed:
        long_prompt = prompt_ids(tok, max(args.pp + args.contexts) + 1)
        result["speed"] = {"eager": torch_speed(model, long_prompt, args.pp, args.tg, args.contexts,
                                                args.reps, args.device)}
        if args.compile:
            # the cache grows every step and the MoE's routing is data-dependent: allow the
            # recompiles instead of silently falling back to eager after the default 8
            for name in ("cache_size_limit", "recompile_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, 256)
            compiled = torch.compile(model, dynamic=True)
            result["speed"]["compile"] = torch_speed(compiled, long_prompt, args.pp, args.tg, args.contexts,
                                                     args.reps, args.device)
    if args.onnx:
        result["parity"] = {str(p): onnx_compare(p, ref, args.threads) for p in args.onnx}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "speed"}, indent=2))


if __name__ == "__main__":
    main()
