"""Where the time of a decode step goes: onnxruntime's own profiler, summarised.

    prof = op_profile("model-dir", threads=1, context=16, steps=32)   # trace under /tmp
    print(markdown_tables(prof))

The session runs with `SessionOptions.enable_profiling` (trace file prefix under `trace_dir`,
a temp folder by default, deleted unless `keep_trace`): one prefill of `context` prompt tokens,
then `steps` single-token decode steps through the runtime's in-place cache binding. Kernel
events (`*_kernel_time`) are assigned to the run they fall in by timestamp; the prefill run is
dropped, so the shares are of the decode step (median `model_run` duration).

Two summaries:
  by op     op_type (after ORT's fusions: FusedMatMul, QuickGelu, ...): total time, per step,
            share of the step, nodes per step
  by scope  what the kernel belongs to: a perseus op, as the native kernel (`perseus.<Op>
            (native)`, runtime.kernels) or as the body of its function (ORT inlines model-local
            functions and names their nodes `_inlfunc_<Op>...`: `perseus.<Op> (body)`, counted
            whole), else the component of the weight the node reads (`graphinfo.component`:
            attention / experts / mlp / head ...), else the exporter scope in the node name
            (`layers.3.mlp.routed/...` = MoE routing), else "other (norms, adds, glue)".
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from perseus_edge import modelfile as mf
from perseus_edge.bench import graphinfo

_INLINED = "_inlfunc_"


def _node_scopes(model_dir: Path) -> dict[str, str]:
    """Main-graph node name -> scope, from the weights it reads or its exporter scope."""
    import onnx

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    scopes = {}
    for node in model.graph.node:
        weights = [i for i in node.input if i in inits]
        comps = [graphinfo.component(w) for w in weights]
        comps = [c for c in comps if c not in ("other", "rope tables", "norms")]
        if node.domain == "perseus" and node.op_type != mf.OP_LINEAR:  # in the trace only when the native kernel ran it
            scope = f"perseus.{node.op_type} (native)"
        elif node.domain == mf.MS_DOMAIN and node.op_type in graphinfo.SPARSE_MOE_OPS:
            scope = f"experts ({node.domain}.{node.op_type})"
        elif comps:
            scope = comps[0] + " matmuls" if node.op_type in ("MatMul", "Gemm", "MatMulNBits", "MatMulInteger",
                                                              "DynamicQuantizeMatMul", mf.OP_LINEAR) \
                else comps[0]
        elif ".mlp.routed/" in node.name or ".mlp.routed/" in (node.output[0] if node.output else ""):
            scope = "MoE routing"
        else:
            scope = "other (norms, adds, glue)"
        scopes[node.name] = scope
    return scopes


def _scope(name: str, scopes: dict[str, str]) -> str:
    if name.startswith(_INLINED):
        op = name[len(_INLINED):].split("_")[0]
        return f"perseus.{op} (body)"
    if name in scopes:
        return scopes[name]
    if ".mlp.routed/" in name:
        return "MoE routing"
    return "other (norms, adds, glue)"


def op_profile(model_dir: str | Path, threads: int = 1, context: int = 16, steps: int = 32,
               trace_dir: str | Path | None = None, keep_trace: bool = False) -> dict:
    from perseus_edge.runtime.model import Model

    model_dir = Path(model_dir)
    tmp = Path(tempfile.mkdtemp(prefix="perseus-ortprof-", dir=trace_dir))
    model = Model(model_dir, threads=threads, verify=False, profile=tmp / "ort")
    context = max(1, min(context, model.max_context - steps - 1))
    ids = (np.arange(context, dtype=np.int64) * 7919 % model.spec.vocab_size)[None]
    logits = model.forward(ids, 0, last_only=True)
    for i in range(steps):
        logits = model.forward(np.array([[int(logits[0, -1].argmax())]], np.int64), context + i)
    trace = Path(model.end_profiling())
    events = json.loads(trace.read_text())
    try:
        summary = summarise(events, _node_scopes(model_dir))
    finally:
        if keep_trace:
            summary_trace = str(trace)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            summary_trace = None
    return {"model": str(model_dir), "threads": threads, "context": context, "steps": steps,
            "native_kernels": model.native_kernels, "trace": summary_trace, **summary}


def summarise(events: list[dict], scopes: dict[str, str] | None = None) -> dict:
    """Kernel time of the decode runs (all runs but the first) by op type and by scope."""
    scopes = scopes or {}
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    decode = runs[1:] if len(runs) > 1 else runs
    if not decode:
        raise ValueError("the profile holds no model_run event")
    starts = [s for s, _ in decode]
    by_op: dict[str, float] = defaultdict(float)
    by_scope: dict[str, float] = defaultdict(float)
    nodes_by_op: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i < 0 or e["ts"] > decode[i][1]:
            continue  # the prefill, or between runs
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] += e["dur"]
        nodes_by_op[op] += 1
        by_scope[_scope(e["name"][: -len("_kernel_time")], scopes)] += e["dur"]
    n = len(decode)
    step_us = statistics.median(b - a for a, b in decode)
    kernels_us = sum(by_op.values()) / n

    def table(d: dict[str, float], counts: dict[str, int] | None = None) -> list[dict]:
        rows = [{"name": k, "total_us": v, "per_step_us": v / n, "share": v / n / step_us,
                 **({"nodes_per_step": counts[k] / n} if counts else {})}
                for k, v in d.items()]
        return sorted(rows, key=lambda r: -r["total_us"])

    return {"decode_runs": n, "step_us_median": step_us, "kernels_us_per_step": kernels_us,
            "framework_share": max(0.0, 1 - kernels_us / step_us),
            "by_op": table(by_op, nodes_by_op), "by_scope": table(by_scope)}


GROUPS = ("attention core", "experts", "routing", "projections", "other")


def scope_group(scope: str) -> str:
    """Coarse bucket of a scope: attention core (perseus attention bodies), experts, routing,
    projections (weight matmuls outside the perseus ops, embedding lookup), other."""
    if scope.startswith(("perseus.LatentAttention", "perseus.Attention")):
        return "attention core"
    if scope.startswith(("experts", "perseus.MoE")):
        return "experts"
    if scope.startswith(("MoE routing", "router")):
        return "routing"
    if scope.endswith("matmuls") or scope in ("embeddings", "head", "attention", "mlp", "shared experts"):
        return "projections"
    return "other"


def grouped(prof: dict) -> dict[str, float]:
    """Share of the decode step per coarse group (plus "executor": the time between kernels)."""
    out = dict.fromkeys(GROUPS, 0.0)
    for r in prof["by_scope"]:
        out[scope_group(r["name"])] += r["share"]
    out["executor"] = prof["framework_share"]
    return out


def summary_table(profs: list[dict]) -> str:
    """One row per profile: step time and the share of each coarse group."""
    cols = list(GROUPS) + ["executor"]
    out = ["| model | graph | context | step ms | " + " | ".join(cols) + " |", "|---|---|---:|---:|" + "---:|" * len(cols)]
    for p in profs:
        g = grouped(p)
        out.append(f"| {p.get('model', '')} | {p.get('target', '')} {p.get('variant', '')} | {p['context']} | "
                   f"{p['step_us_median'] / 1e3:.2f} | " + " | ".join(f"{100 * g[c]:.0f}%" for c in cols) + " |")
    return "\n".join(out)


def markdown_tables(prof: dict, top: int = 12) -> str:
    head = (f"decode step median {prof['step_us_median'] / 1e3:.3f} ms over {prof['decode_runs']} steps at "
            f"context {prof['context']}, threads {prof['threads']}; kernels {prof['kernels_us_per_step'] / 1e3:.3f} "
            f"ms/step, the rest ({100 * prof['framework_share']:.0f}%) is ORT's executor between kernels; "
            f"native perseus kernels: {'yes' if prof.get('native_kernels') else 'no'}")
    out = [head, "", "| op | ms/step | share of step | nodes/step |", "|---|---:|---:|---:|"]
    for r in prof["by_op"][:top]:
        out.append(f"| {r['name']} | {r['per_step_us'] / 1e3:.3f} | {100 * r['share']:.1f}% | {r['nodes_per_step']:.0f} |")
    out += ["", "| scope | ms/step | share of step |", "|---|---:|---:|"]
    for r in prof["by_scope"]:
        out.append(f"| {r['name']} | {r['per_step_us'] / 1e3:.3f} | {100 * r['share']:.1f}% |")
    return "\n".join(out)
