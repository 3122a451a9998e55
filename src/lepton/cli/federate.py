"""``lepton federate``: federated training on Flower."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lepton.cli.common import (
    TrackOpt,
    _finite,
    _track,
    app,
    console,
)
from lepton.cli.train import config_option
from lepton.config import FIELDS

federate_app = typer.Typer(help="Federated training on Flower: sites keep their images.", no_args_is_help=True)
app.add_typer(federate_app, name="federate")


@federate_app.command("site")
def federate_site(
    superlink: Annotated[str, typer.Option(help="The SuperLink's Fleet address, HOST:PORT.")],
    data: Annotated[str, typer.Option(help="This site's data: any source `lepton train` reads (e.g. site-0.json).")],
    port: Annotated[int, typer.Option(
        help="This SuperNode's own port (one per site on a machine).", min=1, max=65535)] = 9094,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS (loopback or a trusted network only).")] = False,
    root_certificates: Annotated[Path | None, typer.Option(help="CA certificate of the SuperLink's TLS.")] = None,
) -> None:
    """Join a federation as a site: a Flower SuperNode whose ClientApp trains Lepton's loop on DATA."""
    import os

    from lepton.federated.deploy import supernode_command

    cmd = supernode_command(superlink, data, port, insecure, root_certificates)
    os.execv(cmd[0], cmd)


@federate_app.command("simulate")
def federate_simulate(
    source: Annotated[str, typer.Argument(help="A labelled source, shared between the virtual sites.")],
    sites: Annotated[int, typer.Option(help="Virtual sites.", min=2, max=1000)] = 4,
    scheme: Annotated[str, typer.Option(help="How the source is shared: iid, label-skew or by-patient.")] = "iid",
    alpha: Annotated[float, typer.Option(
        help="label-skew: Dirichlet concentration.", click_type=_finite(0, 1e6, open_low=True))] = 0.5,
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox or fedadam (Flower's).")] = "fedavg",
    rounds: Annotated[int, typer.Option(help="Federated rounds.", min=1, max=10_000)] = 3,
    local_epochs: Annotated[int, config_option("epochs", "Epochs each site trains per round.")] = 1,
    fraction: Annotated[float, typer.Option(
        help="Share of the sites that train each round.", click_type=_finite(0, 1, open_low=True))] = 1.0,
    model: Annotated[str, config_option("model")] = FIELDS["model"].default,
    lr: Annotated[float, config_option("lr", "Sites' learning rate (AdamW).")] = FIELDS["lr"].default,
    batch_size: Annotated[int, config_option("batch_size", "Sites' batch size.")] = FIELDS["batch_size"].default,
    proximal_mu: Annotated[float, typer.Option(
        help="FedProx: weight of the proximal term.", click_type=_finite(0, 1e6))] = 0.01,
    seed: Annotated[int, config_option("seed", "Random seed (partition and training).")] = FIELDS["seed"].default,
    output_dir: Annotated[str, typer.Option(help="Parent of the run directory.")] = "runs",
    name: Annotated[str, typer.Option(help="Run name; the site manifests go to OUTPUT/NAME-sites.")] = "federated",
    secagg: Annotated[bool, typer.Option("--secagg", help="Secure aggregation (Flower's SecAgg+), 3 sites or "
                                                          "more.")] = False,
    track: TrackOpt = None,
) -> None:
    """Simulate a federation on this machine with Flower's simulation engine (Ray): SOURCE shared between
    virtual sites, each a ClientApp; the same run directory as `lepton federate run`."""
    from lepton.federated.apps import STRATEGIES
    from lepton.federated.simulation import simulate

    if strategy not in STRATEGIES:
        raise typer.BadParameter(f"--strategy must be one of {', '.join(STRATEGIES)}")
    run_dir = simulate(source, sites, {
        "strategy": strategy, "rounds": rounds, "local-epochs": local_epochs, "fraction": fraction,
        "min-sites": max(1, int(sites * fraction)), "model": model, "lr": lr, "batch-size": batch_size,
        "proximal-mu": proximal_mu if strategy == "fedprox" else 0.0, "seed": seed, "output-dir": output_dir,
        "name": name, "secagg": secagg, "track": " ".join(_track(track) or [])}, scheme=scheme, alpha=alpha,
        seed=seed)
    console.print(f"run directory: {run_dir}")


@federate_app.command("run")
def federate_run(
    superlink: Annotated[str, typer.Option(help="The SuperLink's Control address, HOST:PORT.")],
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox or fedadam (Flower's).")] = "fedavg",
    rounds: Annotated[int, typer.Option(help="Federated rounds.", min=1, max=10_000)] = 3,
    local_epochs: Annotated[int, config_option("epochs", "Epochs each site trains per round.")] = 1,
    fraction: Annotated[float, typer.Option(
        help="Share of the sites that train each round.", click_type=_finite(0, 1, open_low=True))] = 1.0,
    min_sites: Annotated[int, typer.Option(help="Sites needed to start and in every round.", min=1, max=10_000)] = 2,
    model: Annotated[str, config_option("model")] = FIELDS["model"].default,
    lr: Annotated[float, config_option("lr", "Sites' learning rate (AdamW).")] = FIELDS["lr"].default,
    batch_size: Annotated[int, config_option("batch_size", "Sites' batch size.")] = FIELDS["batch_size"].default,
    proximal_mu: Annotated[float, typer.Option(
        help="FedProx: weight of the proximal term.", click_type=_finite(0, 1e6))] = 0.01,
    image_size: Annotated[int, typer.Option(
        help="Input size for every site (0: the sites' native size).", min=0, max=1024)] = 0,
    seed: Annotated[int, config_option("seed")] = FIELDS["seed"].default,
    dp_noise: Annotated[float, typer.Option(help="Differential privacy: Gaussian noise multiplier (0 = off; Flower's "
                                                  "server-side fixed clipping).", click_type=_finite(0, 1e6))] = 0.0,
    dp_clip: Annotated[float, typer.Option(
        help="Differential privacy: clipping norm of each site's update.", click_type=_finite(0, 1e9))] = 0.0,
    secagg: Annotated[bool, typer.Option("--secagg", help="Secure aggregation (Flower's SecAgg+): the server sees only "
                                                          "the sum of the sites' weights (3 sites or more).")] = False,
    secagg_shares: Annotated[float, typer.Option(help="SecAgg+: secret shares per site, a fraction of the sampled "
                                                      "sites or a count above 2.",
                                                      click_type=_finite(0, 10_000, open_low=True))] = 1.0,
    secagg_threshold: Annotated[float, typer.Option(help="SecAgg+: shares needed to reconstruct a secret, a fraction "
                                                         "of the shares or a count; sites that may drop out: shares "
                                                         "minus this.",
                                                         click_type=_finite(0, 10_000, open_low=True))] = 0.6,
    secagg_clip: Annotated[float, typer.Option(help="SecAgg+: every weight must lie in ±this (a site refuses to send "
                                                    "one outside it).",
                                                    click_type=_finite(0, 1e9, open_low=True))] = 64.0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for sites each round; a site that does not answer "
                                                "in time is left out of that round.",
                                                click_type=_finite(0, 7 * 86_400, open_low=True))] = 600.0,
    output_dir: Annotated[str, typer.Option(help="Parent of the run directory (on the SuperLink's machine).")] = "runs",
    name: Annotated[str, typer.Option(help="Run name (default: federated-STRATEGY-time).")] = "",
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS (loopback or a trusted network only).")] = False,
    root_certificates: Annotated[Path | None, typer.Option(help="CA certificate of the SuperLink's TLS.")] = None,
    track: TrackOpt = None,
) -> None:
    """Run a federation: Lepton's Flower app submitted to a SuperLink; the global model becomes a run directory.
    With --track the server logs every round, pooled and per site."""
    from lepton.federated.apps import STRATEGIES
    from lepton.federated.deploy import run

    if strategy not in STRATEGIES:
        raise typer.BadParameter(f"--strategy must be one of {', '.join(STRATEGIES)}")
    for label, value in (("--rounds", rounds), ("--local-epochs", local_epochs), ("--min-sites", min_sites)):
        if value < 1:
            raise typer.BadParameter(f"{label} must be at least 1 (got {value})")
    if not 0 < fraction <= 1:
        raise typer.BadParameter(f"--fraction must be in (0, 1] (got {fraction})")
    settings = {"strategy": strategy, "rounds": rounds, "local-epochs": local_epochs, "fraction": fraction,
                "min-sites": min_sites, "model": model, "lr": lr, "batch-size": batch_size,
                "proximal-mu": proximal_mu if strategy == "fedprox" else 0.0, "image-size": image_size, "seed": seed,
                "output-dir": output_dir, "name": name, "dp-noise": dp_noise, "dp-clip": dp_clip, "timeout": timeout,
                "secagg": secagg, "secagg-shares": secagg_shares, "secagg-threshold": secagg_threshold,
                "secagg-clip": secagg_clip, "track": " ".join(_track(track) or [])}
    if dp_noise < 0 or dp_clip < 0 or (dp_noise > 0 and dp_clip <= 0):
        raise typer.BadParameter("--dp-noise needs --dp-clip > 0 (and neither may be negative)")
    if secagg:
        from lepton.federated.secure import SecAggSettings

        SecAggSettings.from_config(settings)  # a bad value named here, before anything is submitted
    raise typer.Exit(run(superlink, settings, insecure, root_certificates))

