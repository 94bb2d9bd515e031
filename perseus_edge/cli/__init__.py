"""`perseus`: one command per pipeline stage (train -> export -> quantize -> run/serve -> bench).

This module imports no torch: each command imports its stage lazily, so the runtime commands
work on a device with only onnxruntime, numpy and tokenizers installed. Every user-facing failure
raises `PerseusError`, printed here as one line with exit code 1.
"""

from __future__ import annotations

import sys

import typer

from perseus_edge.errors import PerseusError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, export, quantize, run and benchmark small MoE-MLA-RoPE language models.")


def _register() -> None:
    """Attach each stage's commands (one module per stage, torch imported inside functions)."""
    from perseus_edge.cli import bench, core, export, quantize, run, serve

    for module in (core, export, quantize, run, serve, bench):
        module.register(app)


def main() -> None:
    _register()
    try:
        app()
    except PerseusError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
