"""Running the server: uvicorn over the app, one process or several sharing a socket (each with its share of the
cores, token buckets and metrics shared through files), and the configuration each worker process runs with."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile

from lepton.serve.app import create_app
from lepton.serve.config import CONFIG_ENV, ServeConfig
from lepton.serve.middleware import json_access_log

#: Registry poll interval used with several workers when none is given (promotions made with the CLI).
WORKER_POLL_SECONDS = 2.0


def worker_config(config: ServeConfig, workers: int, shared_dir: str | None = None) -> ServeConfig:
    """The configuration each of ``workers`` processes runs with.

    Registry polling is switched on so that promotions made with the CLI reach every worker. With
    ``shared_dir`` (what ``serve`` uses) the workers share their token buckets and admin reloads through files
    there; without it a key's rate limit is split between the workers, so the sum stays at the configured rate.
    """
    if workers <= 1:
        return config
    if shared_dir is not None:
        return dataclasses.replace(config, shared_dir=shared_dir, poll_seconds=config.poll_seconds or
                                   WORKER_POLL_SECONDS)
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
    json_access_log()
    if workers == 1:
        uvicorn.run(create_app(config), host=host, port=port, log_level="info", access_log=False)
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Each worker runs its own model copies: share the cores between them instead of oversubscribing.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))
    with tempfile.TemporaryDirectory(prefix="lepton-serve-") as shared_dir:
        metrics_dir = os.path.join(shared_dir, "metrics")
        os.mkdir(metrics_dir)
        os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(worker_config(config, workers, shared_dir)))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # workers add up their metrics through files here
        uvicorn.run("lepton.serve.app:create_app_from_env", factory=True, workers=workers, host=host, port=port,
                    log_level="info", access_log=False)
