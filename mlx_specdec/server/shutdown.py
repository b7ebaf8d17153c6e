"""Running the app with uvicorn, and stopping it in bounded time.

On SIGTERM (or Ctrl-C) the engine drains at once: requests waiting in line get a 503 that says
the server is shutting down, new ones too, and the running generation has `GRACE` seconds to
finish before it is cut (its client gets a last event, or a 503, saying so). uvicorn then waits
at most `CONNECTIONS_GRACE` seconds for the answers to go out, so the process is gone within
about five seconds. A second signal ends it at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
from types import FrameType
from typing import Any

import uvicorn

from .engine import Engine

GRACE = 1.0  # seconds the running generation may still take
CONNECTIONS_GRACE = 3.0  # seconds uvicorn waits for open answers before cancelling them


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:  # the second signal: no more waiting
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            return
        super().handle_exit(sig, frame)
        if self.loop is not None:  # (a signal handler: leave the work to the loop)
            self.loop.call_soon_threadsafe(self.engine.drain, GRACE)


def serve(app: Any, engine: Engine, host: str, port: int, log_level: str) -> None:
    """Serve `app` (built around `engine`) until a signal stops it."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=CONNECTIONS_GRACE,
    )
    _Server(config, engine).run()
