"""A/B decode timing of model folders, interleaved in one process (a noisy shared machine).

    python studies/perf/ab.py A=/tmp/perf/54m-int8 B=/tmp/perf/54m-int8-new --threads 1 2 \
        --context 16 900 --steps 64 --rounds 9

Every variant is loaded as a `perseus_edge.runtime.Model` (the path `perseus run` takes), its
cache filled to `context` rows by a prefill; then each round times `steps` one-token decode
steps per variant, in rotating order (A,B,C / B,C,A / ...), and keeps the round's median step
time. The table gives the median over rounds, and each variant's ratio to the first one
computed per round (same moment, same machine noise) then taken as the median; the same for the
process CPU time per step (all threads), which a busy machine disturbs less. `--nodes` adds
the number of nodes ORT runs per step (the graph after ORT's optimizer, written to a temp file).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from studies.perf import variants as variants_lib


def optimized_nodes(folder: Path, threads: int) -> int:
    """Nodes of the graph ORT executes (after its graph optimizer)."""
    import onnx
    import onnxruntime as ort

    from perseus_edge.modelfile.reader import open_folder
    from perseus_edge.runtime.session import session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(threads)
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(open_folder(folder, verify=False).graph), so, providers=["CPUExecutionProvider"])
        return len(onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="+", help="NAME=FOLDER (FOLDER@body: native kernels off)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1])
    ap.add_argument("--context", nargs="+", type=int, default=[16])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--nodes", action="store_true")
    ap.add_argument("--config", action="append", default=[], metavar="NAME:KEY=VALUE",
                    help="an ORT session config entry for one variant")
    args = ap.parse_args()
    variants = dict(v.split("=", 1) for v in args.variants)
    configs: dict[str, dict] = {}
    for c in args.config:
        name, entry = c.split(":", 1)
        key, value = entry.split("=", 1)
        configs.setdefault(name, {})[key] = value
    for threads in args.threads:
        models = {name: variants_lib.load(path, threads, session_config=configs.get(name))
                  for name, path in variants.items()}
        for context in args.context:
            rng = np.random.default_rng(0)
            for m in models.values():
                vocab = m.spec.vocab_size
                prompt = rng.integers(2, vocab, (1, context))
                for s in range(0, context, 512):
                    m.forward(prompt[:, s:s + 512], s, last_only=True)
            times: dict[str, list[float]] = {n: [] for n in models}
            cpus: dict[str, list[float]] = {n: [] for n in models}
            names = list(models)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    m, token, step, cpu = models[name], np.array([[7]], np.int64), [], []
                    m.forward(token, context)  # warm
                    for i in range(args.steps):
                        t0, c0 = time.perf_counter(), time.process_time()
                        m.forward(token, context + i)
                        step.append(time.perf_counter() - t0)
                        cpu.append(time.process_time() - c0)
                    times[name].append(statistics.median(step))
                    cpus[name].append(statistics.median(cpu))
            base = names[0]
            print(f"\nthreads {threads}, context {context}, {args.rounds} rounds x {args.steps} steps")
            print(f"| variant | ms/step | tok/s | speed vs {base} | CPU ms/step | CPU vs {base} |"
                  + (" nodes |" if args.nodes else ""))
            print("|---|---:|---:|---:|---:|---:|" + ("---:|" if args.nodes else ""))
            for name in names:
                ms, cpu_ms = 1e3 * statistics.median(times[name]), 1e3 * statistics.median(cpus[name])
                ratio = statistics.median(b / t for b, t in zip(times[base], times[name]))
                cpu_ratio = statistics.median(b / t for b, t in zip(cpus[base], cpus[name]))
                nodes = f" {optimized_nodes(Path(variants_lib.folder_of(variants[name])), threads)} |" if args.nodes else ""
                print(f"| {name} | {ms:.3f} | {1e3 / ms:.0f} | {ratio:.2f}x | {cpu_ms:.3f} | {cpu_ratio:.2f}x |{nodes}",
                      flush=True)


if __name__ == "__main__":
    main()
