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

    if app.registered_commands:  # main() called again in one process (tests)
        return
    for module in (core, export, quantize, run, serve, bench):
        module.register(app)


def _fail(message: str, code: int = 1) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Run one command (`argv`, default sys.argv[1:]); exits. Every failure the user can fix is
    one `error:` line and a non-zero exit, never a traceback."""
    try:  # typer >= 0.2x vendors click as typer._click
        from typer._click import exceptions as cx
    except ImportError:
        from click import exceptions as cx

    try:
        _register()
        code = app(args=argv, prog_name="perseus", standalone_mode=False)
    except PerseusError as e:
        _fail(str(e))
    except cx.UsageError as e:  # bad flag value, unknown command or option: exit 2
        if type(e).__name__ == "NoArgsIsHelpError":  # `perseus` alone: the help
            print(e.ctx.get_help())
            sys.exit(2)
        name = e.ctx.command_path if e.ctx is not None else "perseus"
        _fail(f"{e.format_message()} (see {name} --help)", 2)
    except (KeyboardInterrupt, typer.Abort):
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except MemoryError:
        _fail("out of memory: use smaller sizes (--batch-size, --seq-len, --context) or free some memory")
    except BrokenPipeError:  # `perseus ... | head`: the reader is gone
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:  # disk full, read-only or unreadable files that no command caught itself
        from perseus_edge.atomic import describe_oserror

        _fail(describe_oserror(e))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
