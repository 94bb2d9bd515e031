"""Where the memory of a running model goes: weights by component, cache, activations, overhead.

    fp = footprint("model-dir", threads=1)       # static parts from model.onnx + a measured run
    print(markdown_table([fp]))

Static (from the graph, no weights loaded; `graphinfo.py`):
  weights per component   initializer bytes as stored (int8 / int4 tensors + scales count as such)
  cache                   the past.* buffers the graph declares: bytes per token, at full context
  MHA comparison          the K/V cache an MHA model of the same width and depth would need
Measured (`probe`, in a fresh torch-free process, /proc/self/status):
  base                    after importing numpy + onnxruntime + the runtime (interpreter, libraries)
  session                 after creating the InferenceSession (weights mapped / prepacked, kernels)
  cache                   after allocating the runtime's cache buffers and touching every page
                          (what a full context costs)
  first run               after a prefill of `prefill` tokens: its anonymous growth is the
                          activation arena / allocations; its file-backed growth is memory-mapped
                          weights read for the first time (the sparse MoE kernel reads its experts
                          from the mapping; prepacked MatMul weights were copied at session creation)
  decode                  after `decode` single-token steps; peak = VmHWM, this process's RSS
                          high-water mark
`bar_segments` splits the RSS after decode into: weights (per component), cache (the graph's
buffer bytes at full context), activations (first-run anonymous delta), runtime overhead (what remains above the base besides weights and cache:
prepacked weight copies, ORT's own allocations and code), and the interpreter + libraries base.
The overhead can come out negative when part of the weights is never resident (an embedding
table whose rows were not all looked up, experts never selected): it is then shown as zero.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from perseus_edge.bench import graphinfo

MIB = 2 ** 20


def rss_now() -> dict:
    """Resident set of this process: total, anonymous, file-backed bytes and the high-water mark
    `peak` (VmHWM: this process image's own, unlike getrusage which Linux carries across fork + exec)."""
    from perseus_edge.runtime.timings import proc_status_bytes

    status = proc_status_bytes("VmRSS", "RssAnon", "RssFile", "VmHWM")
    keys = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "peak"}
    return {ours: status.get(field, 0) for field, ours in keys.items()}


def probe(model_dir: str, threads: int = 1, prefill: int = 256, decode: int = 16) -> dict:
    """Measured RSS at each stage of loading and running the model (call in a fresh process)."""
    from perseus_edge import modelfile as mf
    from perseus_edge.runtime.cache import KVCache
    from perseus_edge.modelfile.reader import open_folder
    from perseus_edge.runtime.session import GraphSpec, create_session

    stages = {"base": rss_now()}
    folder = open_folder(model_dir, verify=False)
    session, _ = create_session(folder, threads)
    stages["session"] = rss_now()
    spec = GraphSpec.from_session(session, folder)
    cache = KVCache(spec.caches, spec.max_context, 1)
    cache.reset()  # touch every page: the cost of a full context
    binding = session.io_binding()
    cache.bind(binding)
    stages["cache"] = rss_now()
    n = max(1, min(prefill, spec.max_context - decode - 1))
    ids = (np.arange(n, dtype=np.int64) * 7919 % spec.vocab_size)[None]
    binding.bind_cpu_input("input_ids", ids)
    binding.bind_cpu_input("position", np.array([0], np.int64))
    if spec.logits_rows:  # the last row's logits, as a generation's prefill asks
        binding.bind_cpu_input(mf.LOGITS_ROWS, np.array([n - 1], np.int64))
    binding.bind_output("logits")
    session.run_with_iobinding(binding)
    stages["first run"] = rss_now()
    for i in range(decode):
        binding.bind_cpu_input("input_ids", np.array([[i + 1]], np.int64))
        binding.bind_cpu_input("position", np.array([n + i], np.int64))
        if spec.logits_rows:
            binding.bind_cpu_input(mf.LOGITS_ROWS, np.array([0], np.int64))
        binding.bind_output("logits")
        session.run_with_iobinding(binding)
    stages["decode"] = rss_now()
    return {"stages": stages, "peak_rss": stages["decode"]["peak"], "cache_nbytes": cache.nbytes,
            "prefill": n, "decode": decode, "threads": threads}


def run_probe(model_dir: str | Path, threads: int = 1, prefill: int = 256, decode: int = 16) -> dict:
    """`probe` in a subprocess (a clean address space, no torch), returns its result."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS=str(threads))
    code = ("import json,sys; from perseus_edge.bench.footprint import probe; "
            "print(json.dumps(probe(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))")
    out = subprocess.run([sys.executable, "-c", code, str(model_dir), str(threads), str(prefill), str(decode)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"memory probe of {model_dir} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def footprint(model_dir: str | Path, threads: int = 1, prefill: int = 256, decode: int = 16,
              measure: bool = True, label: str | None = None) -> dict:
    """Static breakdown of a model folder, plus the measured RSS stages when `measure`."""
    import onnx

    model_dir = Path(model_dir)
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    weights = graphinfo.weight_breakdown(model_dir, model)
    cfg = graphinfo.read_config(model_dir)
    cache = graphinfo.cache_layout(model_dir, model)
    mha = cfg if not cfg.is_mla else cfg.replace(arch="mha")
    mha_per_token = mha.kv_bytes_per_token(4)
    manifest = {}
    if (model_dir / "manifest.json").is_file():
        manifest = json.loads((model_dir / "manifest.json").read_text())
    variant = (manifest.get("quantization") or {}).get("scheme") or manifest.get("scheme") or "fp32"
    target = (manifest.get("export") or {}).get("target", "?")
    out = {"label": label or model_dir.name, "path": str(model_dir), "arch": cfg.arch, "variant": variant,
           "target": target, "weights": weights, "weights_total": sum(weights.values()),
           "files_bytes": sum(p.stat().st_size for p in model_dir.glob("model.onnx*")),
           "cache": cache, "mha_kv_bytes_per_token": mha_per_token,
           "mha_kv_bytes_full_context": mha_per_token * cache["max_context"],
           "cache_vs_mha": cache["bytes_per_token"] / mha_per_token if mha_per_token else 0.0,
           "params_total": cfg.param_counts()["total"]}
    if measure:
        m = run_probe(model_dir, threads, prefill, decode)
        st = m["stages"]
        base, final = st["base"]["rss"], st["decode"]["rss"]
        # anonymous growth only: the file-backed growth of the first run is mapped weight pages
        # being read for the first time, not activations
        activations = max(0, st["first run"]["anon"] - st["cache"]["anon"])
        cache_res = max(0, st["cache"]["rss"] - st["session"]["rss"])
        # the cache's size is exact from the graph; its measured RSS delta can be smaller when the
        # allocator reuses pages freed during session creation
        overhead = final - base - out["weights_total"] - cache["bytes_full_context"] - activations
        out["measured"] = {**m, "base": base, "session_delta": st["session"]["rss"] - base,
                           "session_anon_delta": st["session"]["anon"] - st["base"]["anon"],
                           "session_file_delta": st["session"]["file"] - st["base"]["file"],
                           "cache_resident": cache_res, "activations": activations,
                           "first_run_file_delta": st["first run"]["file"] - st["cache"]["file"],
                           "decode_growth": st["decode"]["rss"] - st["first run"]["rss"],
                           "overhead": overhead, "final": final}
    return out


def bar_segments(fp: dict) -> dict[str, int]:
    """The stacked-bar segments of one footprint (bytes); they sum to the RSS after decode when
    measured (a negative overhead, i.e. weights not all resident, is shown as zero)."""
    seg = {f"weights: {k}": v for k, v in fp["weights"].items() if v}
    m = fp.get("measured")
    if m:
        seg["cache (full context)"] = fp["cache"]["bytes_full_context"]
        seg["activations (first run)"] = m["activations"]
        seg["runtime overhead"] = max(0, m["overhead"])
        seg["interpreter + libraries"] = m["base"]
    else:
        seg["cache (full context)"] = fp["cache"]["bytes_full_context"]
    return seg


def _mib(x: float) -> str:
    return f"{x / MIB:.2f}"


def markdown_table(fps: list[dict]) -> str:
    """One column per model folder: weights by component, cache, measured RSS stages."""
    head = "| MiB | " + " | ".join(f"{fp['label']}" for fp in fps) + " |"
    rule = "|---|" + "---:|" * len(fps)
    rows = [head, rule]

    def row(label: str, values) -> None:
        rows.append(f"| {label} | " + " | ".join(values) + " |")

    row("variant / target", [f"{fp['variant']} / {fp['target']}" for fp in fps])
    for comp in graphinfo.COMPONENTS:
        if any(fp["weights"][comp] for fp in fps):
            row(f"weights: {comp}", [_mib(fp["weights"][comp]) for fp in fps])
    row("**weights total**", [f"**{_mib(fp['weights_total'])}**" for fp in fps])
    row("cache per token (KiB)", [f"{fp['cache']['bytes_per_token'] / 1024:.2f}" for fp in fps])
    row("cache at full context", [f"{_mib(fp['cache']['bytes_full_context'])} (ctx {fp['cache']['max_context']})"
                                  for fp in fps])
    row("MHA K/V cache, same width, full context", [_mib(fp["mha_kv_bytes_full_context"]) for fp in fps])
    row("cache / MHA cache", [f"{100 * fp['cache_vs_mha']:.1f}%" for fp in fps])
    if all("measured" in fp for fp in fps):
        ms = [fp["measured"] for fp in fps]
        row("RSS: interpreter + libraries (base)", [_mib(m["base"]) for m in ms])
        row("RSS delta: session created", [f"{_mib(m['session_delta'])} (anon {_mib(m['session_anon_delta'])}, "
                                           f"file {_mib(m['session_file_delta'])})" for m in ms])
        row("RSS delta: cache allocated + touched (can reuse freed pages)", [_mib(m["cache_resident"]) for m in ms])
        row("RSS delta: first run, anonymous (activations / arena)",
            [f"{_mib(m['activations'])} (pp{m['prefill']})" for m in ms])
        row("RSS delta: first run, file-backed (mapped weights paged in)", [_mib(m["first_run_file_delta"]) for m in ms])
        row("RSS delta: decode steps", [f"{_mib(m['decode_growth'])} ({m['decode']} steps)" for m in ms])
        row("runtime overhead (RSS after decode - base - weights - cache - activations)",
            [_mib(m["overhead"]) for m in ms])
        row("RSS after decode / peak", [f"{_mib(m['final'])} / {_mib(m['peak_rss'])}" for m in ms])
    return "\n".join(rows)
