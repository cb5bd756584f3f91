"""Serving the HTTP app (the owner's page and the API) with uvicorn inside an event loop someone else owns: `ouro serve` (beside the
Telegram bot, same runtime and worker) or `ouro web` (alone).

The socket is bound here first, so a port in use is one clear error before anything starts, and
uvicorn's own signal handling stays off: the host decides when to stop (bot.app.run_until_stopped
gives replies their grace period, then the worker cuts them off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn
from starlette.applications import Starlette

from core.errors import OuroError

log = logging.getLogger(__name__)


class _HostedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """The host owns SIGINT and SIGTERM (uvicorn would take them over and re-raise them)."""
        yield


class HttpServer:
    """`await start()` binds and serves; `await stop()` stops taking requests and waits, up to `grace_s`,
    for those under way."""

    def __init__(self, app: Starlette, host: str, port: int, *, grace_s: float = 5.0) -> None:
        self.host = host
        self.port = port
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off",
                                server_header=False, timeout_graceful_shutdown=max(grace_s, 0.1))
        self._server = _HostedServer(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OuroError(f"cannot listen for HTTP on {self.host}:{self.port}: {exc.strerror}",
                            hint="pick a free port with OURO_HTTP_PORT (and OURO_HTTP_HOST)") from exc
        sock.listen(128)
        self.port = sock.getsockname()[1]   # the port the system chose for port 0
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OuroError(f"the HTTP server on {self.host}:{self.port} did not start")
            await asyncio.sleep(0.01)
        log.info("HTTP on http://%s:%s: the owner's page at / (log in: ouro web-login), the OpenAI-compatible "
                 "API under /v1", self.host, self.port)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
