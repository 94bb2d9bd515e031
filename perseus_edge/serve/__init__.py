"""perseus_edge.serve: an OpenAI-compatible local HTTP server with continuous batching.

    perseus serve model-int8/ --port 8080          # binds 127.0.0.1; --api-key to require a key

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")
    client.completions.create(model="model-int8", prompt="Once upon a time", max_tokens=32)

Modules, one job each:
    engine    Engine: the scheduler thread; requests share one batched decode step per token
    protocol  OpenAI request schemas (strict), response bodies, errors, the chat template
    app       the Starlette app: routes, API key, limits, server-sent events, disconnects
    (here)    Limits; load(): folder -> App; Server: uvicorn on a socket, foreground or thread

Needs the `serve` extra (starlette, uvicorn, pydantic); torch-free like the runtime.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from perseus_edge.errors import PerseusError


@dataclass
class Limits:
    """What one request may ask for. None: the model's context decides."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # default: context - 1
    max_tokens: int | None = None  # per request; default: context - 1
    default_max_tokens: int = 256  # when a request gives none (OpenAI's completions default is 16)


def load(model_dir: str | os.PathLike, *, slots: int = 8, threads: int | None = None,
         low_memory: bool = False, format: str = "auto", verify: bool = True,
         max_waiting: int = 64, api_key: str | None = None, model_name: str | None = None,
         limits: Limits | None = None):
    """Open a model folder and build the app (the engine thread starts with the server)."""
    try:
        from perseus_edge.serve.app import App
    except ImportError as e:
        raise PerseusError(f"`perseus serve` needs the serve extra: pip install 'perseus-edge[serve]' "
                           f"({(e.name or '?').split('.')[0]} is missing)") from None
    from perseus_edge.modelfile.reader import open_folder
    from perseus_edge.serve.engine import Engine

    folder = open_folder(model_dir, format=format, verify=verify)
    engine = Engine(folder, slots=slots, threads=threads, low_memory=low_memory, max_waiting=max_waiting)
    return App(engine, model_name or Path(model_dir).resolve().name, api_key=api_key, limits=limits)


class Server:
    """uvicorn serving an App on host:port (port 0: a free one), with the engine thread.

        with Server(app, port=0) as s:      # background thread (tests, load tests)
            s.url                            # http://127.0.0.1:PORT
        Server(app, port=8080).run()         # foreground until Ctrl-C
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning"):
        import uvicorn

        self.app = app
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise PerseusError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        # listening from here on: a client that connects as soon as the address is printed
        # waits in the backlog until uvicorn accepts, instead of being refused
        self.sock.listen(2048)
        self.host, self.port = host, self.sock.getsockname()[1]
        engine = app.engine
        # uvicorn's own cap on requests in flight (a plain-text 503 beyond it): a last guard
        # against connection floods, well above what the engine's queue lets in (JSON 429 first)
        cap = max(256, 4 * (engine.slots + engine.max_waiting))
        self.uvicorn = uvicorn.Server(uvicorn.Config(app.asgi, log_level=log_level, access_log=False,
                                                     limit_concurrency=cap, timeout_graceful_shutdown=5))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve in the foreground until interrupted (uvicorn handles SIGINT/SIGTERM)."""
        self.app.engine.start()
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.app.engine.stop()
            self.sock.close()

    def __enter__(self) -> "Server":
        self.app.engine.start()
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]},
                                        name="perseus-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise PerseusError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.app.engine.stop()
        self.sock.close()
