"""Decode latency of exported graphs: portable vs lowered, near vs far in the context.

    python studies/export/measure.py                            # 17m moe-mla-rope, random weights
    python studies/export/measure.py --arch mha --threads 1 --positions 16 1000
    python studies/export/measure.py --checkpoint CKPT          # a real checkpoint instead

For every target it exports the checkpoint (random `preset` weights unless --checkpoint) and
times, through the runtime's `Model.forward` (in-place cache binding): `pp{N}` a prefill of N
tokens, and `tg@{p}` single-token decode steps at positions p, p+1, ... (the cache content does
not change the cost, so no long prompt is needed to measure far positions).
Targets run in alternating rounds so machine noise hits them alike. Each round takes the median
step time; the table (llama-bench style) gives the best round (noise only ever adds time, so on
a shared machine the minimum is the most repeatable figure) and the median round.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from perseus_edge.runtime.model import Model
from perseus_edge.modelfile.names import TARGETS


def time_decode(model: Model, position: int, steps: int) -> float:
    """Median seconds of one decode step at positions position.. ."""
    token = np.zeros((1, 1), np.int64)
    model.forward(token, position)  # warm-up
    times = []
    for i in range(steps):
        start = time.perf_counter()
        model.forward(token, position + i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_prefill(model: Model, tokens: int, repeats: int = 3) -> float:
    ids = np.arange(tokens, dtype=np.int64)[None] % 256
    model.forward(ids, 0)
    return min(_timed(model, ids) for _ in range(repeats))


def _timed(model: Model, ids: np.ndarray) -> float:
    start = time.perf_counter()
    model.forward(ids, 0)
    return time.perf_counter() - start


def measure(ckpt: Path, workdir: Path, targets: list[str], positions: list[int], steps: int, rounds: int,
            prefill: int, threads: int | None) -> list[dict]:
    from perseus_edge.export import export
    from perseus_edge.lower import lower
    from perseus_edge.modelfile.writer import save

    program = export(ckpt)
    models = {}
    for target in targets:
        folder = save(lower(program, target), workdir / target, force=True)
        models[target] = Model(folder, threads=threads)
    tests = [("pp", prefill)] if prefill else []
    context = next(iter(models.values())).max_context
    tests += [("tg", min(p, context - steps - 1)) for p in positions]  # steps stay inside the cache
    samples: dict[tuple, list[float]] = {}
    for _ in range(rounds):
        for target, model in models.items():
            for kind, n in tests:
                t = time_prefill(model, n) / n if kind == "pp" else time_decode(model, n, steps)
                samples.setdefault((target, kind, n), []).append(t)
    rows = []
    for (target, kind, n), ts in samples.items():
        test = f"pp{n}" if kind == "pp" else f"tg@{n}"
        rows.append({"target": target, "test": test, "best": 1e3 * min(ts), "median": 1e3 * statistics.median(ts),
                     "tok_s": 1 / min(ts)})
    return rows


def _random_checkpoint(folder: Path, preset_name: str, arch: str) -> Path:
    from perseus_edge.checkpoint import random_checkpoint
    from perseus_edge.model.config import preset
    from perseus_edge.tokenizer import DEFAULT_TOKENIZER

    return random_checkpoint(folder / "ckpt", preset(preset_name, arch), DEFAULT_TOKENIZER)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python studies/export/measure.py", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: random --preset weights)")
    ap.add_argument("--preset", default="17m")
    ap.add_argument("--arch", default="moe-mla-rope")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    ap.add_argument("--positions", nargs="+", type=int, default=[16, 1000])
    ap.add_argument("--steps", type=int, default=64, help="decode steps per position and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=128, help="prefill length (0: skip)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ORT's)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="perseus-measure-") as tmp:
        tmp = Path(tmp)
        ckpt = args.checkpoint or _random_checkpoint(tmp, args.preset, args.arch)
        name = args.checkpoint.name if args.checkpoint else f"{args.preset} {args.arch}"
        rows = measure(ckpt, tmp, args.targets, args.positions, args.steps, args.rounds, args.prefill,
                       args.threads)
    import onnxruntime as ort

    print(f"model: {name}; onnxruntime {ort.__version__} CPU; threads {args.threads or 'default'}; "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"| {'target':<9} | {'test':<12} | {'ms/token best':>13} | {'median':>7} | {'t/s best':>8} |")
    print(f"| {'-' * 9} | {'-' * 12} | {'-' * 13}:| {'-' * 7}:| {'-' * 8}:|")
    for r in rows:
        print(f"| {r['target']:<9} | {r['test']:<12} | {r['best']:>13.3f} | {r['median']:>7.3f} "
              f"| {r['tok_s']:>8.1f} |")


if __name__ == "__main__":
    main()

