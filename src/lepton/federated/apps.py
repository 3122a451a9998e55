"""Lepton as a Flower app on the Message API: ``client_app`` (a ``ClientApp``: describe, train, evaluate on the
site's data) and ``server_app`` (a ``ServerApp``: agree on one preprocessing, run FedAvg, FedProx or FedAdam from
``flwr.serverapp.strategy``, write a normal run directory). The SuperNode names the site's data with
``--node-config 'data="site-0.json"'``; the run config (``flwr run --run-config``) names the recipe.

What a site sends back: weights (an ``ArrayRecord``) and numbers (``MetricRecord``/``ConfigRecord``: counts, loss,
val figures, label names, input size, channel sums) — no image, file path or patient id (tested).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from lepton.data.transforms.preprocessing import Preprocessing
from lepton.errors import DataError
from lepton.federated import check_settings, rundir, secure, site

log = logging.getLogger("lepton.federated")

STRATEGIES = ("fedavg", "fedprox", "fedadam")


def node_data(context: Context) -> str:
    """The site's data, as its SuperNode names it (``--node-config 'data="PATH"'``)."""
    data = context.node_config.get("data")
    if not data:
        raise DataError("this SuperNode has no data: start it with --node-config 'data=\"PATH\"' "
                        "(a source `lepton train` reads, e.g. a site manifest)")
    return str(data)


def _settings(config: ConfigRecord) -> site.SiteSettings:
    return site.SiteSettings.from_config(dict(config))


def _legacy_settings(content: RecordDict, kind: str) -> site.SiteSettings:
    return site.SiteSettings.from_config(dict(content.config_records[f"{kind}ins.config"]))


def build_client_app(data_for: Callable[[Context], str] = node_data) -> ClientApp:
    """Lepton's ClientApp; ``data_for`` names a site's data from its context (simulation: by partition id)."""
    app = ClientApp()

    @app.query()
    def describe(msg: Message, context: Context) -> Message:
        summary = site.describe(data_for(context), _settings(msg.content["config"]))
        return Message(RecordDict({"summary": ConfigRecord({"summary": json.dumps(summary)})}), reply_to=msg)

    @app.train(mods=[secure.client_mod])
    def train(msg: Message, context: Context) -> Message:
        if secure.is_legacy(msg.content, "fit"):  # a SecAgg+ round (Flower's legacy records)
            return secure.legacy_train(msg, data_for(context), _legacy_settings(msg.content, "fit"), site.train,
                                       int(context.node_id))
        config = msg.content["config"]
        spec = Preprocessing.from_dict(json.loads(config["spec"]))
        weights, metrics = site.train(data_for(context), _settings(config), spec,
                                      msg.content["arrays"].to_torch_state_dict(), int(config.get("server-round", 0)))
        metrics[rundir.SITE_KEY] = int(context.node_id)
        return Message(RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        if secure.is_legacy(msg.content, "evaluate"):
            return secure.legacy_evaluate(msg, data_for(context), _legacy_settings(msg.content, "evaluate"),
                                          site.evaluate, int(context.node_id))
        config = msg.content["config"]
        spec = Preprocessing.from_dict(json.loads(config["spec"]))
        metrics = site.evaluate(data_for(context), _settings(config), spec,
                                msg.content["arrays"].to_torch_state_dict())
        # val_auc is NaN where a site's val holds one class (label skew): sent all the same (every site's record
        # has the same keys, as Flower's aggregation requires); the pooled figure leaves it out.
        metrics[rundir.SITE_KEY] = int(context.node_id)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    app.handlers = {"query": describe, "train": train, "evaluate": evaluate}  # for callers outside Flower
    return app


def build_server_app(settings: dict[str, Any] | None = None) -> ServerApp:
    """Lepton's ServerApp: the run config (``flwr run --run-config``), over ``settings`` when given."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federate(grid, {**dict(context.run_config), **(settings or {})}, context)

    return app


client_app = build_client_app()
server_app = build_server_app()


def make_strategy(name: str, fraction: float, min_sites: int, proximal_mu: float, recorder: rundir.Recorder,
                  dp: dict[str, Any] | None = None):
    """FedAvg, FedProx or FedAdam from Flower, recording each site's figures every round; with ``dp``
    (``noise_multiplier``, ``clipping_norm``, ``sampled_sites``) wrapped in Flower's central differential privacy
    with server-side fixed clipping (each site's update clipped to the norm, Gaussian noise on the aggregate)."""
    strategy = _strategy(name, fraction, min_sites, proximal_mu, recorder)
    if not dp:
        return strategy
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    return DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier=dp["noise_multiplier"],
                                                      clipping_norm=dp["clipping_norm"],
                                                      num_sampled_clients=dp["sampled_sites"])


def _strategy(name: str, fraction: float, min_sites: int, proximal_mu: float, recorder: rundir.Recorder):
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    common = {"fraction_train": fraction, "fraction_evaluate": 1.0, "min_train_nodes": min_sites,
              "min_evaluate_nodes": min_sites, "min_available_nodes": min_sites,
              "train_metrics_aggr_fn": recorder.train_metrics, "evaluate_metrics_aggr_fn": recorder.evaluate_metrics}
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=proximal_mu)
    if name == "fedadam":
        return FedAdam(**common)
    raise DataError(f"strategy {name!r} is not one of {', '.join(STRATEGIES)}")


def federate(grid: Grid, run_config: dict[str, Any], context: Context | None = None) -> Path:
    """The federation: wait for ``min-sites`` sites, agree on preprocessing, run the rounds, write the run. With
    ``secagg`` the rounds run Flower's SecAgg+ (see ``lepton.federated.secure``)."""
    import torch

    from lepton.models import create_model

    run_config = check_settings(run_config)
    settings = site.SiteSettings.from_config(run_config)
    strategy_name = str(run_config.get("strategy", "fedavg"))
    rounds, min_sites = int(run_config.get("rounds", 3)), int(run_config.get("min-sites", 2))
    fraction = float(run_config.get("fraction", 1.0))
    timeout = float(run_config.get("timeout", 600))
    nodes = _wait_for_sites(grid, min_sites, timeout)
    base = ConfigRecord({k: v for k, v in run_config.items() if k in site.DEFAULTS})
    replies = grid.send_and_receive([Message(RecordDict({"config": base}), dst_node_id=n, message_type="query")
                                     for n in nodes], timeout=timeout)
    summaries = {}
    for reply in replies:
        if reply.has_error():
            raise DataError(f"site {reply.metadata.src_node_id} could not describe its data: {reply.error.reason}")
        summaries[str(reply.metadata.src_node_id)] = json.loads(reply.content["summary"]["summary"])
    agreed = site.agree(summaries)
    spec = Preprocessing.from_dict(agreed["spec"])
    torch.manual_seed(settings.seed)
    model_spec = site.model_spec_for(settings, spec, agreed["label_names"])
    model = create_model(**model_spec)
    use_secagg = str(run_config.get("secagg", "false")).lower() in ("1", "true", "yes")
    secagg = secure.SecAggSettings.from_config(run_config) if use_secagg else None
    dp = None
    if float(run_config.get("dp-noise", 0.0)) > 0:
        clip = float(run_config.get("dp-clip", 0.0))
        if not clip > 0:
            raise DataError("differential privacy needs a clipping norm > 0 (--dp-clip) with --dp-noise")
        where = ("client-side fixed clipping (each site clips its update before masking)" if secagg else
                 "server-side fixed clipping")
        dp = {"mechanism": f"central DP, {where}, Gaussian noise (Flower)",
              "noise_multiplier": float(run_config["dp-noise"]), "clipping_norm": clip,
              "sampled_sites": max(min_sites, int(len(nodes) * fraction))}
    max_weight = max(int(s["train"]) for s in summaries.values())
    recorder = rundir.Recorder(strategy_name, settings, run_config, agreed, model_spec, summaries, dp,
                               secagg.record(max_weight) if secagg else None)
    config = ConfigRecord({**dict(base), "spec": json.dumps(agreed["spec"])})
    t0 = time.perf_counter()
    with recorder.track(str(run_config.get("track", "")).split()):  # per round, pooled and per site
        if secagg:
            result = secure.run(grid, context, strategy=strategy_name, rounds=rounds, fraction=fraction,
                                min_sites=min_sites, timeout=timeout, proximal_mu=settings.proximal_mu, model=model,
                                config=dict(config), recorder=recorder, secagg=secagg, max_weight=max_weight, dp=dp)
        else:
            strategy = make_strategy(strategy_name, fraction, min_sites, settings.proximal_mu, recorder, dp)
            result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                                    timeout=timeout, train_config=config, evaluate_config=config,
                                    evaluate_fn=recorder.keep_weights)
        return recorder.write(result, time.perf_counter() - t0)


def _wait_for_sites(grid: Grid, min_sites: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= min_sites:
            return nodes
        if time.monotonic() > deadline:
            raise DataError(f"only {len(nodes)} of the {min_sites} sites needed connected within {timeout:.0f} s")
        time.sleep(0.5)
