"""`adactl serve`: an OpenAI-compatible streaming server around one engine loop and its controllers.

    connections (FastAPI, asyncio) --commands--> EngineService thread: ControlLoop.step() ...
               <----- events (tokens, done) ---

- `api.OpenAIServer`: the HTTP routes, request validation, server-sent events;
- `service.EngineService`: the one thread that owns the engine and steps it;
- `metrics.ServerMetrics`: the Prometheus metrics;
- `adactl.stacks.build_stack` (re-exported): controller stacks by name (`fcfs,goodput`, ...);
- `text.TextStream`: incremental detokenization with stop strings;
- `ServerThread`: run an app on 127.0.0.1 in a background thread (tests, `adactl bench serve`).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from adactl.stacks import DEFAULT_STACK, StackContext, build_stack

from .api import OpenAIServer
from .metrics import ServerMetrics
from .service import EngineService, ServiceConfig

__all__ = [
    "DEFAULT_STACK",
    "EngineService",
    "OpenAIServer",
    "ServerMetrics",
    "ServerThread",
    "ServiceConfig",
    "StackContext",
    "build_stack",
    "free_port",
]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn serving `app` on `host:port` in a daemon thread; `with ServerThread(app) as s: s.url`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(
            app, host=self.host, port=self.port, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="adactl-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
