"""``lepton serve``: the inference server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lepton.cli.common import (
    RegistryOpt,
    _finite,
    app,
    err,
)


@app.command()
def serve(
    model: Annotated[list[str] | None, typer.Option(
        "--model", help="NAME, NAME@VERSION or NAME@production (repeatable).")] = None,
    registry: RegistryOpt = None,
    model_dir: Annotated[Path | None, typer.Option(
        "--model-dir", "--model_dir", help="Serve the Lepton bundle in this folder (a KServe runtime's /mnt/models) "
                                           "from a private registry instead of --registry.")] = None,
    model_name: Annotated[str | None, typer.Option(
        "--model-name", "--model_name", help="With --model-dir: the name it is served as.")] = None,
    keys_file: Annotated[Path | None, typer.Option(
        help="With --model-dir: API keys, one 'TENANT SCOPE KEY' line each (a mounted secret).")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "--http-port", "--http_port", help="Port.", min=0, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes on one port; each loads the models, batches "
                                               "on its own and polls the registry for swaps.", min=1, max=256)] = 1,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Disable API keys (loopback only).")] = False,
    backend: Annotated[str, typer.Option(help="auto or onnx.")] = "auto",
    precision: Annotated[str, typer.Option(
        help="fp32 (answers identical to the run's), bf16, int8, or auto (the fastest on this CPU that passes its "
             "check on the version's val set: AUC at most 0.005, segmentation Dice at most 0.01 below "
             "fp32).")] = "fp32",
    max_batch_size: Annotated[int, typer.Option(help="Largest dynamic batch.", min=1, max=1024)] = 32,
    max_wait_ms: Annotated[float, typer.Option(
        help="Longest wait to fill a batch.", click_type=_finite(0, 10_000))] = 5.0,
    batch_idle_ms: Annotated[float, typer.Option(help="Also close a batch when no request arrived for this "
                                                      "long (0 = off); lets --max-wait-ms be large.",
                                                      click_type=_finite(0, 10_000))] = 0.0,
    max_queue: Annotated[int, typer.Option(help="Queued requests per version before 503.", min=1, max=1_000_000)] = 256,
    model_concurrency: Annotated[int, typer.Option(
        help="Batches of a version run at once (0: 1 when batching, one per core with --max-batch-size 1).",
        min=0, max=1024)] = 0,
    rate_limit: Annotated[float, typer.Option(
        help="Requests per second per key (0 = off).", click_type=_finite(0, 1e6))] = 50.0,
    rate_burst: Annotated[int, typer.Option(
        help="Requests a key may send at once before the rate applies.", min=1, max=10**9)] = 100,
    poll_seconds: Annotated[float, typer.Option(
        help="Re-read the registry every N seconds (0 = admin call).", click_type=_finite(0, 86_400))] = 0,
    redis: Annotated[str | None, typer.Option(
        envvar="LEPTON_REDIS_URL", help="redis://HOST:PORT/DB: rate limits and admin reloads shared by replicas on "
                                        "several hosts (default: per host).")] = None,
    redis_prefix: Annotated[str, typer.Option(help="Prefix of this deployment's Redis keys.")] = "lepton",
    research_notice: Annotated[bool, typer.Option(
        "--research-notice/--no-research-notice",
        help="The web console's 'research use — not for diagnosis' notice on every page.")] = True,
    slide_dir: Annotated[Path | None, typer.Option(
        help="Slide models: where slide jobs keep their state and files (default: $LEPTON_HOME/slide-jobs).")] = None,
    slide_root: Annotated[Path | None, typer.Option(
        help="Slide models: clients may name slides under this folder instead of uploading them.")] = None,
    slide_workers: Annotated[int, typer.Option(help="Slide jobs run at once.", min=1, max=64)] = 1,
    slide_queue: Annotated[int, typer.Option(help="Slide jobs waiting or running before 503.", min=1,
                                             max=100_000)] = 8,
    dicomweb_allow: Annotated[list[str] | None, typer.Option(
        "--dicomweb-allow", help="Slide models: a DICOMweb service (http(s)://HOST:PORT/dicom-web) slide jobs may "
                                 "name a slide series on (repeatable); no other is contacted.")] = None,
) -> None:
    """Serve registered models over HTTP (native API, Open Inference Protocol v2, /metrics, the web console at
    /ui)."""
    import os

    # OpenMP threads that spin between batches starve the event loop; passive waiting measured
    # +18 % requests/s in benchmarks/serve_load.py. Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from lepton.serve import ServeConfig
    from lepton.serve import serve as serve_fn

    if workers < 1:
        raise typer.BadParameter(f"--workers must be at least 1 (got {workers})")
    if model_dir is not None:
        from lepton.serve.modeldir import registry_from_model_dir

        if model or registry:
            raise typer.BadParameter("--model-dir serves its own bundle: leave out --model and --registry")
        if not model_name:
            raise typer.BadParameter("--model-dir needs --model-name (KServe passes --model_name={{.Name}})")
        if keys_file is None and not no_auth:
            raise typer.BadParameter("--model-dir needs --keys-file (the API keys) or --no-auth on loopback")
        registry, model = registry_from_model_dir(model_dir, model_name, keys_file), [model_name]
    elif not model:
        raise typer.BadParameter("give --model NAME (repeatable), or --model-dir DIR --model-name NAME")
    elif keys_file is not None or model_name:
        raise typer.BadParameter("--keys-file and --model-name go with --model-dir")
    if no_auth:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise typer.BadParameter("--no-auth is only allowed on loopback (--host 127.0.0.1)")
        err.print("[bold red]WARNING: authentication is OFF; anyone on this machine can call the models.[/]")
    serve_fn(ServeConfig(models=model, registry=registry, auth=not no_auth, backend=backend,
                         precision=precision, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                         max_queue=max_queue, model_concurrency=model_concurrency,
                         batch_idle_ms=batch_idle_ms, rate_limit=rate_limit, rate_burst=rate_burst,
                         poll_seconds=poll_seconds, redis=redis or None, redis_prefix=redis_prefix,
                         ui_notice=research_notice, slide_dir=str(slide_dir) if slide_dir else None,
                         slide_root=str(slide_root) if slide_root else None, slide_workers=slide_workers,
                         slide_queue=slide_queue, dicomweb_allow=dicomweb_allow or []),
             host=host, port=port, workers=workers)


