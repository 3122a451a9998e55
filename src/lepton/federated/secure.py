"""Secure aggregation: Flower's SecAgg+ protocol, so the server only ever sees the sum of the sites' weights.

In Flower 1.42 SecAgg+ exists only as a workflow over the legacy strategies (``SecAggPlusWorkflow`` inside a
``DefaultWorkflow`` with a ``LegacyContext``; ``secaggplus_mod`` on the ClientApp), not for the Message API
strategies of ``flwr.serverapp.strategy``. So a federation with ``secagg`` runs that path: Flower's legacy FedAvg,
FedProx or FedAdam (the same hyper-parameters as the Message API ones), the same Lepton ClientApp answering the legacy
``fitins``/``evaluateins`` records, and, with differential privacy, Flower's client-side fixed clipping
(``fixedclipping_mod``: each site clips its own update before masking; the server adds the noise) because a server
that sees only the sum cannot clip each site's update.

What the protocol needs from Lepton: every sent value must lie in ``[-clip, clip]`` (SecAgg+ quantizes into that
range; a site refuses to send a weight outside it, by name, rather than have it silently clipped), and the weighting
by images stays exact because ``max_weight`` is the largest site's image count. Only floating-point tensors are
aggregated; integer buffers (BatchNorm's batch counter) stay each site's own.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict

from lepton.errors import ConfigError, DataError
from lepton.federated.rundir import SITE_KEY

log = logging.getLogger("lepton.federated")


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ parameters (Flower's names): shares per site and reconstruction threshold (a fraction of the sampled
    sites, or a count), and the range every aggregated value must lie in."""

    num_shares: float = 1.0
    reconstruction_threshold: float = 0.6
    # Flower's defaults (±8, 2^22 levels, modulus 2^32) clip BatchNorm's running variances (9 seen on
    # PneumoniaMNIST); ±64 over 2^28 levels is finer still (4.8e-7 a step, Flower's rounding is stochastic and
    # int32), and a modulus of 2^40 leaves room for 4,096 sites' sums without overflow.
    clipping_range: float = 64.0
    quantization_range: int = 1 << 28
    modulus_range: int = 1 << 40

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> SecAggSettings:
        shares, threshold = float(values.get("secagg-shares", 1.0)), float(values.get("secagg-threshold", 0.6))
        clip = float(values.get("secagg-clip", 64.0))
        if not (0 < shares <= 1 or (shares > 2 and shares.is_integer())):
            raise ConfigError(f"--secagg-shares must be a fraction of the sites in (0, 1] or a count above 2 "
                            f"(got {shares:g})")
        if not (0 < threshold <= 1 or (threshold >= 2 and threshold.is_integer())):
            raise ConfigError(f"--secagg-threshold must be a fraction in (0, 1] or a count of at least 2 "
                            f"(got {threshold:g})")
        if not clip > 0:
            raise ConfigError(f"--secagg-clip must be > 0 (got {clip:g})")
        return cls(shares if shares <= 1 else int(shares), threshold if threshold <= 1 else int(threshold), clip)

    def record(self, max_weight: int) -> dict[str, Any]:
        return {"protocol": "SecAgg+ (Flower)", "num_shares": self.num_shares,
                "reconstruction_threshold": self.reconstruction_threshold, "clipping_range": self.clipping_range,
                "quantization_range": self.quantization_range, "modulus_range": self.modulus_range,
                "max_weight": max_weight}


# -- the site's side -------------------------------------------------------------------------------------------
def client_mod(msg: Message, context: Context, call_next) -> Message:
    """``secaggplus_mod`` for SecAgg+ messages (and ``fixedclipping_mod`` inside it when the server asked for
    client-side clipping); every other message goes straight to the handler."""
    from flwr.app.message_type import MessageType
    from flwr.client.mod import fixedclipping_mod, secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    inner = call_next
    fit_config = msg.content.config_records.get("fitins.config")
    if fit_config is not None and KEY_CLIPPING_NORM in fit_config:
        def inner(m: Message, c: Context) -> Message:
            return fixedclipping_mod(m, c, call_next)
    return secaggplus_mod(msg, context, inner)


def is_legacy(content: RecordDict, kind: str) -> bool:
    """Whether a message holds the legacy ``fitins``/``evaluateins`` records (the SecAgg+ path)."""
    return f"{kind}ins.parameters" in content.array_records


def _state(parameters, keys: list[str]) -> dict[str, torch.Tensor]:
    from flwr.common import parameters_to_ndarrays

    arrays = parameters_to_ndarrays(parameters)
    if len(arrays) != len(keys):
        raise DataError(f"the server sent {len(arrays)} tensors for {len(keys)} names: the server and this site run "
                        "different Lepton versions")
    return {k: torch.from_numpy(np.array(a, copy=True)) for k, a in zip(keys, arrays, strict=True)}


def legacy_train(msg: Message, data: str, settings, train_fn, site_id: int) -> Message:
    """A SecAgg+ round's training: the global weights in, this site's weights (floating-point tensors, in the
    server's order) and figures out, as Flower's legacy ``FitRes``."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from lepton.data.transforms.preprocessing import Preprocessing

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    keys = json.loads(str(config["keys"]))
    spec = Preprocessing.from_dict(json.loads(str(config["spec"])))
    weights, metrics = train_fn(data, settings, spec, _state(fitins.parameters, keys),
                                int(config.get("server-round", 0)), strict=False)
    clip = float(config.get("secagg-clip", 64.0))
    for key in keys:
        peak = float(weights[key].abs().max()) if weights[key].numel() else 0.0
        if not peak <= clip:
            raise DataError(f"{key} holds {peak:.4g}, outside secure aggregation's range ±{clip:g}: run the "
                            f"federation again with a larger --secagg-clip (at least {peak * 1.5:.3g})")
    arrays = [weights[k].numpy() for k in keys]
    metrics[SITE_KEY] = site_id
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(arrays), int(metrics["num-examples"]), metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def legacy_evaluate(msg: Message, data: str, settings, evaluate_fn, site_id: int) -> Message:
    """A SecAgg+ federation's evaluation on this site's val split, as Flower's legacy ``EvaluateRes``."""
    from flwr.common import Code, EvaluateRes, Status
    from flwr.compat.common import recorddict_compat as compat

    from lepton.data.transforms.preprocessing import Preprocessing

    ins = compat.recorddict_to_evaluateins(msg.content, keep_input=True)
    config = dict(ins.config)
    spec = Preprocessing.from_dict(json.loads(str(config["spec"])))
    weights = _state(ins.parameters, json.loads(str(config["keys"])))
    metrics = {**evaluate_fn(data, settings, spec, weights, strict=False), SITE_KEY: site_id}
    res = EvaluateRes(Status(Code.OK, "ok"), float(metrics.get("val_loss", 0.0)), int(metrics["num-examples"]),
                      metrics)
    return Message(compat.evaluateres_to_recorddict(res), reply_to=msg)


# -- the server's side -----------------------------------------------------------------------------------------
class _Grid:
    """The Grid with a deadline on every exchange (Flower's default evaluate workflow sets none, so one silent site
    would stall the federation) and each site's error kept, to name it when a round fails."""

    def __init__(self, grid, timeout: float):
        self._grid, self._timeout, self.errors = grid, timeout, []

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout or self._timeout))
        for reply in replies:
            if reply.has_error():
                self.errors.append(f"site {reply.metadata.src_node_id}: {reply.error.reason}")
        return replies


class _Float32:
    """A legacy strategy whose global weights stay float32: SecAgg+ dequantizes (and DP noise adds) in float64,
    which would double every later download and the run's checkpoint."""

    def __init__(self, strategy):
        self._strategy = strategy

    def __getattr__(self, name: str):
        return getattr(self._strategy, name)

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

        parameters, metrics = self._strategy.aggregate_fit(server_round, results, failures)
        if parameters is not None:
            parameters = ndarrays_to_parameters([a.astype(np.float32) for a in parameters_to_ndarrays(parameters)])
        return parameters, metrics


def _legacy_strategy(name: str, fraction: float, min_sites: int, proximal_mu: float, initial, recorder,
                     fit_config: dict[str, Any], keep):
    from flwr.server import strategy as legacy

    common = {"fraction_fit": fraction, "fraction_evaluate": 1.0, "min_fit_clients": min_sites,
              "min_evaluate_clients": min_sites, "min_available_clients": min_sites, "initial_parameters": initial,
              "on_fit_config_fn": lambda rnd: {**fit_config, "server-round": rnd},
              "on_evaluate_config_fn": lambda rnd: {**fit_config, "server-round": rnd},
              "fit_metrics_aggregation_fn": lambda results: recorder.pool("train", [m for _, m in results]),
              "evaluate_metrics_aggregation_fn": lambda results: recorder.pool("evaluate", [m for _, m in results]),
              "evaluate_fn": keep}
    if name == "fedavg":
        return legacy.FedAvg(**common)
    if name == "fedprox":
        return legacy.FedProx(**common, proximal_mu=proximal_mu)
    if name == "fedadam":  # the Message API FedAdam's defaults (its tau differs from the legacy one's)
        return legacy.FedAdam(**common, eta=1e-1, eta_l=1e-1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    raise DataError(f"strategy {name!r} is not one of fedavg, fedprox, fedadam")


def _by_round(metrics: dict[str, list[tuple[int, Any]]]) -> dict[int, dict[str, Any]]:
    rounds: dict[int, dict[str, Any]] = {}
    for key, pairs in metrics.items():
        for rnd, value in pairs:
            rounds.setdefault(int(rnd), {})[key] = value
    return rounds


def run(grid, context: Context | None, *, strategy: str, rounds: int, fraction: float, min_sites: int,
        timeout: float, proximal_mu: float, model: torch.nn.Module, config: dict[str, Any], recorder,
        secagg: SecAggSettings, max_weight: int, dp: dict[str, Any] | None):
    """The rounds with SecAgg+ (and client-side DP when ``dp``); returns what ``Recorder.write`` reads: the pooled
    train and evaluate figures by round."""
    from flwr.app import RecordDict as Records
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig
    from flwr.server.compat import LegacyContext
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    state = model.state_dict()
    keys = [k for k, v in state.items() if v.is_floating_point()]
    fixed = {k: v.clone() for k, v in state.items() if not v.is_floating_point()}

    def keep(server_round: int, arrays, _config):
        weights = {**fixed, **{k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in zip(keys, arrays,
                                                                                                 strict=True)}}
        recorder.keep_state(server_round, {k: weights[k] for k in state})
        return None

    fit_config = {**config, "keys": json.dumps(keys), "secagg-clip": secagg.clipping_range}
    initial = ndarrays_to_parameters([state[k].detach().cpu().numpy() for k in keys])
    legacy = _legacy_strategy(strategy, fraction, min_sites, proximal_mu, initial, recorder, fit_config, keep)
    if dp:
        from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping

        legacy = DifferentialPrivacyClientSideFixedClipping(legacy, noise_multiplier=dp["noise_multiplier"],
                                                            clipping_norm=dp["clipping_norm"],
                                                            num_sampled_clients=dp["sampled_sites"])
    legacy = _Float32(legacy)
    base = context or Context(run_id=0, node_id=0, node_config={}, state=Records(), run_config={})
    legacy_context = LegacyContext(base, config=ServerConfig(num_rounds=rounds, round_timeout=timeout),
                                   strategy=legacy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=secagg.num_shares, reconstruction_threshold=secagg.reconstruction_threshold,
        max_weight=float(max_weight), clipping_range=secagg.clipping_range,
        quantization_range=secagg.quantization_range, modulus_range=secagg.modulus_range, timeout=timeout))
    watched = _Grid(grid, timeout)
    workflow(watched, legacy_context)
    history = legacy_context.history
    train, evaluate = _by_round(history.metrics_distributed_fit), _by_round(history.metrics_distributed)
    missing = [r for r in range(1, rounds + 1) if r not in train]
    if missing:
        reasons = "; ".join(dict.fromkeys(watched.errors)) or "too few sites answered in time"
        raise DataError(f"secure aggregation did not complete round(s) {', '.join(map(str, missing))}: {reasons}")
    return SimpleNamespace(train_metrics_clientapp=train, evaluate_metrics_clientapp=evaluate)
