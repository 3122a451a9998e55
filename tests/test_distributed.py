"""Data-parallel training under torchrun with 2 CPU processes (gloo): the same weights as one process with the
double batch, a SIGKILLed rank restarted by torchrun's elastic agent, and rank 0 alone writing the run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import lepton_cmd
from lepton.config import make_config
from lepton.errors import ConfigError
from lepton.train.distributed import Dist, shard, torchrun_command

#: After two optimiser steps the weights of 2 processes x batch 8 and 1 process x batch 16 differ by less than this
#: (relative L2 norm over all floating tensors). Float noise alone gives ~0.008 (measured: one process with 1 vs 2
#: threads differs as much, since AdamW's first steps move every parameter by about +-lr whatever its gradient's
#: size); per-process BatchNorm statistics instead of synchronised ones give ~0.08.
EQUIVALENCE_TOL = 0.03


def _env(threads: int = 1) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory) -> Path:
    """32 training images: one epoch is exactly two steps of a 16-image global batch."""
    from lepton.data.tools.synthetic import write_synthetic_npz

    return write_synthetic_npz(tmp_path_factory.mktemp("ddp") / "small.npz", n=64, size=32, seed=3,
                               fractions=(0.5, 0.25, 0.25))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)["model"]


def test_two_processes_reach_the_weights_of_one_with_the_double_batch(small_npz, tmp_path):
    common = ["train", str(small_npz), "--preset", "default", "--model", "resnet18", "--epochs", "1",
              "--augment", "none", "--imbalance", "none", "--ema-decay", "0", "--precision", "fp32", "--no-tta",
              "--lr", "0.002", "--warmup-epochs", "0", "--output-dir", str(tmp_path), "--quiet"]
    one = subprocess.run(lepton_cmd(*common, "--batch-size", "16", "--name", "one"), capture_output=True,
                         text=True, timeout=300, env=_env())
    assert one.returncode == 0, one.stderr
    two = subprocess.run(lepton_cmd(*common, "--batch-size", "8", "--name", "two", "--nproc", "2"),
                         capture_output=True, text=True, timeout=300, env=_env())
    assert two.returncode == 0, two.stderr
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()  # plain BatchNorm names: the checkpoint loads into the ordinary network
    floats = [k for k, v in a.items() if v.is_floating_point()]
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in floats) ** 0.5
    norm = sum((a[k] ** 2).sum() for k in floats) ** 0.5
    assert diff / norm < EQUIVALENCE_TOL, f"relative weight difference {diff / norm:.4f}"
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["distributed"] == {"processes": 2, "backend": "gloo", "batch_per_process": 8,
                                   "effective_batch_size": 16, "lr": 0.002, "lr_scaling": "none",
                                   "effective_lr": 0.002, "restarts": 0}
    assert "distributed" not in json.loads((tmp_path / "one" / "run.json").read_text())
    # the summary is printed once (rank 0), as JSON
    assert two.stdout.count('"run"') == 1


def _marked_pids(marker: str) -> list[int]:
    """Live processes (not zombies) whose environment holds ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes().split(b"\0") and (
                    entry / "stat").read_text().split(") ")[1][0] != "Z":
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _worker_pids(marker: str, rank: int) -> list[int]:
    """Live processes whose environment holds ``marker`` and ``RANK=rank`` (torchrun's workers of this test)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in env and f"RANK={rank}".encode() in env:
            pids.append(int(entry.name))
    return pids


def test_a_killed_rank_is_restarted_and_the_run_finishes_its_epochs(synthetic_npz, tmp_path):
    marker = f"LEPTON_TEST_MARK={tmp_path.name}"
    run_dir = tmp_path / "elastic"
    proc = subprocess.Popen(
        lepton_cmd("train", str(synthetic_npz), "--preset", "default", "--model", "lepton_cnn", "--epochs", "4",
                   "--batch-size", "16", "--output-dir", str(tmp_path), "--name", "elastic", "--nproc", "2",
                   "--max-restarts", "2", "--quiet"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**_env(), "LEPTON_TEST_MARK": tmp_path.name})
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not (run_dir / "last.pt").exists():
            time.sleep(0.05)
        assert proc.poll() is None, f"training ended before a rank could be killed: {proc.communicate()[1]}"
        victims = []
        while time.monotonic() < deadline and not victims:
            victims = _worker_pids(marker, 1)
        assert victims, "no rank-1 worker found"
        epochs_before = len(list(csv.DictReader((run_dir / "history.csv").open())))
        assert epochs_before < 4, "the run finished before the kill"
        os.kill(victims[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete" and info["distributed"]["restarts"] >= 1
    epochs = [int(r["epoch"]) for r in csv.DictReader((run_dir / "history.csv").open())]
    assert epochs == [1, 2, 3, 4], epochs  # every epoch once: the restart resumed after the last checkpoint
    assert "resuming" in err


def test_a_killed_job_resumes_with_resume_and_nproc(synthetic_npz, tmp_path):
    """The whole torchrun job killed (no restarts left): `--resume RUN --nproc 2` finishes it."""
    run_dir = tmp_path / "again"
    proc = subprocess.Popen(
        lepton_cmd("train", str(synthetic_npz), "--preset", "default", "--model", "lepton_cnn", "--epochs", "3",
                   "--batch-size", "16", "--output-dir", str(tmp_path), "--name", "again", "--nproc", "2",
                   "--quiet"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**_env(), "LEPTON_TEST_MARK": tmp_path.name})
    marker = f"LEPTON_TEST_MARK={tmp_path.name}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not (run_dir / "last.pt").exists():
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be killed"
        # The launcher, torchrun and both workers (torchrun starts workers in sessions of their own).
        for pid in _marked_pids(marker):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _marked_pids(marker):
            assert time.monotonic() < deadline, "workers outlived the kill"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = len(list(csv.DictReader((run_dir / "history.csv").open())))
    assert 1 <= done_before < 3 and not (run_dir / "run.json").exists()
    resumed = subprocess.run(lepton_cmd("train", "--resume", str(run_dir), "--nproc", "2", "--quiet"),
                             capture_output=True, text=True, timeout=300, env=_env())
    assert resumed.returncode == 0, resumed.stderr
    assert [int(r["epoch"]) for r in csv.DictReader((run_dir / "history.csv").open())] == [1, 2, 3]
    assert json.loads((run_dir / "run.json").read_text())["distributed"]["processes"] == 2


GATHER = """
import sys, torch
from lepton.config import make_config
from lepton.tasks import get_task
from lepton.train import distributed as D
from lepton.train.data import prepare_data
from lepton.train.loop import Trainer, seed_epoch

dist = D.from_env()
D.init(dist, "cpu")
config = make_config("default", data=sys.argv[1], model="lepton_cnn", ema_decay=0, tta=True)
task = get_task("classification")
seed_epoch(0, 0)
prepared = prepare_data(config, None, task)
seed_epoch(0, 0)
trainer = Trainer(config, task, prepared, "cpu", dist=dist)
out, val = trainer.predict_val(), trainer.validate()  # collectives: every process calls them
if dist.main:
    torch.save({"out": torch.from_numpy(out), "val": val}, sys.argv[2])
D.shutdown(dist)
"""


def test_validation_predicts_each_image_once_and_matches_one_process(tmp_path):
    """17 val images over 2 processes: 9 + 8 predictions gathered in order, none padded or repeated."""
    from lepton.data.tools.synthetic import write_synthetic_npz

    data = write_synthetic_npz(tmp_path / "odd.npz", n=70, size=32, seed=5, fractions=(0.5, 0.25, 0.25))
    (tmp_path / "gather.py").write_text(GATHER)
    one = subprocess.run([sys.executable, str(tmp_path / "gather.py"), str(data), str(tmp_path / "one.pt")],
                         capture_output=True, text=True, timeout=120, env=_env())
    assert one.returncode == 0, one.stderr
    launcher = torchrun_command([], 2)[:-2]  # torchrun running a script instead of -m lepton
    two = subprocess.run([*launcher, str(tmp_path / "gather.py"), str(data), str(tmp_path / "two.pt")],
                         capture_output=True, text=True, timeout=120, env=_env())
    assert two.returncode == 0, two.stderr
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("one", "two"))
    assert a["out"].shape == b["out"].shape == (17, 2)
    assert torch.allclose(a["out"], b["out"], atol=1e-5)
    assert abs(a["val"]["val_auc"] - b["val"]["val_auc"]) < 1e-9


AUDIT = """
import os, sys
_root = os.environ["LEPTON_AUDIT_ROOT"]
_log = os.path.join(os.environ["LEPTON_AUDIT_OUT"], "rank%s.txt" % os.environ.get("RANK", "x"))

def _hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode = args[1] if len(args) > 1 else "r"
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(args[2] if len(args) > 2 else 0, int) and (args[2] & (os.O_WRONLY | os.O_RDWR)))
        paths = [args[0]] if writes else []
    elif event in ("os.rename", "os.remove", "os.mkdir", "shutil.rmtree"):
        paths = [args[0]]
    else:
        return
    for path in paths:
        path = os.fsdecode(path) if not isinstance(path, str) else path
        if os.path.abspath(path).startswith(_root):
            with open(_log, "a") as fh:
                fh.write(event + " " + path + "\\n")

if os.environ.get("RANK") is not None:
    sys.addaudithook(_hook)
"""


def test_only_rank_zero_writes_the_run_directory(small_npz, tmp_path):
    hooks, audit, runs = tmp_path / "hooks", tmp_path / "audit", tmp_path / "runs"
    for d in (hooks, audit, runs):
        d.mkdir()
    (hooks / "sitecustomize.py").write_text(textwrap.dedent(AUDIT))
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]),
           "LEPTON_AUDIT_ROOT": str(runs), "LEPTON_AUDIT_OUT": str(audit)}
    done = subprocess.run(lepton_cmd("train", str(small_npz), "--preset", "default", "--model", "lepton_cnn",
                                     "--epochs", "2", "--batch-size", "8", "--output-dir", str(runs), "--name",
                                     "audited", "--nproc", "2", "--quiet"),
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    rank0 = (audit / "rank0.txt").read_text()
    for name in ("config.yaml", "last.pt", "best.pt", "history.csv", "run.json"):
        assert name in rank0, f"rank 0 did not write {name}"
    assert not (audit / "rank1.txt").exists(), (audit / "rank1.txt").read_text()


# -- single-process parts ---------------------------------------------------------------------------------
def test_shards_are_contiguous_and_cover_the_batch():
    batch = torch.arange(7)
    parts = [shard(batch, Dist(rank, 2)) for rank in range(2)]
    assert torch.equal(torch.cat(parts), batch) and [len(p) for p in parts] == [4, 3]
    assert torch.equal(shard(batch, Dist()), batch)


def test_torchrun_command_and_bad_launch_values():
    cmd = torchrun_command(["train", "data.npz"], 2, 1)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and cmd[cmd.index("--max-restarts") + 1] == "1"
    assert cmd[-4:] == ["-m", "lepton", "train", "data.npz"]
    with pytest.raises(ConfigError, match="--nproc"):
        torchrun_command([], 0)
    with pytest.raises(ConfigError, match="lr_scaling"):
        make_config("default", data="x.npz", lr_scaling="cubic")


def test_max_restarts_needs_nproc(synthetic_npz):
    done = subprocess.run(lepton_cmd("train", str(synthetic_npz), "--max-restarts", "2"), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "--max-restarts needs --nproc" in done.stderr


def test_a_run_resumes_only_with_its_own_process_count(synthetic_npz, tmp_path):
    from lepton.errors import RunError
    from lepton.train import train

    train(synthetic_npz, preset="default", output_dir=str(tmp_path), name="solo", epochs=1, batch_size=32,
          quiet=True)
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with pytest.raises(ConfigError, match="MASTER_ADDR"):  # not under torchrun: a clear error, no hang
            train(resume=tmp_path / "solo", quiet=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    state = torch.load(tmp_path / "solo" / "last.pt", weights_only=False)
    state["world"] = 2
    torch.save(state, tmp_path / "solo" / "last.pt")
    with pytest.raises(RunError, match="--nproc 2"):
        train(resume=tmp_path / "solo", quiet=True)
