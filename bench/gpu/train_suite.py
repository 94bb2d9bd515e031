"""GPU training suite (issue 4): probe throughput, LR sweeps Muon vs AdamW, architecture comparison.

Runs on the lent H100 through the `device` tool (see bench/gpu/README.md for the exact calls).
Every training run is a plain `perseus train ...` command, recorded in runs.jsonl with its
wall time, so each row of the report can be reproduced by hand. Several small runs share the
GPU at once (one small MoE run leaves most of an H100 idle); throughput and MFU are measured
separately, one run at a time, in the `probe` stage.

    python bench/gpu/train_suite.py probe   --out $OUT/suite
    python bench/gpu/train_suite.py sweep   --preset 17m --budget-s 240 --out $OUT/suite
    python bench/gpu/train_suite.py arch    --preset 54m --lr 3e-3 --budget-s 300 --out $OUT/suite
    python bench/gpu/train_suite.py package --run DIR --pieces-out $OUT   (checkpoint -> bf16 shards -> tar pieces)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

BATCH, SEQ = 64, 256
TOKENS_PER_STEP = BATCH * SEQ
LRS = (1e-3, 3e-3, 1e-2)


def command(out: Path, preset: str, arch: str, optimizer: str, lr: float, steps: int, compile_: bool = False,
            eval_every: int | None = None) -> list[str]:
    cmd = ["perseus", "train", "--preset", preset, "--arch", arch, "--optimizer", optimizer,
           "--lr", f"{lr:g}", "--adam-lr", f"{lr:g}", "--batch-size", str(BATCH), "--seq-len", str(SEQ),
           "--steps", str(steps), "--warmup", str(max(10, steps // 20)),
           "--eval-every", str(eval_every or max(20, steps // 8)), "--eval-batches", "16", "-o", str(out)]
    return cmd + (["--compile"] if compile_ else [])


def launch(runs: list[tuple[str, list[str]]], root: Path, deadline_s: float) -> None:
    """Start every run at once, wait for all (killing any still alive at the deadline)."""
    procs = []
    for name, cmd in runs:
        (root / name).mkdir(parents=True, exist_ok=True)
        log = open(root / name / "stdout.txt", "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        procs.append((name, cmd, subprocess.Popen(_exe(cmd), stdout=log, stderr=subprocess.STDOUT, env=env),
                      time.time()))
    end = time.time() + deadline_s
    with open(root / "runs.jsonl", "a") as book:
        for name, cmd, p, t0 in procs:
            try:
                rc = p.wait(timeout=max(1.0, end - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                rc = "killed at deadline"
            book.write(json.dumps({"name": name, "command": shlex.join(cmd), "rc": rc,
                                   "wall_s": round(time.time() - t0, 1), "concurrent": len(procs)}) + "\n")
            print(f"{name}: rc={rc} {time.time() - t0:.0f}s", flush=True)


def _exe(cmd: list[str]) -> list[str]:
    return [sys.executable, "-m", "perseus_edge.cli", *cmd[1:]]


def last_record(run_dir: Path, key: str) -> dict | None:
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if key in r]
    return rows[-1] if rows else None


def probe(root: Path, compile_: bool = False) -> None:
    """Solo throughput and MFU per preset (short runs); with compile_, torch.compile on as well."""
    results = []
    for preset in ("17m", "54m"):
        for comp in ((False, True) if compile_ else (False,)):
            name = f"probe-{preset}-{'compile' if comp else 'eager'}"
            launch([(name, command(root / name, preset, "moe-mla-rope", "muon", 3e-3, 40, comp, 1000))], root,
                   240 if comp else 90)
            rec = last_record(root / name, "tokens_per_s")
            results.append({"preset": preset, "compile": comp, **(rec or {})})
            print(json.dumps(results[-1]), flush=True)
    (root / "probe.json").write_text(json.dumps(results, indent=2))


def solo_tok_s(root: Path, preset: str) -> float:
    data = json.loads((root / "probe.json").read_text())
    return max(r.get("tokens_per_s", 0) for r in data if r["preset"] == preset and not r["compile"])


def steps_for(root: Path, preset: str, n_runs: int, budget_s: float, speedup: float) -> int:
    """Steps that N concurrent runs finish in budget_s if sharing the GPU gives `speedup` x solo."""
    agg = solo_tok_s(root, preset) * min(speedup, n_runs)
    return max(50, int(budget_s * agg / n_runs / TOKENS_PER_STEP) // 10 * 10)


def sweep(root: Path, preset: str, budget_s: float, speedup: float, steps: int | None = None) -> None:
    runs = []
    steps = steps or steps_for(root, preset, 2 * len(LRS), budget_s, speedup)
    for opt in ("muon", "adamw"):
        for lr in LRS:
            name = f"{preset}-moe-mla-rope-{opt}-lr{lr:g}"
            runs.append((name, command(root / name, preset, "moe-mla-rope", opt, lr, steps)))
    print(f"sweep {preset}: {len(runs)} runs x {steps} steps ({steps * TOKENS_PER_STEP / 1e6:.1f}M tokens each)", flush=True)
    launch(runs, root, budget_s * 1.6)


def arch(root: Path, preset: str, lr: float, budget_s: float, speedup: float, archs: list[str]) -> None:
    steps = steps_for(root, preset, len(archs), budget_s, speedup)
    runs = [(f"{preset}-{a}-muon-lr{lr:g}", command(root / f"{preset}-{a}-muon-lr{lr:g}", preset, a, "muon", lr, steps))
            for a in archs]
    print(f"arch {preset}: {len(runs)} runs x {steps} steps", flush=True)
    launch(runs, root, budget_s * 1.6)


def suite(root: Path, budget_s: float, speedup: float, arch_lr: float) -> None:
    """One wave on the shared GPU: 17m LR sweep (Muon, AdamW), 54m Muon vs AdamW, 54m architectures."""
    plan = [("17m", "moe-mla-rope", opt, lr) for opt in ("muon", "adamw") for lr in LRS]
    # 54m: one lr per optimizer (device budget), the architectures at the same lr and tokens
    plan += [("54m", "moe-mla-rope", opt, arch_lr) for opt in ("muon", "adamw")]
    plan += [("54m", a, "muon", arch_lr) for a in ("mla-dense", "mha")]
    steps = {p: steps_for(root, p, len(plan), budget_s, speedup) for p in ("17m", "54m")}
    runs = []
    for preset, a, opt, lr in plan:
        name = f"{preset}-{a}-{opt}-lr{lr:g}"
        runs.append((name, command(root / name, preset, a, opt, lr, steps[preset])))
    print(f"suite: {len(runs)} concurrent runs, steps {steps} x {TOKENS_PER_STEP} tokens", flush=True)
    launch(runs, root, budget_s * 1.6)


def best_run(root: Path, preset: str, arch_name: str = "moe-mla-rope") -> Path:
    best, best_loss = None, math.inf
    for d in root.glob(f"{preset}-{arch_name}-*"):
        rec = last_record(d, "val_loss")
        if rec and (d / "checkpoint" / "manifest.json").is_file() and rec["val_loss"] < best_loss:
            best, best_loss = d, rec["val_loss"]
    if best is None:
        raise SystemExit(f"no finished {preset} {arch_name} run under {root}")
    print(f"best {preset} {arch_name}: {best.name} val_loss={best_loss}", flush=True)
    return best


def package(run: Path, pieces_out: Path, first: int, count: int) -> None:
    """Re-save a run's checkpoint as bf16 shards (<= 15 MiB), tar it, and copy pieces [first, first+count)."""
    from perseus_edge.checkpoint import load_checkpoint, save_checkpoint

    stage = Path("/tmp/package") / run.name
    if not stage.exists():
        model, tok = load_checkpoint(run / "checkpoint")
        save_checkpoint(stage / "model", model, tok, dtype="bf16", max_shard_bytes=15 * 2**20,
                        meta={"source_run": run.name})
        subprocess.run(["tar", "-cf", str(stage / "model.tar"), "-C", str(stage), "model"], check=True)
        subprocess.run(["split", "-b", "15M", "-d", "-a", "2", str(stage / "model.tar"), str(stage / "piece.")], check=True)
    pieces = sorted(stage.glob("piece.*"))
    print(f"{run.name}: {len(pieces)} pieces", flush=True)
    pieces_out.mkdir(parents=True, exist_ok=True)
    for p in pieces[first:first + count]:
        subprocess.run(["cp", str(p), str(pieces_out / f"{run.name}.{p.name}")], check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["probe", "sweep", "arch", "suite", "best", "package"])
    ap.add_argument("--compile", action="store_true", help="probe: also measure torch.compile")
    ap.add_argument("--out", type=Path, default=Path("runs/suite"))
    ap.add_argument("--preset", default="17m")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--archs", default="moe-mla-rope,mla-dense,mha,mha-moe")
    ap.add_argument("--steps", type=int, help="sweep: fixed steps instead of the probe-based estimate")
    ap.add_argument("--run", type=Path)
    ap.add_argument("--pieces-out", type=Path)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, default=99)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.stage == "probe":
        probe(a.out, a.compile)
    elif a.stage == "suite":
        suite(a.out, a.budget_s, a.speedup, a.lr)
    elif a.stage == "sweep":
        sweep(a.out, a.preset, a.budget_s, a.speedup, a.steps)
    elif a.stage == "arch":
        arch(a.out, a.preset, a.lr, a.budget_s, a.speedup, a.archs.split(","))
    elif a.stage == "best":
        print(best_run(a.out, a.preset))
    elif a.stage == "package":
        package(a.run or best_run(a.out, a.preset), a.pieces_out, a.first, a.count)


if __name__ == "__main__":
    main()
