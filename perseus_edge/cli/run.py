"""Runtime CLI commands: `perseus run`, `perseus demo`, `perseus to-ort`.

Nothing heavy is imported at module level (and torch never): onnxruntime, numpy and the
tokenizer load inside the commands. Generated text goes to stdout; notes and timings to stderr,
so `perseus run ... > out.txt` captures only the text.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from perseus_edge.errors import PerseusError

if TYPE_CHECKING:
    from perseus_edge.api import LanguageModel

DEFAULT_N = 128
MAX_PROMPT_BYTES = 16 << 20  # contexts are thousands of tokens; --truncate left keeps the end


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _quiet_numpy_threads() -> None:
    """numpy's BLAS does no heavy work here (ORT does): one thread, not a pool that reserves
    address space and competes with ORT's threads. Only effective before numpy's first import."""
    import os

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> Optional[str]:
    if prompt is not None and prompt_file is not None:
        raise PerseusError("give the prompt with -p or with --prompt-file, not both")
    if prompt_file is None:
        return prompt
    try:
        if str(prompt_file) == "-":
            data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
        else:
            if Path(prompt_file).is_dir():
                raise PerseusError(f"prompt file {prompt_file} is a folder")
            with open(prompt_file, "rb") as f:  # bounded: /dev/zero or a huge file never fills memory
                data = f.read(MAX_PROMPT_BYTES + 1)
    except OSError as e:
        raise PerseusError(f"cannot read prompt file {prompt_file}: {e.strerror}") from None
    if len(data) > MAX_PROMPT_BYTES:
        raise PerseusError(f"prompt file {prompt_file} is larger than {MAX_PROMPT_BYTES >> 20} MiB: "
                           f"far beyond any model context")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PerseusError(f"prompt file {prompt_file} is not valid UTF-8 "
                           f"(byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _stream(gen: LanguageModel, prompt, n: int, echo: bool, timings: bool, **kw) -> bool:
    """Print one generation as it streams, then notes and timings. False if interrupted by Ctrl-C."""
    pieces = gen.stream(prompt, n, **kw)  # checks every argument before printing anything
    out = sys.stdout
    if echo and isinstance(prompt, str):
        out.write(prompt)
        out.flush()
    interrupted = False
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        interrupted = True
        pieces.close()
    except BrokenPipeError:  # `perseus run ... | head`: the reader is gone, stop quietly
        pieces.close()
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # no error at exit's flush
        return True
    out.write("\n")
    out.flush()
    result = gen.last_result
    if result is not None:
        if result.note:
            _err(f"note: {result.note}")
        if interrupted:
            _err("interrupted: generation stopped")
        if timings:
            _err(result.timings.report())
    return not interrupted


def run(
    model_dir: Path = typer.Argument(..., help="Exported model folder (perseus export / quantize)."),
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="Prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "-f", "--prompt-file",
                                               help="Read the prompt from a UTF-8 file ('-' = stdin)."),
    n: Optional[int] = typer.Option(None, "-n", "--max-new-tokens",
                                    help="Tokens to generate (default 128, or what the context allows)."),
    threads: Optional[int] = typer.Option(None, "-t", "--threads", help="CPU threads (default: one per core)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "--temp",
                                                help="0 = greedy (default: generation_config.json, else 0)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass in (0, 1]."),
    repeat_penalty: Optional[float] = typer.Option(None, "--repeat-penalty",
                                                   help="> 1 discourages repeats (1 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (reproducible runs)."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep going past end-of-sequence."),
    truncate: str = typer.Option("none", "--truncate",
                                 help="none: a prompt too long for the context is an error; "
                                      "left: keep its last tokens."),
    low_memory: bool = typer.Option(False, "--low-memory",
                                    help="Mobile-class memory: no arena, no mem pattern, no prepacking."),
    format: str = typer.Option("auto", "--format", help="auto, onnx or ort (model.ort from perseus to-ort)."),
    verify: bool = typer.Option(True, "--verify/--no-verify",
                                help="Check every file's sha256 against the manifest before loading."),
    interactive: bool = typer.Option(False, "-i", "--interactive",
                                     help="Read one prompt per line; Ctrl-D or Ctrl-C quits."),
    echo: bool = typer.Option(True, "--echo/--no-echo", help="Print the prompt before the generated text."),
    show_timings: bool = typer.Option(True, "--timings/--no-timings", help="Print timings at the end."),
) -> None:
    """Generate text from an exported model folder with ONNX Runtime (no torch needed)."""
    _quiet_numpy_threads()
    from perseus_edge.api import load
    from perseus_edge.runtime.generate import TRUNCATE
    from perseus_edge.sampling import Sampler

    text = _read_prompt(prompt, prompt_file)
    if text is None and not interactive:
        raise PerseusError("no prompt: give -p TEXT or --prompt-file FILE (or -i for interactive mode)")
    if n is not None and n < 1:
        raise PerseusError(f"-n must be at least 1, got {n}")
    if threads is not None and threads < 1:
        raise PerseusError(f"--threads must be at least 1, got {threads}")
    if truncate not in TRUNCATE:
        raise PerseusError(f"--truncate must be one of {', '.join(TRUNCATE)}, got {truncate!r}")
    # check the sampling flags before the (slower) model load
    Sampler(temperature=0.0 if temperature is None else temperature, top_k=top_k or 0,
            top_p=1.0 if top_p is None else top_p,
            repetition_penalty=1.0 if repeat_penalty is None else repeat_penalty, seed=seed)
    if hasattr(sys.stdout, "reconfigure"):  # never die printing a character the terminal lacks
        sys.stdout.reconfigure(errors="replace")
    gen = load(model_dir, threads=threads, low_memory=low_memory, format=format, verify=verify)
    if n is None:
        n = min(DEFAULT_N, gen.max_context - 1)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repeat_penalty,
              seed=seed, stop=list(stop or []), truncate=truncate, ignore_eos=ignore_eos)
    if text is not None and not interactive:
        if not _stream(gen, text, n, echo, show_timings, **kw):
            raise typer.Exit(130)
        return
    if text is not None:  # -i with -p: answer the first prompt, then read more
        _stream(gen, text, n, echo, show_timings, **kw)
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    _err(f"interactive mode ({gen.path}, context {gen.max_context}): "
         f"one prompt per line, Ctrl-D or Ctrl-C to quit")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            _err("")
            return
        if not line.strip():
            continue
        try:
            _stream(gen, line, n, False, show_timings, **kw)
        except PerseusError as e:  # e.g. a line longer than the context: report and go on
            _err(f"error: {e}")


def demo(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint",
                                              help="Another checkpoint folder (default: the shipped model)."),
    prompt: str = typer.Option("Once upon a time", "-p", "--prompt"),
    n: int = typer.Option(200, "-n", "--max-new-tokens"),
    threads: Optional[int] = typer.Option(None, "-t", "--threads"),
    temperature: Optional[float] = typer.Option(None, "--temperature", "--temp",
                                                help="Default: the model's generation_config.json."),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    quantize: bool = typer.Option(True, "--quantize/--no-quantize", help="Run the int8 model when available."),
) -> None:
    """Tell a story with the shipped model: exported and quantized once (cached), then streamed."""
    _quiet_numpy_threads()
    from perseus_edge.api import load
    from perseus_edge.cli.demo import prepare
    from perseus_edge.sampling import Sampler

    if n < 1:
        raise PerseusError(f"-n must be at least 1, got {n}")
    if threads is not None and threads < 1:  # before the first-run build, not minutes after it
        raise PerseusError(f"--threads must be at least 1, got {threads}")
    if not prompt:
        raise PerseusError("empty prompt: give at least one character of text")
    Sampler(temperature=0.0 if temperature is None else temperature, top_k=top_k or 0,
            top_p=1.0 if top_p is None else top_p, seed=seed)
    model_dir = prepare(checkpoint, quantize=quantize, log=_err)
    gen = load(model_dir, threads=threads)
    n = min(n, gen.max_context - len(gen.encode(prompt)))
    if n < 1:
        raise PerseusError(f"the prompt leaves no room in the model's context of {gen.max_context}")
    _err(f"model: {model_dir}")
    if not _stream(gen, prompt, n, True, True, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed):
        raise typer.Exit(130)


def to_ort(
    model_dir: Path = typer.Argument(..., help="Exported model folder."),
    platform: str = typer.Option("portable", "--platform",
                                 help="portable, arm, or amd64 (x86-only layouts)."),
) -> None:
    """Add model.ort (ORT mobile format) and its required-operator list to a model folder."""
    from perseus_edge.lower.ort_format import convert_to_ort

    out = convert_to_ort(model_dir, platform)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB) and {out.parent / 'model.required_operators.config'}")
    print(f"run it with: perseus run {model_dir} --format ort -p \"...\"")


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(demo)
    app.command("to-ort")(to_ort)
