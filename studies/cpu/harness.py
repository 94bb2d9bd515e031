"""The CPU study: prepare the models, time every backend/variant, write JSON, tables and plots.

    python -m studies.cpu.harness [--quick] [--out DIR]       # from the repository root
    from studies.cpu.harness import BenchConfig, run_bench
    run_bench(BenchConfig(out_dir="studies/results/cpu"))               # the full benchmark
    run_bench(BenchConfig.quick_config(out_dir="/tmp/b"))              # --quick

Stages:
  1. subjects   the models: the shipped 17m checkpoint (trained) and a 54m moe-mla-rope with
                random weights (as the architecture comparison; speed and memory do not depend
                on the weights' values), exported to the portable and the ort-cpu targets, quantized to
                int8 / int4 when `perseus_edge.quantize.quantize_model` exists; for the
                architecture comparison, random 54m checkpoints of mha, mla-dense, moe-mla-rope and
                mha-moe (`preset("54m", arch)`: equal active parameters by construction)
  2. timing     groups of workers (`worker.py`, one process per backend/variant/threads), asked in
                turn for one repetition of each test, round after round (warm-up round first)
  3. analysis   roofline (measured peaks), footprint probes, ORT op profiles, parity (optional)
  4. report     bench.json, README.md (llama-bench table + verdicts), plots (`report.py`)
Everything heavy goes to `work_dir` (exports, quantized folders, random checkpoints), reused by
later runs when the source checkpoint is unchanged.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from perseus_edge.bench.rounds import LineWorker
from perseus_edge.errors import PerseusError

ROOT = Path(__file__).resolve().parents[2]  # the checkout: studies.cpu.worker is imported from it
DEFAULT_CHECKPOINT = ROOT / "perseus_edge" / "assets" / "default"
ARCHS = ("mha", "mla-dense", "moe-mla-rope", "mha-moe")
TARGETS = ("portable", "ort-cpu")
SCHEMES = ("int8", "int4")
BACKEND_TORCH = "torch-eager"


def backend_name(target: str) -> str:
    return f"onnx-{target}"


@dataclass
class BenchConfig:
    out_dir: str = "studies/results/cpu"
    work_dir: str = str(Path(tempfile.gettempdir()) / "perseus-bench")
    # main subjects: name -> checkpoint folder ("random:<preset>" = random weights of that preset)
    models: dict = field(default_factory=lambda: {"17m": str(DEFAULT_CHECKPOINT), "54m": "random:54m"})
    threads: list = field(default_factory=lambda: [1, 2])
    pp: list = field(default_factory=lambda: [64, 256])
    tg: int = 32  # decode steps per tg test
    contexts: list = field(default_factory=lambda: [16, 256, 512, 900])
    reps: int = 5
    targets: list = field(default_factory=lambda: list(TARGETS))
    schemes: list = field(default_factory=lambda: list(SCHEMES))  # used only when the quantizer exists
    torch: bool = True
    # libgomp's idle threads spin by default (OMP_WAIT_POLICY unset); on a shared 2-core machine
    # that makes 2-thread torch several times slower than 1 thread. PASSIVE is the stronger
    # baseline here; "" leaves the environment as it is. The threading group measures both.
    torch_omp_policy: str = "PASSIVE"
    threading_check: bool = True  # the small group comparing wait policies at the largest thread count
    # architecture comparison: arch -> checkpoint ("random:54m" for each by default); {} = skip
    archs: dict = field(default_factory=lambda: {a: "random:54m" for a in ARCHS})
    arch_threads: list = field(default_factory=lambda: [1, 2])
    arch_contexts: list = field(default_factory=lambda: [16, 900])
    arch_pp: list = field(default_factory=list)
    roofline: bool = True
    footprint: bool = True
    op_profile: bool = True
    profile_contexts: list = field(default_factory=lambda: [16, 900])
    parity: bool = True
    seed: int = 0
    quick: bool = False
    command: str = ""

    @classmethod
    def quick_config(cls, **kw) -> "BenchConfig":
        base = dict(threads=[2], pp=[64], tg=16, contexts=[16, 900], reps=3, arch_threads=[2],
                    arch_contexts=[16, 900], arch_pp=[], profile_contexts=[16], parity=False, quick=True,
                    schemes=["int8"])
        return cls(**{**base, **kw})


@dataclass
class Subject:
    """One model: its checkpoint and the ONNX folders made from it."""

    key: str  # "17m", "54m", "54m mha"
    label: str  # "17m moe-mla-rope (trained)"
    arch: str
    checkpoint: Path
    trained: bool
    params: int
    active_params: int
    folders: dict = field(default_factory=dict)  # (target, variant) -> Path
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------------------- subjects
def _random_checkpoint(work: Path, preset_name: str, arch: str, seed: int, log) -> Path:
    from perseus_edge.manifest import read_manifest

    folder = work / f"ckpt-{preset_name}-{arch}-seed{seed}"
    try:
        if read_manifest(folder).get("kind") == "checkpoint":
            return folder
    except PerseusError:
        pass
    from perseus_edge.checkpoint import random_checkpoint
    from perseus_edge.model.config import preset
    from perseus_edge.tokenizer import DEFAULT_TOKENIZER

    log(f"  random checkpoint {preset_name} {arch} (seed {seed}) -> {folder}")
    return random_checkpoint(folder, preset(preset_name, arch), DEFAULT_TOKENIZER, seed,
                             meta={"random_init": True, "seed": seed})


def _export(ckpt: Path, out: Path, target: str, log) -> Path:
    from perseus_edge.manifest import read_manifest, sha256_file

    try:
        manifest = read_manifest(out)
        meta = manifest.get("export") or {}
        if ((manifest.get("lowering") or {}).get("target", "portable") == target
                and meta.get("source_checkpoint", {}).get("sha256") == sha256_file(ckpt / "manifest.json")):
            return out
    except PerseusError:
        pass
    from perseus_edge.build import export_checkpoint

    log(f"  export {ckpt.name} --target {target} -> {out}")
    return export_checkpoint(ckpt, out, target=target, force=True)


def quantizer() -> Callable | None:
    """`perseus_edge.quantize.quantize_model` if the quantizer has landed, else None."""
    try:
        from perseus_edge import build
    except ImportError:
        return None
    return getattr(build, "quantize_model", None)


def _quantize(src: Path, out: Path, scheme: str, target: str, log) -> Path:
    from perseus_edge.manifest import read_manifest, sha256_file

    stamp = out.parent / f"{out.name}.source-sha256"  # beside the folder: its manifest stays exact
    src_sha = sha256_file(src / "manifest.json")
    if stamp.is_file() and stamp.read_text().strip() == src_sha:
        try:
            read_manifest(out)
            return out
        except PerseusError:
            pass
    log(f"  quantize {src.name} {scheme} -> {out}")
    if out.exists():
        shutil.rmtree(out)
    result = quantizer()(src, out, scheme, target=target)
    out = Path(result) if isinstance(result, (str, os.PathLike)) else out
    stamp.write_text(src_sha + "\n")
    return out


def prepare_subject(key: str, source: str, arch: str | None, cfg: BenchConfig, targets, schemes, log) -> Subject:
    from perseus_edge.model.config import ModelConfig

    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if source.startswith("random:"):
        preset_name = source.split(":", 1)[1]
        ckpt = _random_checkpoint(work, preset_name, arch or "moe-mla-rope", cfg.seed, log)
        trained = False
        kind = "random init"
    else:
        from perseus_edge.manifest import read_manifest

        ckpt = Path(source)
        meta = read_manifest(ckpt)
        trained = "source_run" in meta and not meta.get("random_init")
        kind = "trained" if trained else ("random init" if meta.get("random_init") else "checkpoint")
    mcfg = ModelConfig.load(ckpt)
    counts = mcfg.param_counts()
    label = f"{key.split()[0]} {mcfg.arch} ({kind})"
    subj = Subject(key, label, mcfg.arch, ckpt, trained, counts["total"], counts["active"])
    slug = key.replace(" ", "-")
    for target in targets:  # (a dense model has nothing to lower: its ort-cpu graph is the portable one)
        folder = _export(ckpt, work / f"{slug}-{_ckpt_tag(ckpt)}" / target, target, log)
        subj.folders[(target, "fp32")] = folder
        q = quantizer()
        for scheme in schemes:
            if q is None:
                continue
            try:
                subj.folders[(target, scheme)] = _quantize(folder, folder.parent / f"{target}-{scheme}", scheme, target, log)
            except Exception as e:  # noqa: BLE001 - a quantizer failure is reported, not fatal
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                subj.notes.append(f"quantize {target} {scheme} failed: {first}")
                log(f"  ! quantize {key} {target} {scheme}: {first}")
    return subj


def _ckpt_tag(ckpt: Path) -> str:
    from perseus_edge.manifest import sha256_file

    return sha256_file(ckpt / "manifest.json")[:10]


# ----------------------------------------------------------------------------- workers
class WorkerProcess(LineWorker):
    """A `studies.cpu.worker` process (torch or onnxruntime backend) for one job and thread count."""

    def __init__(self, backend: str, path: Path, threads: int, prompt: list[int], env: dict | None = None,
                 spin: int | None = None):
        path_env = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   OPENBLAS_NUM_THREADS="1", PYTHONPATH=path_env, **(env or {}))
        super().__init__("studies.cpu.worker", {"backend": backend, "path": str(path), "threads": threads,
                                                "prompt": prompt, "spin": spin},
                         f"benchmark worker {backend} {path} ({threads} threads)", env)


@dataclass
class Job:
    subject: Subject
    backend: str  # torch-eager | onnx-portable | onnx-ort-cpu
    variant: str  # fp32 | int8 | int4
    target: str  # portable | ort-cpu (torch: the checkpoint)
    path: Path
    threads: int
    env: dict = field(default_factory=dict)  # extra environment of the worker (OMP_WAIT_POLICY)
    spin: int | None = None  # ORT intra-op spinning override (None: the runtime's own choice)

    @property
    def policy(self) -> str:
        """How idle worker threads wait: what decides 2-thread speed on a shared machine."""
        if self.backend == BACKEND_TORCH:
            return f"OMP {self.env.get('OMP_WAIT_POLICY', 'default').lower()}"
        if self.threads == 1:
            return "-"
        default = 0 if os.environ.get("PERSEUS_SPIN") == "0" else 1  # the runtime's choice (session.py)
        spinning = self.spin if self.spin is not None else default
        return "ORT spin" + ("" if spinning else " off") + (" (runtime default)" if self.spin is None else "")


def torch_job(subj: "Subject", threads: int, cfg: "BenchConfig", policy: str | None = None) -> Job:
    policy = cfg.torch_omp_policy if policy is None else policy
    env = {"OMP_WAIT_POLICY": policy} if policy else {}
    return Job(subj, BACKEND_TORCH, "fp32", "checkpoint", subj.checkpoint, threads, env)


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run_group(jobs: list[Job], tests: list[tuple], reps: int, prompt: list[int], group: str, log) -> list[dict]:
    """Start every job's worker, then `reps` rounds of (every test x every worker), warm-up first."""
    workers = []
    try:
        for job in jobs:
            workers.append(WorkerProcess("torch" if job.backend == BACKEND_TORCH else "onnx", job.path,
                                         job.threads, prompt, job.env, job.spin))
        samples: dict[tuple, list[float]] = {}
        load = [_loadavg()]
        for rnd in range(reps + 1):  # round 0: warm-up, discarded
            for kind, n, ctx in tests:
                for j, w in enumerate(workers):
                    req = {"cmd": kind, "n": n} if kind == "pp" else {"cmd": "tg", "n": n if rnd else min(n, 4),
                                                                       "context": ctx}
                    tok_s = w.ask(req)["tok_s"]
                    if rnd:
                        samples.setdefault((j, kind, n, ctx), []).append(tok_s)
            load.append(_loadavg())
        stats = [w.ask({"cmd": "stats"}) for w in workers]
    finally:
        for w in workers:
            w.close()
    records = []
    for (j, kind, n, ctx), ts in samples.items():
        job, st = jobs[j], stats[j]
        size = _size_bytes(job)
        records.append({
            "model": job.subject.label, "model_key": job.subject.key, "arch": job.subject.arch,
            "trained": job.subject.trained, "backend": job.backend, "variant": job.variant,
            "target": job.target, "threads": job.threads, "policy": job.policy, "test": kind, "n_tokens": n, "context": ctx,
            "tok_s_median": statistics.median(ts), "tok_s_min": min(ts), "tok_s_max": max(ts), "tok_s": ts,
            "reps": len(ts), "peak_rss_bytes": st["peak_rss_bytes"], "cache_bytes": st["cache_bytes"],
            "size_bytes": size, "params": job.subject.params, "active_params": job.subject.active_params,
            "group": group, "loadavg": load, "path": str(job.path)})
    log(f"    load average during the group: {load[0]} -> {load[-1]}")
    return records


def _size_bytes(job: Job) -> int:
    if job.backend == BACKEND_TORCH:
        return 4 * job.subject.params  # fp32 in memory (checkpoint stored bf16 or fp32)
    from perseus_edge.bench.graphinfo import weight_breakdown

    return sum(weight_breakdown(job.path).values())


def _tests(pp: list[int], tg: int, contexts: list[int], max_context: int) -> list[tuple]:
    tests = [("pp", n, 0) for n in pp if n <= max_context]
    seen = set()
    for c in contexts:
        c = max(1, min(c, max_context - tg - 1))
        if c not in seen:
            seen.add(c)
            tests.append(("tg", tg, c))
    return tests


# ----------------------------------------------------------------------------- the benchmark
def machine_info() -> dict:
    import numpy
    import onnxruntime

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        flags = Path("/proc/cpuinfo").read_text()
        info["avx512_vnni"] = "avx512_vnni" in flags
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict:
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    q = quantizer()
    schemes = list(cfg.schemes) if q else []
    notes = [] if q else ["quantizer not available (perseus_edge.quantize.quantize_model missing): "
                          "int8 / int4 rows pending"]
    log(f"perseus bench: {'quick' if cfg.quick else 'full'}; work dir {cfg.work_dir}")
    log("1/4 subjects")
    subjects = [prepare_subject(k, src, None, cfg, cfg.targets, schemes, log) for k, src in cfg.models.items()]
    arch_subjects = []
    for arch, src in cfg.archs.items():
        existing = next((s for s in subjects if s.arch == arch and src.startswith("random:")
                         and s.key == src.split(":", 1)[1]), None)
        arch_subjects.append(existing or prepare_subject(f"{src.split(':', 1)[-1] if src.startswith('random:') else 'arch'} {arch}",
                                                          src, arch, cfg, ["ort-cpu"], [], log))
    for s in subjects + arch_subjects:
        notes += [f"{s.key}: {n}" for n in s.notes]

    from perseus_edge.bench.prompts import prompt_ids

    log("2/4 timing")
    records = []
    need = max(cfg.contexts + cfg.arch_contexts + cfg.pp + cfg.arch_pp + [16]) + 1
    for subj in subjects:
        prompt = prompt_ids(subj.checkpoint / "tokenizer.json", need)
        ctx = _max_context(subj)
        tests = _tests(cfg.pp, cfg.tg, cfg.contexts, ctx)
        for threads in cfg.threads:
            jobs = [torch_job(subj, threads, cfg)] if cfg.torch else []
            jobs += [Job(subj, backend_name(t), v, t, p, threads) for (t, v), p in sorted(subj.folders.items())]
            log(f"  {subj.label}, threads {threads}: {len(jobs)} workers x {len(tests)} tests x {cfg.reps} reps")
            records += run_group(jobs, tests, cfg.reps, prompt, "main", log)
    if arch_subjects:
        prompt = prompt_ids(arch_subjects[0].checkpoint / "tokenizer.json", need)
        ctx = min(_max_context(s) for s in arch_subjects)
        tests = _tests(cfg.arch_pp, cfg.tg, cfg.arch_contexts, ctx)
        for threads in cfg.arch_threads:
            jobs = []
            for s in arch_subjects:
                if cfg.torch:
                    jobs.append(torch_job(s, threads, cfg))
                jobs.append(Job(s, backend_name("ort-cpu"), "fp32", "ort-cpu", s.folders[("ort-cpu", "fp32")], threads))
            log(f"  architectures, threads {threads}: {len(jobs)} workers x {len(tests)} tests x {cfg.reps} reps")
            records += run_group(jobs, tests, cfg.reps, prompt, "arch", log)
    threads_max = max(cfg.threads)
    if cfg.threading_check and threads_max > 1 and subjects:
        subj = subjects[0]
        prompt = prompt_ids(subj.checkpoint / "tokenizer.json", need)
        tests = _tests([], cfg.tg, cfg.contexts[:1], _max_context(subj))
        jobs = []
        if cfg.torch:
            jobs += [torch_job(subj, threads_max, cfg, "ACTIVE"), torch_job(subj, threads_max, cfg, "PASSIVE")]
        for target in cfg.targets:
            path = subj.folders[(target, "fp32")]
            jobs += [Job(subj, backend_name(target), "fp32", target, path, threads_max),
                     Job(subj, backend_name(target), "fp32", target, path, threads_max, spin=0)]
        log(f"  threading policies, {subj.label}, threads {threads_max}: {len(jobs)} workers")
        records += run_group(jobs, tests, cfg.reps, prompt, "threading", log)

    log("3/4 analysis")
    result = {"meta": {"command": cfg.command, "config": _jsonable(asdict(cfg)), "machine": machine_info(),
                       "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_start": _loadavg(),
                       "quantizer": bool(q), "notes": notes},
              "records": records,
              "subjects": [_subject_json(s) for s in _unique(subjects + arch_subjects)]}
    if cfg.roofline:
        from studies.cpu.roofline import measure_peaks

        log("  roofline peaks")
        result["peaks"] = measure_peaks(tuple(sorted(set(cfg.threads + cfg.arch_threads))), quick=cfg.quick)
        result["roofline"] = roofline_rows(records, subjects + arch_subjects, result["peaks"])
    if cfg.footprint:
        from perseus_edge.bench.footprint import footprint

        log("  footprint probes")
        fps = []
        for s in _unique(subjects + arch_subjects):
            for (t, v), p in sorted(s.folders.items()):
                if not any(s is m for m in subjects) and (t, v) != ("ort-cpu", "fp32"):
                    continue
                fps.append(footprint(p, threads=1, label=f"{s.key} {t} {v}"))
        result["footprint"] = fps
    if cfg.op_profile:
        from perseus_edge.bench.opprofile import op_profile

        log("  ORT op profiles")
        profs = []
        for s in subjects:
            for (t, v), p in sorted(s.folders.items()):
                if v not in ("fp32", "int8"):
                    continue
                for c in cfg.profile_contexts:
                    prof = op_profile(p, threads=1, context=c, steps=16 if cfg.quick else 32)
                    profs.append({**prof, "model_dir": prof["model"], "model": s.label, "model_key": s.key,
                                  "target": t, "variant": v})
        result["op_profile"] = profs
    if cfg.parity and cfg.torch:
        from studies.cpu.gpu_reference import cpu_parity

        log("  parity: PyTorch CPU vs ONNX runtime")
        result["parity"] = [cpu_parity(s.checkpoint, {f"{t} {v}": p for (t, v), p in sorted(s.folders.items())},
                                       n_prompts=2 if cfg.quick else 3, steps=16) for s in subjects[:1]]
    result["meta"]["loadavg_end"] = _loadavg()
    result["meta"]["wall_s"] = time.perf_counter() - t_start
    log("4/4 report")
    from studies.cpu.report import write_report

    write_report(result, out_dir)
    log(f"done in {result['meta']['wall_s'] / 60:.1f} min: {out_dir}/bench.json, README.md, plots")
    return result


def _unique(subjects: list[Subject]) -> list[Subject]:
    out: list[Subject] = []
    for s in subjects:
        if not any(s is o for o in out):
            out.append(s)
    return out


def _max_context(subj: Subject) -> int:
    from perseus_edge.bench.graphinfo import cache_layout

    return min(cache_layout(p)["max_context"] for p in subj.folders.values())


def _subject_json(s: Subject) -> dict:
    """The subject as recorded in bench.json: enough for the report without the work dir."""
    from perseus_edge.bench.graphinfo import cache_layout, weight_breakdown

    info = {f"{t} {v}": {"path": str(p), "weights_bytes": sum(weight_breakdown(p).values()),
                         "cache": cache_layout(p)} for (t, v), p in sorted(s.folders.items())}
    return {"key": s.key, "label": s.label, "arch": s.arch, "checkpoint": str(s.checkpoint), "trained": s.trained,
            "params": s.params, "active_params": s.active_params, "notes": s.notes,
            "folders": {k: v["path"] for k, v in info.items()}, "folder_info": info}


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def roofline_rows(records: list[dict], subjects: list[Subject], peaks: dict) -> list[dict]:
    """Every tg record against the roofline bound of its decode step."""
    from perseus_edge.bench.graphinfo import decode_cost
    from studies.cpu.roofline import roofline

    by_label = {s.label: s for s in subjects}
    rows, costs = [], {}
    for r in records:
        if r["test"] != "tg" or str(r["threads"]) not in peaks or r["group"] not in ("main", "arch"):
            continue
        subj = by_label.get(r["model"])
        if subj is None:
            continue
        if r["backend"] == BACKEND_TORCH:  # reads what the sparse graph reads (selected experts only)
            folder = subj.folders.get(("ort-cpu", "fp32")) or next(iter(subj.folders.values()))
        else:
            folder = Path(r["path"])
        key = (str(folder), r["context"])
        if key not in costs:
            costs[key] = decode_cost(folder, r["context"])
        cost = costs[key]
        bound = roofline(cost["bytes"], cost["flops"], peaks[str(r["threads"])], integer=r["variant"] != "fp32")
        rows.append({k: r[k] for k in ("model", "arch", "backend", "variant", "threads", "context", "group")}
                    | {"tok_s_median": r["tok_s_median"], "bytes_per_token": cost["bytes"],
                       "weight_bytes_per_token": cost["weight_bytes"], "flops_per_token": cost["flops"],
                       "bound_tok_s": bound["tok_s"], "bound": bound["bound"],
                       "fraction": r["tok_s_median"] / bound["tok_s"],
                       "fraction_best": r["tok_s_max"] / bound["tok_s"],
                       "intensity": bound["intensity"]})
    return rows


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m studies.cpu.harness", description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="bench.json, README.md, plots (default studies/results/cpu; "
                                  "with --quick /tmp/perseus-bench-quick)")
    ap.add_argument("--work-dir", help="exports, quantized folders, random checkpoints (default /tmp/perseus-bench)")
    ap.add_argument("--quick", action="store_true", help="smaller matrix: 2 threads, pp64, tg16 @16/@900, 3 reps")
    ap.add_argument("--model", action="append", default=[], help="NAME=SOURCE (checkpoint folder or random:PRESET)")
    ap.add_argument("--archs", help="architectures to compare (comma list, or 'none')")
    ap.add_argument("--arch-preset", default="54m")
    ap.add_argument("--threads", type=_ints)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--pp", type=_ints)
    ap.add_argument("--tg", type=int)
    ap.add_argument("--contexts", type=_ints)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-analysis", action="store_true", help="skip roofline, footprint, op profiles, parity")
    a = ap.parse_args(argv)
    out = a.out or (str(Path(tempfile.gettempdir()) / "perseus-bench-quick") if a.quick else "studies/results/cpu")
    kw: dict = {"out_dir": out, "command": "python -m studies.cpu.harness " + " ".join(sys.argv[1:] if argv is None else argv)}
    if a.work_dir:
        kw["work_dir"] = a.work_dir
    if a.model:
        kw["models"] = dict(m.split("=", 1) for m in a.model)
    if a.archs is not None:
        names = [] if a.archs.strip().lower() == "none" else [x.strip() for x in a.archs.split(",") if x.strip()]
        kw["archs"] = {x: f"random:{a.arch_preset}" for x in names}
    elif a.arch_preset != "54m":
        kw["archs"] = {x: f"random:{a.arch_preset}" for x in ARCHS}
    if a.threads:
        kw["threads"] = kw["arch_threads"] = a.threads
    for name in ("reps", "pp", "tg", "contexts"):
        if getattr(a, name) is not None:
            kw[name] = getattr(a, name)
    if a.no_torch:
        kw["torch"] = False
    if a.no_analysis:
        kw.update(roofline=False, footprint=False, op_profile=False, parity=False)
    run_bench(BenchConfig.quick_config(**kw) if a.quick else BenchConfig(**kw))


if __name__ == "__main__":
    main()
