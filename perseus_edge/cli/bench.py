"""Bench CLI commands: `perseus bench` (our llama-bench) and `perseus profile` (footprint + op time).

Heavy imports (onnx, onnxruntime, torch, matplotlib) happen inside the commands.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from perseus_edge.errors import PerseusError


def _ints(text: Optional[str], what: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise PerseusError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise PerseusError(f"{what} must hold positive integers, got {text!r}")
    return values


def bench(
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Folder for bench.json, README.md, plots (default studies/results/cpu; "
                                            "with --quick /tmp/perseus-bench-quick, so a quick run never "
                                            "replaces the committed results)."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir",
                                            help="Exports, quantized folders, random checkpoints (default /tmp/perseus-bench)."),
    quick: bool = typer.Option(False, "--quick", help="Smaller matrix: 2 threads, pp64, tg16 @16/@900, 3 reps."),
    model: List[str] = typer.Option([], "--model",
                                    help="NAME=SOURCE, repeatable; SOURCE a checkpoint folder or random:PRESET. "
                                         "Default: 17m=the shipped checkpoint, 54m=random:54m."),
    archs: Optional[str] = typer.Option(None, "--archs",
                                        help="Architectures to compare at --arch-preset (comma list, or 'none')."),
    arch_preset: str = typer.Option("54m", "--arch-preset"),
    threads: Optional[str] = typer.Option(None, "--threads", help="Thread counts, e.g. 1,2."),
    reps: Optional[int] = typer.Option(None, "--reps", help="Timed repetitions per test."),
    pp: Optional[str] = typer.Option(None, "--pp", help="Prefill lengths, e.g. 64,256."),
    tg: Optional[int] = typer.Option(None, "--tg", help="Decode steps per tg test."),
    contexts: Optional[str] = typer.Option(None, "--contexts", help="tg contexts, e.g. 16,256,512,900."),
    no_torch: bool = typer.Option(False, "--no-torch", help="Skip the PyTorch eager baseline."),
    no_analysis: bool = typer.Option(False, "--no-analysis", help="Skip roofline, footprint, op profiles, parity."),
) -> None:
    """Benchmark prompt processing and token generation per backend, variant and thread count."""
    from perseus_edge.bench.harness import ARCHS, BenchConfig, run_bench

    if out is None:
        import tempfile

        out = Path(tempfile.gettempdir()) / "perseus-bench-quick" if quick else Path("studies/results/cpu")
    kw: dict = {"out_dir": str(out), "command": "perseus bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])}
    if work_dir:
        kw["work_dir"] = str(work_dir)
    if model:
        models = {}
        for m in model:
            name, sep, source = m.partition("=")
            if not sep or not name or not source:
                raise PerseusError(f"--model takes NAME=SOURCE, got {m!r}")
            if not source.startswith("random:") and not Path(source).is_dir():
                raise PerseusError(f"checkpoint folder not found: {source}")
            models[name] = source
        kw["models"] = models
    if archs is not None:
        names = [] if archs.strip().lower() == "none" else [a.strip() for a in archs.split(",") if a.strip()]
        bad = [a for a in names if a not in ARCHS]
        if bad:
            raise PerseusError(f"unknown architecture {bad[0]!r} (choose from {', '.join(ARCHS)})")
        kw["archs"] = {a: f"random:{arch_preset}" for a in names}
    elif arch_preset != "54m":
        kw["archs"] = {a: f"random:{arch_preset}" for a in ARCHS}
    if threads:
        kw["threads"] = kw["arch_threads"] = _ints(threads, "--threads")
    if reps is not None:
        if reps < 1:
            raise PerseusError("--reps must be at least 1")
        kw["reps"] = reps
    if pp:
        kw["pp"] = _ints(pp, "--pp")
    if tg is not None:
        kw["tg"] = tg
    if contexts:
        kw["contexts"] = _ints(contexts, "--contexts")
    if no_torch:
        kw["torch"] = False
    if no_analysis:
        kw.update(roofline=False, footprint=False, op_profile=False, parity=False)
    cfg = BenchConfig.quick_config(**kw) if quick else BenchConfig(**kw)
    run_bench(cfg)


def profile(
    model_dirs: List[Path] = typer.Argument(..., help="Exported model folder(s); several = compare (e.g. fp32/int8/int4)."),
    out: Path = typer.Option(Path("/tmp/perseus-profile"), "--out", "-o",
                             help="Folder for profile.json, footprint.png (and the ORT trace with --keep-trace)."),
    threads: int = typer.Option(1, "--threads"),
    prefill: int = typer.Option(256, "--prefill", help="Prompt tokens of the measured first run."),
    context: int = typer.Option(16, "--context", help="Cached tokens before the profiled decode steps."),
    steps: int = typer.Option(32, "--steps", help="Profiled decode steps."),
    no_measure: bool = typer.Option(False, "--no-measure", help="Static breakdown only (no run)."),
    no_ops: bool = typer.Option(False, "--no-ops", help="Skip the ORT operator profile."),
    keep_trace: bool = typer.Option(False, "--keep-trace", help="Keep onnxruntime's profile trace JSON in --out."),
) -> None:
    """Memory footprint by component (weights, cache, activations, overhead) and time by operator."""
    import json

    from perseus_edge.bench.footprint import footprint, markdown_table, plot_footprint

    for d in model_dirs:
        if not (Path(d) / "model.onnx").is_file():
            raise PerseusError(f"{d} is not an exported model folder (no model.onnx)")
    if threads < 1 or steps < 1 or prefill < 1 or context < 1:
        raise PerseusError("--threads, --prefill, --context and --steps must be positive")
    out.mkdir(parents=True, exist_ok=True)
    labels = _labels(model_dirs)
    fps = [footprint(d, threads=threads, prefill=prefill, measure=not no_measure, label=lab)
           for d, lab in zip(model_dirs, labels)]
    print("## Memory footprint (MiB)\n")
    print(markdown_table(fps))
    plot = plot_footprint(fps, out / "footprint.png")
    result = {"footprint": fps, "op_profile": []}
    if not no_ops:
        from perseus_edge.bench.opprofile import markdown_tables, op_profile

        for d, lab in zip(model_dirs, labels):
            prof = op_profile(d, threads=threads, context=context, steps=steps,
                              trace_dir=out if keep_trace else None, keep_trace=keep_trace)
            result["op_profile"].append({"label": lab, **prof})
            print(f"\n## Decode step time by operator: {lab}\n")
            print(markdown_tables(prof))
    (out / "profile.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nwrote {out / 'profile.json'} and {plot}")


def _labels(dirs: List[Path]) -> list[str]:
    """Short distinct labels: the folder name, with its parent's when names repeat."""
    names = [Path(d).resolve().name for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(d).resolve().parent.name}/{Path(d).resolve().name}" for d in dirs]


def register(app: typer.Typer) -> None:
    app.command()(bench)
    app.command()(profile)
