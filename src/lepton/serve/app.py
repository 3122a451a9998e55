"""The application factory: the server state, its lifespan (load, poll, follow other workers, drain), the
error handlers, the access middleware and the routers (health, native v1, OIP v2, admin)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI

from lepton import __version__
from lepton.serve.config import CONFIG_ENV, ServeConfig
from lepton.serve.errors import install_error_handlers
from lepton.serve.middleware import AccessMiddleware
from lepton.serve.routers import admin, health, native, oip
from lepton.serve.state import Server

__all__ = ["CONFIG_ENV", "ServeConfig", "create_app", "create_app_from_env"]

log = logging.getLogger("lepton.serve")

#: How often a worker checks whether another worker was asked to reload (with several workers).
RELOAD_WATCH_SECONDS = 0.25


async def _repeat(seconds: float, step, failure: str) -> None:
    """Run ``await step()`` every ``seconds`` until cancelled; a failure is logged and the next round tries again."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await step()
        except Exception as exc:
            log.error("%s: %s", failure, exc)


def create_app_from_env() -> FastAPI:
    """The app for a worker process: ``ServeConfig`` from ``$LEPTON_SERVE_CONFIG`` (see ``lepton.serve.serve``)."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"{CONFIG_ENV} is not set; start workers with `lepton serve --workers N`")
    # A spawned worker starts with bare logging: the same format as the CLI, to stderr.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return create_app(ServeConfig(**json.loads(raw)))


def create_app(config: ServeConfig) -> FastAPI:
    """The FastAPI application for ``config`` (models load at start-up)."""
    server = Server(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.reload()
        loop = asyncio.get_running_loop()
        tasks = []
        if config.poll_seconds > 0:  # promotions made with the CLI reach the server
            tasks.append(loop.create_task(_repeat(config.poll_seconds, server.reload, "registry poll failed")))
        if server.reload_signal is not None:  # another worker answered an admin reload: reload here too
            async def follow() -> None:
                if server.reload_signal.changed():
                    await server.reload()

            tasks.append(loop.create_task(_repeat(RELOAD_WATCH_SECONDS, follow,
                                                  "reload requested by another worker failed")))
        yield
        for task in tasks:
            task.cancel()
        await server.close()

    app = FastAPI(title="Lepton inference server", version=__version__, lifespan=lifespan)
    app.state.server = server
    install_error_handlers(app)
    app.add_middleware(AccessMiddleware, server=server)
    for router in (native.router, oip.router, health.router, admin.router):  # the inference routes match first
        app.include_router(router)
    return app
