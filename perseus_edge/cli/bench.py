"""Bench CLI commands: `perseus bench` (our llama-bench) and `perseus profile` (footprint + op time).

Both are torch-free; onnx, onnxruntime and llama_cpp are imported inside the commands.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from perseus_edge.errors import PerseusError


def _ints(text: str, flag: str, least: int) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise PerseusError(f"{flag} takes a comma-separated list of integers, got {text!r}") from None
    if not values or min(values) < least:
        raise PerseusError(f"{flag} takes integers >= {least}, got {text!r}")
    return values


def bench(
    model: List[str] = typer.Option(..., "-m", "--model",
                                    help="Model folder (onnxruntime) or .gguf file (llama.cpp); repeatable."),
    n_prompt: str = typer.Option("512", "-p", "--n-prompt", help="Prompt lengths of the pp tests (0 = none)."),
    n_gen: str = typer.Option("128", "-n", "--n-gen", help="Tokens of the tg tests (0 = none)."),
    n_depth: str = typer.Option("0", "-d", "--n-depth", help="Tokens already in the cache before each test."),
    threads: Optional[str] = typer.Option(None, "-t", "--threads", help="Thread counts (default: one per core)."),
    reps: int = typer.Option(5, "-r", "--repetitions", help="Timed repetitions of each test (after a warm-up)."),
    output: str = typer.Option("md", "-o", "--output", help="md, json or csv, on stdout."),
) -> None:
    """Time prompt processing (pp) and generation (tg) of models, like llama-bench: interleaved
    rounds over every (model, threads, test), one worker process per (model, threads)."""
    from perseus_edge.bench.rounds import make_tests, run_bench
    from perseus_edge.bench.tables import FORMATS, render
    from perseus_edge.runtime.session import default_threads

    if output not in FORMATS:
        raise PerseusError(f"-o takes one of {', '.join(FORMATS)}, got {output!r}")
    if reps < 1:
        raise PerseusError(f"-r takes an integer >= 1, got {reps}")
    tests = make_tests(_ints(n_prompt, "-p", 0), _ints(n_gen, "-n", 0), _ints(n_depth, "-d", 0))
    thread_counts = _ints(threads, "-t", 1) if threads else [default_threads()]
    records = run_bench(model, tests, thread_counts, reps)
    sys.stdout.write(render(records, output))


def profile(
    model_dirs: List[Path] = typer.Argument(..., help="Exported model folder(s); several = compare (e.g. fp32/int8/int4)."),
    out: Path = typer.Option(Path("/tmp/perseus-profile"), "--out", "-o",
                             help="Folder for profile.json (and the ORT trace with --keep-trace)."),
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

    from perseus_edge.bench.footprint import footprint, markdown_table

    for d in model_dirs:
        if not (Path(d) / "model.onnx").is_file():
            raise PerseusError(f"{d} is not an exported model folder (no model.onnx)")
    if threads < 1 or steps < 1 or prefill < 1 or context < 1:
        raise PerseusError("--threads, --prefill, --context and --steps must be positive")
    _output_folder(out)
    labels = _labels(model_dirs)
    fps = [footprint(d, threads=threads, prefill=prefill, measure=not no_measure, label=lab)
           for d, lab in zip(model_dirs, labels)]
    print("## Memory footprint (MiB)\n")
    print(markdown_table(fps))
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
    print(f"\nwrote {out / 'profile.json'}")


def _output_folder(out: Path) -> None:
    """-o must be a folder we can write into (not an existing file, not read-only)."""
    if out.exists() and not out.is_dir():
        raise PerseusError(f"-o {out} is an existing file: give a folder for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PerseusError(f"cannot create {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise PerseusError(f"cannot write into {out}: permission denied")


def _labels(dirs: List[Path]) -> list[str]:
    """Short distinct labels: the folder name, with its parent's when names repeat."""
    names = [Path(d).resolve().name for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(d).resolve().parent.name}/{Path(d).resolve().name}" for d in dirs]


def register(app: typer.Typer) -> None:
    app.command()(bench)
    app.command()(profile)
