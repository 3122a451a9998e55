"""Federated training simulated on one machine with Flower's simulation engine (Ray): a source shared between N
virtual sites (``lepton data partition``), each a ClientApp on its own share; the same ServerApp and run directory
as on the Deployment Engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lepton.errors import ConfigError


def simulate(source: str, sites: int, settings: dict[str, Any], scheme: str = "iid", alpha: float = 0.5,
             seed: int = 0, sites_dir: Path | None = None, cpus_per_site: float = 1.0) -> Path:
    """Partition ``source`` into ``sites`` shares (written to ``sites_dir``, default ``OUTPUT/NAME-sites``) and run
    the federation on Flower's simulation engine; returns the run directory."""
    try:
        from flwr.simulation import run_simulation
    except ImportError:
        raise ConfigError("simulation needs Flower's simulation engine: pip install 'lepton[federated,simulation]'") \
            from None
    from lepton.data import load_dataset
    from lepton.data.index.partition import write_partition
    from lepton.federated import check_settings
    from lepton.federated.apps import build_client_app, build_server_app
    from lepton.rundir import INFO, RunDir

    settings = check_settings(settings)
    if not settings.get("name"):
        raise ConfigError("a simulation needs a run name (--name)")
    settings["output-dir"] = str(Path(settings.get("output-dir", "runs")).resolve())
    settings.setdefault("min-sites", sites)
    run_dir = Path(settings["output-dir"]) / settings["name"]
    sites_dir = Path(sites_dir) if sites_dir else Path(settings["output-dir"]) / f"{settings['name']}-sites"
    if Path(source).exists():
        source = str(Path(source).resolve())
    manifests = [str(p.resolve()) for p in
                 write_partition(load_dataset(source), source, sites_dir, sites, scheme, alpha, seed)]

    def data_for(context) -> str:
        return manifests[int(context.node_config["partition-id"])]

    run_simulation(server_app=build_server_app(settings), client_app=build_client_app(data_for),
                   num_supernodes=sites,
                   backend_config={"client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0}})
    if not RunDir(run_dir).has(INFO):
        raise ConfigError(f"the simulation ended without writing {run_dir}; see Flower's log above")
    return run_dir
