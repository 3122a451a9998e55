"""How a server runs: ``ServeConfig``, and the environment variable that carries it to worker processes."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Environment variable that carries the ServeConfig (JSON) to worker processes started by uvicorn.
CONFIG_ENV = "LEPTON_SERVE_CONFIG"

#: The numeric settings' bounds: (low, high, whole number), inclusive. ``lepton serve``'s options state the same.
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "max_batch_size": (1, 1024, True),
    "max_wait_ms": (0, 10_000, False),
    "batch_idle_ms": (0, 10_000, False),
    "max_queue": (1, 1_000_000, True),
    "model_concurrency": (0, 1024, True),
    "max_upload_bytes": (1, 4 << 30, True),
    "rate_limit": (0, 1_000_000, False),
    "rate_burst": (1, 1_000_000_000, True),
    "poll_seconds": (0, 86_400, False),
    "key_cache_seconds": (0, 3_600, False),
    "max_slide_bytes": (1, 1 << 40, True),
    "slide_workers": (1, 64, True),
    "slide_queue": (1, 100_000, True),
    "slide_job_hours": (0.001, 24 * 365, False),
}


@dataclass
class ServeConfig:
    """How the server runs; ``models`` are registry references (``name``, ``name@3``, ``name@production``)."""

    models: list[str]
    registry: str | None = None
    auth: bool = True
    backend: str = "auto"
    # Numeric precision of every served version: fp32 (answers identical to the run's), bf16, int8 or auto (the
    # fastest on this CPU that passes its check on the version's val set; see lepton.precision).
    precision: str = "fp32"
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    batch_idle_ms: float = 0.0  # > 0: a batch also closes when no request arrived for this long
    max_queue: int = 256
    # Batches of one version that may run at once; 0: one when batching, one per core when max_batch_size is 1
    # (single requests side by side, as a threaded endpoint runs them).
    model_concurrency: int = 0
    max_upload_bytes: int = 32 << 20
    rate_limit: float = 50.0  # requests per second per key; 0 disables
    rate_burst: int = 100
    poll_seconds: float = 0.0  # 0: swaps only through POST /v1/admin/reload
    key_cache_seconds: float = 2.0  # how long an accepted API key is trusted before it is checked again
    shared_dir: str | None = None  # set by `serve` for worker processes: rate limits and reloads shared there
    # Replicas on several hosts: rate-limit buckets and the reload signal in Redis (redis://HOST:PORT/DB), under
    # keys that start with ``redis_prefix`` (one prefix per deployment sharing a Redis).
    redis: str | None = None
    redis_prefix: str = "lepton"
    ui_notice: bool = True  # the console's "research use — not for diagnosis" notice on every page
    freeze_heap: bool = True  # gc.freeze() after models load: no full-heap garbage collection pauses under load
    # Whole-slide jobs (slide models, lepton.serve.slides): their folder (default $LEPTON_HOME/slide-jobs), a folder
    # clients may name slides under (None: uploads only), the largest upload, jobs run at once, jobs waiting or
    # running per process before 503, and how long an ended job's files are kept.
    slide_dir: str | None = None
    slide_root: str | None = None
    max_slide_bytes: int = 4 << 30
    slide_workers: int = 1
    slide_queue: int = 8
    slide_job_hours: float = 24.0
    # DICOMweb services (base URLs, http(s)://HOST:PORT/PATH) a slide job may name its slide on; the server fetches
    # from no other (a reference to any other is refused 403). Empty: no slide by reference.
    dicomweb_allow: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Every number finite and within BOUNDS (3.0 taken as 3 where a whole number is meant); ConfigError naming
        the setting otherwise, before anything starts."""
        from lepton.config import check_number

        for key, (low, high, whole) in BOUNDS.items():
            setattr(self, key, check_number(key, getattr(self, key), low, high, whole))
        self.dicomweb_allow = dicomweb_bases(self.dicomweb_allow)


def dicomweb_bases(urls: list[str]) -> list[str]:
    """Trusted DICOMweb base URLs as ``lepton.hospital.dicomweb.Source`` spells a source's base (so a reference matches
    by equality); ConfigError for one that is not an http(s) URL with a host, or that carries a query."""
    from lepton.errors import ConfigError, DataError
    from lepton.hospital.dicomweb import SCHEME, Source

    bases = []
    for url in urls or []:
        text = str(url).strip()
        try:
            source = Source.parse(text if text.startswith(SCHEME) else SCHEME + text)
        except DataError as exc:
            raise ConfigError(f"dicomweb_allow: {exc}") from None
        if source.filters or source.limit or "?" in text:
            raise ConfigError(f"dicomweb_allow: {text!r} carries a query; give the service's base URL only "
                              "(http://HOST:PORT/dicom-web)")
        bases.append(source.base)
    return bases
