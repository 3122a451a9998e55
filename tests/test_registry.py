import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import lepton_cmd
from lepton.errors import ConfigError, RegistryError
from lepton.registry import Registry

PG_URL = os.environ.get("LEPTON_TEST_PG_URL")


def _pg_database() -> tuple[str, callable]:
    """A fresh PostgreSQL database for one test, and a function that drops it."""
    import psycopg

    name = f"lepton_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base, _, _ = PG_URL.rpartition("/")

    def drop() -> None:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    return f"{base}/{name}", drop


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path, monkeypatch):
    """A registry location: a folder (SQLite) or a PostgreSQL URL with artifacts under LEPTON_HOME."""
    monkeypatch.setenv("LEPTON_HOME", str(tmp_path / "home"))
    if request.param == "sqlite":
        yield str(tmp_path / "reg")
        return
    if not PG_URL:
        pytest.skip("PostgreSQL tests need LEPTON_TEST_PG_URL (.ci/run installs and starts a server)")
    url, drop = _pg_database()
    yield url
    drop()


@pytest.fixture
def reg(location) -> Registry:
    return Registry.open(location)


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run with an evaluation report, safe to modify."""
    from lepton.evaluate import evaluate

    dst = tmp_path / "run"
    shutil.copytree(tiny_run.path, dst)
    evaluate(dst, split="test", n_bootstrap=50, plots=False)
    return dst


def test_register_versions_card_and_lineage(reg, run_copy):
    v1 = reg.register_run(run_copy, "pneumonia", description="demo")
    v2 = reg.register_run(run_copy, "pneumonia")
    assert (v1.version, v2.version, v2.parent_version) == (1, 2, 1)
    assert v1.labels == ["normal", "opacity"] and v1.threshold is not None
    assert set(v1.artifacts) == {"weights", "config", "preprocessing", "labels", "run", "data", "card", "val_set"}
    assert v1.metrics["eval/test"]["images"] == 36 and "val_youden" in v1.metrics["eval/test"]
    assert v1.data_fingerprint["sha256"] and v1.source_run == str(run_copy.resolve())
    card = reg.card("pneumonia@1")
    for heading in ("Intended use", "Training data", "Metrics", "Limitations"):
        assert f"## {heading}" in card
    assert "test split, 36 images" in card and "[" in card  # CIs are in the card
    # what an answer costs, measured when the run was trained (lepton.cost): one network, no TTA
    cost = v1.metrics["cost"]
    assert cost["forward_passes_per_image"] == 1 and cost["precisions"]["fp32"]["ms_per_image_b1"] > 0
    assert "## Inference cost" in card and "Forward passes per image: 1 (1 member(s) × 1 TTA view(s))" in card
    assert f"{cost['precisions']['fp32']['ms_per_image_b1']:.3f} ms/image at batch 1" in card
    reg.set_card("pneumonia@1", card + "\nReviewed by the imaging team.\n")
    assert reg.card("pneumonia@1").endswith("Reviewed by the imaging team.\n")
    assert [v.version for v in reg.list("pneumonia")] == [1, 2]
    assert reg.get("pneumonia").version == 2 and reg.get("pneumonia@latest").version == 2


def test_stages_rollback_and_delete(reg, run_copy):
    for _ in range(3):
        reg.register_run(run_copy, "m")
    reg.promote("m", 1, "production")
    reg.promote("m", 2, "staging")
    reg.promote("m", 2, "production")
    assert reg.get("m@production").version == 2 and reg.get("m@1").stage == "archived"
    with pytest.raises(RegistryError, match="no such version"):
        reg.get("m@staging")
    assert reg.rollback("m").version == 1
    assert reg.get("m@production").version == 1 and reg.get("m@2").stage == "archived"
    with pytest.raises(RegistryError, match="in production"):
        reg.delete("m", 1)
    reg.delete("m", 3)
    reg.delete("m", 1, force=True)
    assert [v.version for v in reg.list("m")] == [2]
    with pytest.raises(RegistryError, match="no production version"):
        reg.rollback("m")
    with pytest.raises(RegistryError, match="stage must be"):
        reg.promote("m", 2, "prod")
    with pytest.raises(RegistryError, match="no model named"):
        reg.get("unknown")
    with pytest.raises(RegistryError, match="invalid model name"):
        reg.get("../etc")


def test_first_production_cannot_roll_back(reg, run_copy):
    reg.register_run(run_copy, "m")
    reg.promote("m", 1, "production")
    with pytest.raises(RegistryError, match="first production version"):
        reg.rollback("m")


def test_diff_shows_config_and_metric_changes(reg, run_copy, tmp_path):
    reg.register_run(run_copy, "m")
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    cfg["lr"] = 0.01
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    info = json.loads((run_copy / "run.json").read_text())
    info["val_auc"] = 0.5
    (run_copy / "run.json").write_text(json.dumps(info))
    reg.register_run(run_copy, "m")
    d = reg.diff("m", 1, 2)
    assert d["config"]["lr"][1] == 0.01 and d["metrics"]["val_auc"][1] == 0.5
    assert d["labels"] is None and d["data_changed"] is False


def test_load_verifies_hashes(reg, run_copy, tiny_run):
    v = reg.register_run(run_copy, "m")
    images = [np.full((1, 32, 32), 0.3, np.float32), np.full((1, 32, 32), 0.7, np.float32)]
    loaded = reg.load_run("m@1")
    np.testing.assert_allclose(loaded.predict_proba(images), tiny_run.predict_proba(images), atol=1e-6)
    assert loaded.threshold == tiny_run.threshold
    blob = reg.store._path(v.artifacts["weights"])
    blob.write_bytes(blob.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(RegistryError, match="corrupted"):
        reg.load_run("m@1")
    blob.unlink()
    with pytest.raises(RegistryError, match="missing"):
        reg.load_run("m@1")


def test_bundle_round_trip_between_registries(reg, run_copy, tmp_path, tiny_run):
    reg.register_run(run_copy, "m")
    bundle = reg.export_bundle("m@1", tmp_path / "m.lepton")
    other = Registry.open(tmp_path / "other")
    v = other.import_bundle(bundle, "imported")
    assert v.ref == "imported@1" and v.artifacts == reg.get("m@1").artifacts
    assert other.card("imported@1") == reg.card("m@1")
    x = [np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)]
    np.testing.assert_allclose(other.load_run("imported@1").predict_proba(x), tiny_run.predict_proba(x), atol=1e-6)


def _tar(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


def test_hostile_bundles_are_rejected(reg, run_copy, tmp_path):
    reg.register_run(run_copy, "m")
    good = reg.export_bundle("m@1", tmp_path / "good.lepton")
    with tarfile.open(good) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    with pytest.raises(RegistryError, match="refused member '../evil'"):
        reg.import_bundle(_tar(tmp_path / "a.lepton", {**members, "../evil": b"x"}))
    with pytest.raises(RegistryError, match="refused member"):
        reg.import_bundle(_tar(tmp_path / "b.lepton", members, symlink="artifacts/link"))
    tampered = dict(members)
    tampered["artifacts/labels"] = b'["cat", "dog"]'
    with pytest.raises(RegistryError, match="does not match its hash"):
        reg.import_bundle(_tar(tmp_path / "c.lepton", tampered))
    (tmp_path / "d.lepton").write_bytes(b"not a tar")
    with pytest.raises(RegistryError, match="not a readable bundle"):
        reg.import_bundle(tmp_path / "d.lepton")
    assert [v.version for v in reg.list("m")] == [1]


def _onnx_classifier(path: Path, channels: int = 1, classes: int = 2) -> Path:
    """A tiny ONNX graph of the kind another framework exports: pool, flatten, dense, softmax."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((channels, classes), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(classes, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "w", "b"], ["logits"]), helper.make_node("Softmax", ["logits"], ["y"])],
        "foreign", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], [w, b])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_foreign_onnx_model(reg, tmp_path):
    path = _onnx_classifier(tmp_path / "keras.onnx")
    v = reg.register_onnx(path, "external", labels=["normal", "pneumonia"], image_size=28, threshold=0.4)
    assert v.format == "onnx" and v.preprocessing["size"] == [28, 28] and "onnx" in v.artifacts
    assert "external" in reg.card("external@1")
    with pytest.raises(RegistryError, match="onnx model"):
        reg.load_run("external@1")
    with pytest.raises(RegistryError, match="does not match 3 labels"):
        reg.register_onnx(path, "external", labels=["a", "b", "c"], image_size=28)
    with pytest.raises(RegistryError, match="not .N, 3, H, W."):
        reg.register_onnx(path, "external", labels=["a", "b"], image_size=28, channels=3)
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(RegistryError, match="not a valid ONNX model"):
        reg.register_onnx(tmp_path / "junk.onnx", "external", labels=["a", "b"], image_size=28)


def test_a_route_is_stored_only_as_its_readers_take_it(reg, run_copy):
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from lepton.registry.db import RouteRow

    reg.register_run(run_copy, "ab")
    reg.register_run(run_copy, "ab")
    for weights in ({1: 1, 2: 2}, {1: 1e6, 2: 1e-6}, {1: 1e6, 2: 1e6}, {1: 3, 2: 0}, {1: 5e-324, 2: 1}, {2: 0.5}):
        acknowledged = reg.set_route("ab", weights, shadow=1)
        assert reg.get_route("ab") == acknowledged and abs(sum(acknowledged.weights.values()) - 100) < 1e-3
    good = reg.set_route("ab", {1: 90, 2: 10})
    for weights in ({1: float("inf")}, {1: float("nan")}, {1: 1e308}, {1: 1e308, 2: 1e308}, {1: -1}, {1: 0, 2: 0},
                    {0: 1}, {True: 1}, {1: "1"}):
        with pytest.raises(RegistryError, match="route"):
            reg.set_route("ab", weights)
        assert reg.get_route("ab") == good, weights
    with pytest.raises(RegistryError, match="shadow"):
        reg.set_route("ab", {1: 1}, shadow=2**31)
    with Session(reg.engine) as session:  # past set_route, at the storage layer: refused on assignment
        row = session.scalars(select(RouteRow)).one()
        for weights in ({"1": float("nan")}, {"1": float("inf")}, {"1": 50.0}, {"x": 100.0}, {"1": 0.0, "2": 100.0}):
            with pytest.raises(RegistryError, match="route weights"):
                row.weights = weights
    assert reg.get_route("ab") == good


def test_non_finite_numbers_are_never_stored(reg, run_copy, tmp_path):
    from sqlalchemy import update

    from lepton.registry.db import RouteRow

    info = json.loads((run_copy / "run.json").read_text())
    (run_copy / "run.json").write_text(json.dumps({**info, "val_auc": float("nan")}))  # AUC on one class: undefined
    fingerprint = json.loads((run_copy / "data.json").read_text())
    (run_copy / "data.json").write_text(json.dumps({**fingerprint, "intensity": {"mean": 0.4, "std_of_image_means":
                                                                                 float("nan")}}))
    v = reg.register_run(run_copy, "nan")
    assert v.metrics["val_auc"] is None and reg.get("nan@1").metrics["val_auc"] is None
    assert reg.get("nan@1").data_fingerprint["intensity"] == {"mean": 0.4, "std_of_image_means": None}
    for threshold in (float("nan"), float("inf"), 1.5):
        (run_copy / "run.json").write_text(json.dumps({**info, "threshold": threshold}))
        with pytest.raises(RegistryError, match="threshold"):
            reg.register_run(run_copy, "nan")
    assert [x.version for x in reg.list("nan")] == [1]
    with pytest.raises(RegistryError, match="threshold"):
        reg.register_onnx(_onnx_classifier(tmp_path / "m.onnx"), "nan", labels=["a", "b"], image_size=28,
                          threshold=float("nan"))
    (run_copy / "run.json").write_text(json.dumps(info))
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    (run_copy / "config.yaml").write_text(yaml.safe_dump({**config, "lr": float("inf")}))
    with pytest.raises((RegistryError, ConfigError), match="lr"):
        reg.register_run(run_copy, "nan")
    reg.set_route("nan", {1: 1})

    def poison(session):  # a bulk UPDATE skips the ORM's checks: the strict JSON writer still refuses
        session.execute(update(RouteRow).values(weights={"1": float("nan")}))

    with pytest.raises(RegistryError, match="finite numbers only"):
        reg._retrying(poison)
    assert reg.get_route("nan").weights == {1: 100.0}


def test_schema_is_migrated_once(location):
    from sqlalchemy import text

    first = Registry.open(location)
    second = Registry.open(location)  # re-opening runs the migration check again, harmlessly
    with second.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0005"
    assert first.list() == []


@pytest.mark.slow
def test_concurrent_writers_get_distinct_consecutive_versions(location, run_copy):
    """8 real processes register 3 versions each of one model at the same moment."""
    Registry.open(location)  # create the schema first, as a deployed registry would have it
    script = (
        "import sys, time\n"
        "from lepton.registry import Registry\n"
        "reg = Registry.open(sys.argv[1])\n"
        "while time.time() < float(sys.argv[3]): time.sleep(0.001)\n"
        "print(' '.join(str(reg.register_run(sys.argv[2], 'busy').version) for _ in range(3)))\n"
    )
    import time

    start_at = str(time.time() + 3.0)
    procs = [subprocess.Popen([sys.executable, "-c", script, location, str(run_copy), start_at],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    got = sorted(int(v) for out, _ in outputs for v in out.split())
    assert got == list(range(1, 25))
    reg = Registry.open(location)
    versions = reg.list("busy")
    assert [v.version for v in versions] == list(range(1, 25))
    for v in versions:  # every row is complete and its artifacts verify
        assert v.labels == ["normal", "opacity"] and reg.card(v.ref).startswith("# Model card")


@pytest.mark.slow
def test_cli_registry_workflow(run_copy, tmp_path):
    regdir = str(tmp_path / "clireg")

    def cli(*args):
        out = subprocess.run(lepton_cmd("models", *args, "--registry", regdir), capture_output=True, text=True,
                             timeout=120)
        return out

    assert cli("register", str(run_copy), "--name", "cxr").returncode == 0
    assert cli("register", str(run_copy), "--name", "cxr").returncode == 0
    assert cli("promote", "cxr", "1", "--stage", "production").returncode == 0
    assert cli("promote", "cxr", "2", "--stage", "production").returncode == 0
    listing = cli("list")
    assert "production" in listing.stdout and "archived" in listing.stdout
    assert "cxr@1 is production again" in cli("rollback", "cxr").stdout
    shown = json.loads(cli("show", "cxr@production").stdout)
    assert shown["version"] == 1
    assert "## Metrics" in cli("card", "cxr@1").stdout
    assert json.loads(cli("diff", "cxr", "1", "2").stdout)["config"] == {}
    refused = cli("delete", "cxr", "1")
    assert refused.returncode == 2 and "in production" in refused.stderr
    assert cli("export", "cxr@1", str(tmp_path / "cxr.lepton")).returncode == 0
    imported = cli("import", str(tmp_path / "cxr.lepton"), "--name", "copy")
    assert imported.returncode == 0 and "copy@1" in imported.stdout
