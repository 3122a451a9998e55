"""Serve stage: an HTTP inference server over registered models (FastAPI on uvicorn)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile

from lepton.serve.app import CONFIG_ENV, ServeConfig, create_app

__all__ = ["ServeConfig", "create_app", "serve", "worker_config"]

#: Registry poll interval used with several workers when none is given: an admin reload reaches one worker.
WORKER_POLL_SECONDS = 2.0


def worker_config(config: ServeConfig, workers: int) -> ServeConfig:
    """The configuration each of ``workers`` processes runs with.

    A key's rate limit is split between the workers (a client may land on any of them, so the sum stays at
    the configured rate), and registry polling is switched on so that promotions reach every worker.
    """
    if workers <= 1:
        return config
    return dataclasses.replace(
        config,
        rate_limit=config.rate_limit / workers,
        rate_burst=max(1, math.ceil(config.rate_burst / workers)),
        poll_seconds=config.poll_seconds or WORKER_POLL_SECONDS,
    )


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the server with uvicorn (blocking); ``workers > 1`` starts that many processes on one socket."""
    import uvicorn

    if workers < 1:
        raise ValueError(f"workers must be at least 1 (got {workers})")
    if workers == 1:
        uvicorn.run(create_app(config), host=host, port=port, log_level="info", access_log=False)
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Each worker runs its own model copies: share the cores between them instead of oversubscribing.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))
    os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(worker_config(config, workers)))
    with tempfile.TemporaryDirectory(prefix="lepton-metrics-") as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # workers add up their metrics through files here
        uvicorn.run("lepton.serve.app:create_app_from_env", factory=True, workers=workers, host=host, port=port,
                    log_level="info", access_log=False)
