"""GPU training suite (issue 4): correctness check, throughput probes, calibrated training waves.

Runs on the lent GPU machine through the `device` tool (studies/gpu/README.md has the exact calls).
Every training run is a plain `perseus train ...` command, recorded in runs.jsonl with its exit
status, so each row of the report can be reproduced by hand.

    python3 studies/gpu/train_suite.py prepare                      # tokenize train + valid once
    python3 studies/gpu/train_suite.py check                        # GPU-only paths equal their references
    python3 studies/gpu/train_suite.py probe --out DIR [--compile]  # solo tokens/s, MFU, memory per config
    python3 studies/gpu/train_suite.py wave --preset 17m --muon-lrs 1e-3,1e-2 --adamw-lrs 1e-3 --budget-s 300 --out DIR
    python3 studies/gpu/train_suite.py campaign --out DIR --batch 128 --specs 54m:mha:muon:3e-3:1600,...
        [--train-args="--compile --patience 3"] ["--moe-args=--router-bias-rate 3e-3"]  # start them, return
    python3 studies/gpu/train_suite.py watch --out DIR --limit-s 440  # follow them from a later call
    python3 studies/gpu/train_suite.py score --out DIR                # test loss of each run's OUT/best
    python3 studies/gpu/train_suite.py package --preset 17m --out DIR --pieces-out $OUT [--first i --count n]

A wave trains several runs at once on the one GPU (a small model leaves most of an H100 idle).
It first *calibrates*: all its runs together for 20 steps, which measures each run's tokens/s under
exactly that sharing and fails fast (CUDA errors, OOM) before the budget is spent. Then every run
of a preset gets the same step count (Muon vs AdamW and the architectures see the same tokens and
schedule shape), sized so the slowest run of the preset fits the budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

BATCH, SEQ = 32, 512
TOKENS_PER_STEP = BATCH * SEQ
LOG_EVERY = 10  # perseus train logs every 10 steps; eval steps must be multiples of it
CALIBRATION_STEPS = 20
MUON_ADAM_LR = 3e-3  # Muon runs: AdamW lr of embeddings, head, norms, router (the sweep varies the Muon lr)


def command(out: Path, preset: str, arch: str, optimizer: str, lr: float, steps: int,
            eval_every: int | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    adam_lr = MUON_ADAM_LR if optimizer == "muon" else lr
    eval_every = eval_every or max(LOG_EVERY, steps // 10 // LOG_EVERY * LOG_EVERY)
    return ["perseus", "train", "--preset", preset, "--arch", arch, "--optimizer", optimizer,
            "--lr", f"{lr:g}", "--adam-lr", f"{adam_lr:g}", "--batch-size", str(BATCH), "--seq-len", str(SEQ),
            "--steps", str(steps), "--warmup", str(max(10, steps // 20)), "--eval-every", str(eval_every),
            "--eval-batches", "16", *extra, "-o", str(out)]


def start(runs: list[tuple[str, list[str]]], root: Path) -> None:
    """Start every run in its own session (it outlives the device call that started it), pids in
    root/pids.json; `watch` follows them in later calls of the same warm machine."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    pid_file = root / "pids.json"
    pids = json.loads(pid_file.read_text()) if pid_file.is_file() else {}  # several campaigns in one root
    with open(root / "runs.jsonl", "a") as book:
        for name, cmd in runs:
            (root / name).mkdir(parents=True, exist_ok=True)
            log = open(root / name / "stdout.txt", "w")
            exe = [sys.executable, "-m", "perseus_edge.cli", *cmd[1:]]
            pids[name] = subprocess.Popen(exe, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True).pid
            book.write(json.dumps({"name": name, "command": shlex.join(cmd), "concurrent": len(runs)}) + "\n")
    pid_file.write_text(json.dumps(pids))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not reaped) counts as finished
        return f.read().split(")")[-1].split()[0] != "Z"


def watch(root: Path, limit_s: float, every_s: float = 60) -> bool:
    """Print each run's latest log line (and the GPU's memory and load) every `every_s` until all
    finished or `limit_s` passed."""
    pids = json.loads((root / "pids.json").read_text())
    end = time.time() + limit_s
    while True:
        running = [n for n, pid in pids.items() if alive(pid)]
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else "-"
        print(f"-- {time.strftime('%H:%M:%S')} GPU {gpu}", flush=True)
        for name in pids:
            last = (records(root / name, "step") or [{}])[-1]
            print(f"{name}: {'running' if name in running else 'finished'} step {last.get('step')} "
                  f"loss {last.get('loss')} val {last.get('val_loss')} tok/s {last.get('tokens_per_s')}", flush=True)
        if not running or time.time() > end:
            return not running
        time.sleep(min(every_s, max(1.0, end - time.time())))


def launch(runs: list[tuple[str, list[str]]], root: Path, deadline_s: float) -> dict[str, object]:
    """Start every run at once, wait for all (killing any still alive at the deadline): name -> rc."""
    procs = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for name, cmd in runs:
        (root / name).mkdir(parents=True, exist_ok=True)
        log = open(root / name / "stdout.txt", "w")
        exe = [sys.executable, "-m", "perseus_edge.cli", *cmd[1:]]
        procs.append((name, cmd, subprocess.Popen(exe, stdout=log, stderr=subprocess.STDOUT, env=env), time.time()))
    end = time.time() + deadline_s
    status: dict[str, object] = {}
    with open(root / "runs.jsonl", "a") as book:
        for name, cmd, p, t0 in procs:
            try:
                rc = p.wait(timeout=max(1.0, end - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                rc = "killed at deadline"
            status[name] = rc
            book.write(json.dumps({"name": name, "command": shlex.join(cmd), "rc": rc,
                                   "concurrent": len(procs)}) + "\n")
            print(f"{name}: rc={rc} {time.time() - t0:.0f}s", flush=True)
    return status


def records(run_dir: Path, key: str) -> list[dict]:
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return []
    return [r for r in map(json.loads, log.read_text().splitlines()) if key in r]


# ----------------------------------------------------------------------------- stages
def prepare() -> None:
    from perseus_edge.data import resolve_data_dir, token_cache_dir, tokenize_split
    from perseus_edge.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

    tok = load_tokenizer(DEFAULT_TOKENIZER)
    for split in ("valid", "train"):
        t0 = time.time()
        n = len(tokenize_split(tok, resolve_data_dir(), split, token_cache_dir(), progress=False))
        print(f"{split}: {n} tokens ({time.time() - t0:.0f}s)", flush=True)


def check() -> None:
    """The CUDA-only code paths against their CPU-tested references, on the GPU, in seconds."""
    import torch

    from perseus_edge.model.config import preset
    from perseus_edge.model.transformer import MoE
    from perseus_edge.optim import GroupedMuon
    from perseus_edge.train import NS_COEFFICIENTS

    dev = torch.device("cuda")
    torch.manual_seed(0)
    moe = MoE(preset("54m")).to(dev).train()
    x = torch.randn(4096, moe.cfg.hidden_size, device=dev)
    weights, idx = moe.gate(x)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        loop, grouped = moe.routed(x, weights, idx), moe.routed_grouped(x, weights, idx)
    err = float((loop.float() - grouped.float()).abs().max() / loop.float().abs().max())
    print(f"grouped-GEMM experts vs per-expert loop (bf16): max rel err {err:.2e}", flush=True)
    assert err < 2e-2, err

    params = [torch.nn.Parameter(torch.randn(46, 512, device=dev) * 0.02) for _ in range(8)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(lr=1e-2, momentum=0.95, nesterov=True, ns_coefficients=NS_COEFFICIENTS, adjust_lr_fn="match_rms_adamw")
    ours, ref = GroupedMuon(params, **kw), torch.optim.Muon(twins, **kw)
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    err = max(float((p - q).abs().max()) for p, q in zip(params, twins))
    print(f"GroupedMuon vs torch.optim.Muon (3 steps): max abs diff {err:.2e}", flush=True)
    assert err < 1e-3, err


def probe(root: Path, compile_: bool, configs: list[str]) -> None:
    """Solo throughput per config `preset:arch:optimizer[:torch]`, each in its own process under a timeout."""
    out = root / "probe.jsonl"
    for spec in configs:
        preset, arch_name, optimizer, *impl = spec.split(":")
        for comp in ((False, True) if compile_ else (False,)):
            cmd = [sys.executable, "studies/gpu/throughput.py", "--preset", preset, "--arch", arch_name,
                   "--optimizer", optimizer, "--batch", str(BATCH), "--seq-len", str(SEQ), "--out", str(out)]
            cmd += ["--muon-impl", impl[0]] if impl else []
            cmd += ["--compile"] if comp else []
            t0 = time.time()
            try:
                rc = subprocess.run(cmd, timeout=240 if comp else 120).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0:
                with open(out, "a") as f:
                    f.write(json.dumps({"preset": preset, "arch": arch_name, "optimizer": optimizer,
                                        "compile": comp, "failed": rc, "after_s": round(time.time() - t0)}) + "\n")
                print(f"probe {spec} compile={comp}: {rc}", flush=True)


def wave(root: Path, preset: str, muon_lrs: list[float], adamw_lrs: list[float], archs: list[str],
         arch_lr: float, budget_s: float) -> None:
    plan = [(preset, "moe-mla-rope", "muon", lr) for lr in muon_lrs]
    plan += [(preset, "moe-mla-rope", "adamw", lr) for lr in adamw_lrs]
    plan += [(preset, a, "muon", arch_lr) for a in archs]
    names = [f"{p}-{a}-{o}-lr{lr:g}" for p, a, o, lr in plan]

    cal = root / f"calibrate-{preset}"
    status = launch([(n, command(cal / n, p, a, o, lr, CALIBRATION_STEPS, eval_every=10**6))
                     for n, (p, a, o, lr) in zip(names, plan)], cal, 240)
    rates = {n: (records(cal / n, "tokens_per_s") or [{}])[-1].get("tokens_per_s") for n in names}
    bad = {n: status[n] for n in names if status[n] != 0 or not rates[n]}
    if bad:
        raise SystemExit(f"calibration failed, wave not started: {bad} (see {cal}/*/stdout.txt)")
    slowest = min(rates.values())
    steps = max(50, int(0.85 * budget_s * slowest / TOKENS_PER_STEP) // LOG_EVERY * LOG_EVERY)
    print(f"wave {preset}: {len(plan)} runs x {steps} steps ({steps * TOKENS_PER_STEP / 1e6:.1f}M tokens each); "
          f"calibrated tokens/s under sharing: {json.dumps(rates)}", flush=True)
    (root / f"wave-{preset}.json").write_text(json.dumps({"steps": steps, "budget_s": budget_s,
                                                           "calibrated_tokens_per_s": rates}, indent=2))
    launch([(n, command(root / n, p, a, o, lr, steps)) for n, (p, a, o, lr) in zip(names, plan)], root,
           1.4 * budget_s)


def campaign(root: Path, specs: list[str], extra: tuple[str, ...], moe_extra: tuple[str, ...]) -> None:
    """Start one run per spec `preset:arch:optimizer:lr:steps` at once (see `start`)."""
    runs = []
    for spec in specs:
        preset, arch_name, optimizer, lr, steps = spec.split(":")
        name = f"{preset}-{arch_name}-{optimizer}-lr{float(lr):g}"
        more = extra + (moe_extra if "moe" in arch_name else ())
        runs.append((name, command(root / name, preset, arch_name, optimizer, float(lr), int(steps), extra=more)))
    start(runs, root)
    print(f"started {len(runs)} runs: {', '.join(n for n, _ in runs)}", flush=True)


def score(root: Path, seq_len: int = 256) -> None:
    """Test loss of every run's kept weights (OUT/best if the run kept one, else its checkpoint),
    fp32 (on the GPU there) over the windows `perseus eval --split test` scores -> root/test_ppl.jsonl."""
    import torch

    from perseus_edge.checkpoint import load_checkpoint
    from perseus_edge.data import resolve_data_dir, token_cache_dir, tokenize_split
    from perseus_edge.tokenizer import DEFAULT_TOKENIZER, load_tokenizer
    from perseus_edge.train import evaluate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = tokenize_split(load_tokenizer(DEFAULT_TOKENIZER), resolve_data_dir(), "test", token_cache_dir(),
                            progress=False)
    with open(root / "test_ppl.jsonl", "w") as out:
        for run in sorted(p.parent for p in root.glob("*/log.jsonl")):
            folder = run / "best" if (run / "best" / "manifest.json").is_file() else run / "checkpoint"
            if not (folder / "manifest.json").is_file():
                continue
            model, _ = load_checkpoint(folder)
            loss = evaluate(model.to(device), tokens, seq_len, 8, None, device)
            row = {"run": run.name, "weights": folder.name, "split": "test", "seq_len": seq_len,
                   "tokens": (len(tokens) - 1) // seq_len * seq_len, "loss": loss, "ppl": math.exp(loss),
                   "step": json.loads((folder / "manifest.json").read_text()).get("step")}
            out.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


def best_run(root: Path, preset: str, arch_name: str = "moe-mla-rope") -> Path:
    best, best_loss = None, math.inf
    for d in sorted(root.glob(f"{preset}-{arch_name}-*")):
        rows = records(d, "val_loss")
        kept = min((r["val_loss"] for r in rows), default=math.inf) if (d / "best").is_dir() else \
            (rows[-1]["val_loss"] if rows else math.inf)
        if (d / "checkpoint" / "manifest.json").is_file() and kept < best_loss:
            best, best_loss = d, kept
    if best is None:
        raise SystemExit(f"no finished {preset} {arch_name} run under {root}")
    print(f"best {preset} {arch_name}: {best.name} val_loss={best_loss}", flush=True)
    return best


def package(run: Path, pieces_out: Path, first: int, count: int) -> None:
    """Re-save a run's checkpoint as bf16 shards (<= 15 MiB), tar it, copy tar pieces [first, first+count)."""
    from perseus_edge.checkpoint import load_checkpoint, save_checkpoint

    stage = Path("/tmp/package") / run.name
    if not stage.exists():
        model, tok = load_checkpoint(run / "best" if (run / "best" / "manifest.json").is_file() else run / "checkpoint")
        save_checkpoint(stage / "model", model, tok, dtype="bf16", max_shard_bytes=15 * 2**20,
                        meta={"source_run": run.name})
        subprocess.run(["tar", "-cf", str(stage / "model.tar"), "-C", str(stage), "model"], check=True)
        subprocess.run(["split", "-b", "15M", "-d", "-a", "2", str(stage / "model.tar"), str(stage / "piece.")],
                       check=True)
    pieces = sorted(stage.glob("piece.*"))
    print(f"{run.name}: {len(pieces)} pieces, copying {first}..{min(len(pieces), first + count) - 1}", flush=True)
    pieces_out.mkdir(parents=True, exist_ok=True)
    for p in pieces[first:first + count]:
        subprocess.run(["cp", str(p), str(pieces_out / f"{run.name}.{p.name}")], check=True)


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main() -> None:
    global BATCH, SEQ, TOKENS_PER_STEP
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["prepare", "check", "probe", "wave", "campaign", "watch", "score", "best",
                                      "package"])
    ap.add_argument("--specs", default="", help="campaign: preset:arch:optimizer:lr:steps list")
    ap.add_argument("--train-args", default="", help="campaign: more `perseus train` flags for every run")
    ap.add_argument("--moe-args", default="", help="campaign: more `perseus train` flags for MoE runs")
    ap.add_argument("--limit-s", type=float, default=500, help="watch: return after this many seconds")
    ap.add_argument("--out", type=Path, default=Path("runs/suite"))
    ap.add_argument("--preset", default="17m")
    ap.add_argument("--compile", action="store_true", help="probe: also with torch.compile (regional)")
    ap.add_argument("--configs", default="17m:moe-mla-rope:muon,17m:moe-mla-rope:muon:torch,54m:moe-mla-rope:muon",
                    help="probe: preset:arch:optimizer[:torch] list")
    ap.add_argument("--muon-lrs", default="1e-3,3e-3,1e-2,3e-2")
    ap.add_argument("--adamw-lrs", default="3e-4,1e-3,3e-3,1e-2")
    ap.add_argument("--archs", default="", help="wave: other architectures, trained with Muon at --arch-lr")
    ap.add_argument("--arch-lr", type=float, default=1e-2)
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--run", type=Path, help="package: this run (default: the preset's best moe-mla-rope run)")
    ap.add_argument("--batch", type=int, default=BATCH, help="sequences per step (smoke tests on CPU: small)")
    ap.add_argument("--seq-len", type=int, default=SEQ)
    ap.add_argument("--pieces-out", type=Path)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, default=99)
    a = ap.parse_args()
    BATCH, SEQ, TOKENS_PER_STEP = a.batch, a.seq_len, a.batch * a.seq_len
    a.out.mkdir(parents=True, exist_ok=True)
    if a.stage == "prepare":
        prepare()
    elif a.stage == "check":
        check()
    elif a.stage == "probe":
        probe(a.out, a.compile, a.configs.split(","))
    elif a.stage == "wave":
        wave(a.out, a.preset, floats(a.muon_lrs), floats(a.adamw_lrs), [s for s in a.archs.split(",") if s],
             a.arch_lr, a.budget_s)
    elif a.stage == "campaign":
        campaign(a.out, [s for s in a.specs.split(",") if s], tuple(shlex.split(a.train_args)),
                 tuple(shlex.split(a.moe_args)))
    elif a.stage == "watch":
        watch(a.out, a.limit_s)
    elif a.stage == "score":
        score(a.out)
    elif a.stage == "best":
        print(best_run(a.out, a.preset))
    elif a.stage == "package":
        package(a.run or best_run(a.out, a.preset), a.pieces_out, a.first, a.count)


if __name__ == "__main__":
    main()
