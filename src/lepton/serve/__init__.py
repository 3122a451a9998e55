"""Serve stage: an HTTP inference server over registered models (FastAPI on uvicorn)."""

from lepton.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app", "serve"]


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the server with uvicorn (blocking)."""
    import uvicorn

    if workers > 1:
        raise ValueError("use one worker per process; run several processes behind a load balancer")
    uvicorn.run(create_app(config), host=host, port=port, log_level="info", access_log=False)
