"""`perseus serve MODEL`: the OpenAI-compatible local server (perseus_edge.serve)."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import Optional

import typer

from perseus_edge.errors import PerseusError


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model_dir: Path = typer.Argument(..., help="Exported model folder (perseus export / quantize)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: loopback only)."),
    port: int = typer.Option(8080, "--port", help="TCP port (0: any free port)."),
    slots: int = typer.Option(8, "--slots", help="Requests decoded together (cache slots)."),
    threads: Optional[int] = typer.Option(None, "-t", "--threads", help="CPU threads (default: one per core)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PERSEUS_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' (or set $PERSEUS_API_KEY)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Model id clients send (default: the folder name)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait for a slot; more get 429."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Largest max_tokens a request may ask (default: the context)."),
    default_max_tokens: int = typer.Option(256, "--default-max-tokens", help="max_tokens of a request that gives none."),
    max_prompt_tokens: Optional[int] = typer.Option(None, "--max-prompt-tokens", help="Longest prompt in tokens (default: the context - 1)."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body."),
    low_memory: bool = typer.Option(False, "--low-memory", help="Mobile-class memory: no arena, no prepacking."),
    format: str = typer.Option("auto", "--format", help="auto, onnx or ort."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every file's sha256 first."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn's log level (info shows each request)."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, decoding concurrent requests together."""
    from perseus_edge.cli.run import _quiet_numpy_threads

    _quiet_numpy_threads()
    for name, value, low in (("--slots", slots, 1), ("--max-queue", max_queue, 0), ("--port", port, 0),
                             ("--max-body-bytes", max_body_bytes, 1), ("--default-max-tokens", default_max_tokens, 1),
                             ("--max-tokens", max_tokens, 1), ("--max-prompt-tokens", max_prompt_tokens, 1),
                             ("--threads", threads, 1)):
        if value is not None and value < low:
            raise PerseusError(f"{name} must be at least {low}, got {value}")
    if api_key is not None and not api_key.strip():
        raise PerseusError("--api-key is empty")
    import perseus_edge.serve as srv

    limits = srv.Limits(max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens,
                    max_tokens=max_tokens, default_max_tokens=default_max_tokens)
    app = srv.load(model_dir, slots=slots, threads=threads, low_memory=low_memory, format=format,
                   verify=verify, max_waiting=max_queue, api_key=api_key, model_name=model_name,
                   limits=limits)
    server = srv.Server(app, host=host, port=port, log_level=log_level)
    if not _is_loopback(host) and api_key is None:
        print(f"warning: listening on {host} without an API key: anyone who can reach this port "
              f"can use the model (set --api-key)", file=sys.stderr)
    engine = app.engine
    print(f"serving {app.model_name} ({model_dir}, context {engine.max_context}, {slots} slots, "
          f"{engine.model.threads} threads) at {server.url}/v1"
          + (" (API key required)" if api_key else ""), file=sys.stderr, flush=True)
    server.run()


def register(app: typer.Typer) -> None:
    app.command()(serve)
