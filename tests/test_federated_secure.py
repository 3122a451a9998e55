"""Secure aggregation (Flower's SecAgg+): Flower's own server workflow and client mod around Lepton's apps. The
in-process tests hand each message straight to the site's ClientApp (the network is the only part left out) so they
can compare what the server learns with what each site trained; the loopback test runs the real SuperLink."""

from __future__ import annotations

import copy
import csv
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import lepton_cmd

pytest.importorskip("flwr", reason="federated learning needs Flower: pip install 'lepton[federated]'")

from lepton.errors import ConfigError, DataError
from lepton.federated import apps, secure, site


def _identity(node: int) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, node, 1


class LoopbackGrid:
    """Flower's Grid for sites in this process: a copy of each message goes to its site's ClientApp (with that
    site's own context, kept across messages as a SuperNode keeps it), an exception comes back as an error reply;
    every reply the server receives is kept."""

    def __init__(self, manifests: list[Path]):
        from flwr.app import Context, RecordDict

        self.sites = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"data": str(m)}, state=RecordDict(),
                                       run_config={}) for i, m in enumerate(manifests)}
        self.run = SimpleNamespace(run_id=1)
        self.received: list[tuple[str, object]] = []
        self.sent: list[object] = []
        _identity(0)  # the server's process (Flower sets this before it calls a ServerApp)

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        from flwr.app import Error, Message

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            msg = copy.deepcopy(msg)  # each site gets its own copy, as over the wire (Flower reuses one content)
            self.sent.append(msg)
            _identity(node)
            try:
                reply = apps.client_app(msg, self.sites[node])
            except Exception as exc:  # what a SuperNode sends back when its ClientApp raises
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            finally:
                _identity(0)
            self.received.append((msg.metadata.message_type, reply))
            replies.append(reply)
        return replies


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory) -> list[Path]:
    from lepton.data import load_dataset
    from lepton.data.index.partition import write_partition
    from lepton.data.tools.synthetic import write_synthetic_npz

    root = tmp_path_factory.mktemp("secagg")
    source = write_synthetic_npz(root / "source.npz", n=240, size=28, seed=5)
    return write_partition(load_dataset(source), str(source), root / "sites", 3, "label-skew", alpha=1.0, seed=2)


def _settings(tmp_path: Path, **extra) -> dict:
    return {"strategy": "fedavg", "rounds": 1, "min-sites": 3, "batch-size": 32, "augment": "none", "secagg": True,
            "output-dir": str(tmp_path), "name": "secure", "timeout": 60.0, **extra}


def test_the_server_learns_the_weighted_mean_and_no_site_weights(three_sites, tmp_path, monkeypatch):
    trained: list[tuple[dict[str, torch.Tensor], int]] = []
    real_train = site.train

    def spy(*args, **kwargs):
        weights, metrics = real_train(*args, **kwargs)
        trained.append(({k: v.clone() for k, v in weights.items()}, int(metrics["num-examples"])))
        return weights, metrics

    monkeypatch.setattr(site, "train", spy)
    grid = LoopbackGrid(three_sites)
    run_dir = apps.federate(grid, _settings(tmp_path))

    assert len(trained) == 3 and len({n for _, n in trained}) > 1  # label skew: sites of different sizes
    total = sum(n for _, n in trained)
    got = torch.load(run_dir / "best.pt", weights_only=False)["model"]
    floats = [k for k, v in got.items() if v.is_floating_point()]
    for key in floats:
        mean = sum(w[key].double() * n for w, n in trained) / total
        assert torch.allclose(got[key].double(), mean, atol=2e-5), (key, float((got[key] - mean).abs().max()))
    # Every train reply the server received (the four SecAgg+ stages) holds no weights: only keys, shares and the
    # masked sum's share, which differs from the site's weights.
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    train_replies = [r for kind, r in grid.received if kind == "train"]
    assert len(train_replies) == 4 * 3
    for reply in train_replies:
        assert not reply.has_error(), reply.error.reason
        assert all(len(record) == 0 for record in reply.content.array_records.values())
    masked = [r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] for r in train_replies
              if Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == 3
    # What that costs on the wire: the masked weights are 64-bit integers, twice the float32 weights (the
    # benchmark's bytes-per-round figure relies on this).
    float_bytes = sum(got[k].numel() * 4 for k in floats)
    assert all(1.95 < sum(len(b) for b in m) / float_bytes < 2.05 for m in masked)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["federated"]["secure_aggregation"] == {
        "protocol": "SecAgg+ (Flower)", "num_shares": 1.0, "reconstruction_threshold": 0.6, "clipping_range": 64.0,
        "quantization_range": 1 << 28, "modulus_range": 1 << 40, "max_weight": max(n for _, n in trained)}
    rows = list(csv.DictReader((run_dir / "sites.csv").open()))
    assert {(r["round"], r["kind"]) for r in rows} == {("1", "train"), ("1", "evaluate")} and len(rows) == 6
    assert {r["site"] for r in rows} == {"100", "101", "102"}


def test_fedadam_under_secure_aggregation(three_sites, tmp_path):
    grid = LoopbackGrid(three_sites)
    run_dir = apps.federate(grid, _settings(tmp_path, strategy="fedadam", rounds=2))
    info = json.loads((run_dir / "run.json").read_text())
    assert info["federated"]["rounds"] == 2 and info["federated"]["strategy"] == "fedadam"
    model = torch.load(run_dir / "best.pt", weights_only=False)["model"]
    assert all(torch.isfinite(v.float()).all() for v in model.values())
    assert {v.dtype for v in model.values() if v.is_floating_point()} == {torch.float32}
    # What the sites download stays float32 after a secure round (SecAgg+ dequantizes in float64).
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    sent = [parameters_to_ndarrays(compat.recorddict_to_evaluateins(m.content, True).parameters)
            for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert len(sent) == 6 and {a.dtype for arrays in sent for a in arrays} == {np.dtype("float32")}


def test_sites_clip_their_own_updates_for_privacy_under_secure_aggregation(three_sites, tmp_path):
    """Client-side fixed clipping (Flower's mod at each site, noise at the server): the global model moves by at
    most the clipping norm in a FedAvg round, though the sites' own updates are far longer."""
    from lepton.models import create_model

    clip = 0.05
    run_dir = apps.federate(LoopbackGrid(three_sites), _settings(tmp_path, **{"dp-noise": 1e-6, "dp-clip": clip}))
    info = json.loads((run_dir / "run.json").read_text())
    assert info["federated"]["differential_privacy"] == {
        "mechanism": "central DP, client-side fixed clipping (each site clips its update before masking), Gaussian "
                     "noise (Flower)", "noise_multiplier": 1e-6, "clipping_norm": clip, "sampled_sites": 3}
    best = torch.load(run_dir / "best.pt", weights_only=False)
    torch.manual_seed(0)
    start = create_model(**best["spec"]).state_dict()
    moved = sum(float(((best["model"][k].double() - v.double()) ** 2).sum()) for k, v in start.items()
                if v.is_floating_point()) ** 0.5
    assert 0 < moved <= 1.2 * clip  # the quantization's rounding adds a little


def test_a_weight_outside_the_range_is_refused_by_name(three_sites, tmp_path):
    grid = LoopbackGrid(three_sites)
    with pytest.raises(DataError, match=r"did not complete round\(s\) 1: .*outside secure aggregation's range.*"
                                        r"--secagg-clip"):
        apps.federate(grid, _settings(tmp_path, **{"secagg-clip": 0.01}))


def test_secagg_settings_are_checked():
    assert secure.SecAggSettings.from_config({"secagg-shares": 5, "secagg-threshold": 3}).num_shares == 5
    for bad in ({"secagg-shares": 2}, {"secagg-shares": 1.5}, {"secagg-threshold": 0}, {"secagg-clip": -1}):
        with pytest.raises(ConfigError, match="--secagg"):
            secure.SecAggSettings.from_config(bad)


def test_three_supernodes_aggregate_securely_over_loopback(three_sites, tmp_path):
    from test_federated import _bin_env, federation

    with federation(three_sites, tmp_path) as (link, _):
        done = subprocess.run(lepton_cmd("federate", "run", "--superlink", link, "--insecure", "--secagg",
                                         "--min-sites", "3", "--rounds", "1", "--batch-size", "32", "--timeout", "120",
                                         "--output-dir", str(tmp_path / "runs"), "--name", "sa"),
                              capture_output=True, text=True, timeout=400, env=_bin_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    info = json.loads((tmp_path / "runs" / "sa" / "run.json").read_text())
    assert info["federated"]["rounds"] == 1
    assert info["federated"]["secure_aggregation"]["protocol"] == "SecAgg+ (Flower)"
    assert 0.0 <= info["val_auc"] <= 1.0
