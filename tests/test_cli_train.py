"""`lepton train`'s options are derived from the TrainConfig fields' declarations: each option is a field (or says
how to run), each field a user sets is an option, and the values reach the config."""

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner

from lepton.cli import app
from lepton.cli.train import NOT_CONFIG, OWN_SYNTAX
from lepton.config import FIELDS, TrainConfig


def _train_command():
    return typer.main.get_command(app).commands["train"]


def test_every_option_is_a_field_and_every_field_a_user_sets_is_an_option():
    params = {p.name: p for p in _train_command().params}
    strays = sorted(set(params) - set(FIELDS) - set(OWN_SYNTAX) - set(NOT_CONFIG))
    assert strays == [], f"options that set no field: {strays}"
    reachable = (set(params) & set(FIELDS)) | {OWN_SYNTAX[name] for name in params if name in OWN_SYNTAX}
    user = {name for name, f in FIELDS.items() if f.metadata["user"]}
    assert sorted(user - reachable) == [], "fields a user cannot set from the command line"
    assert reachable <= user  # (amp, kept for old configs, is not offered)
    assert not [name for name, p in params.items() if isinstance(p, click.Option) and not p.help]  # all explained
    for flags in ("--time-budget", "--memory-limit", "--sync-bn", "--tta", "--freeze-backbone", "--task-option",
                  "--covariates", "--aug", "--nproc", "--resume", "--config", "--track", "--registry"):
        assert any(flags in p.opts for p in params.values()), flags
    assert params["tta"].secondary_opts == ["--no-tta"] and params["sync_batchnorm"].secondary_opts == ["--no-sync-bn"]
    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "250"}).output
    for p in params.values():
        assert p.opts[0] in out, p.opts[0]
    assert "Optimisation" in out and "Semi-supervised" in out  # one --help panel per group


@pytest.fixture
def captured(monkeypatch):
    """``lepton train`` with the training replaced by a recorder of the config it was given."""
    import importlib

    package = importlib.import_module("lepton.train")  # (the name lepton.train is also the train function)
    seen = {}

    def fake_train(*, config=None, quiet=False, track=None, resume=None):
        seen["config"] = config
        return None

    _ = package.train, package.summary, package.run_name  # handed on (and kept) before they are replaced
    monkeypatch.setattr(package, "train", fake_train)
    monkeypatch.setattr(package, "summary", lambda run: {})
    return seen


def test_options_reach_the_config_under_their_fields(captured, synthetic_npz):
    args = ["train", str(synthetic_npz), "--epochs", "2", "--schedule", "step", "--step-size", "3", "--gamma", "0.5",
            "--adversarial", "pgd", "--adv-steps", "2", "--time-budget", "30", "--memory-limit", "1.5",
            "--no-sync-bn", "--no-tta", "--freeze-backbone", "--normalize", "dataset", "--aug", "rotate=5",
            "--task-option", "fusion=film", "--lr-scaling", "sqrt", "--semi-ratio", "3", "--val-fraction", "0.2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = captured["config"]
    assert (cfg.epochs, cfg.schedule, cfg.step_size, cfg.gamma, cfg.adversarial, cfg.adv_steps) == \
        (2, "step", 3, 0.5, "pgd", 2)
    assert (cfg.time_budget_s, cfg.memory_limit_gb, cfg.sync_batchnorm, cfg.tta, cfg.freeze_backbone) == \
        (30.0, 1.5, False, False, True)
    assert (cfg.normalize, cfg.augment_options, cfg.task_options, cfg.lr_scaling, cfg.semi_ratio) == \
        ("dataset", {"rotate": 5.0}, {"fusion": "film"}, "sqrt", 3)
    assert cfg.val_fraction == 0.2 and cfg.preset == "medmnist" and cfg.ema_decay == 0.995  # the rest: the preset's


def test_a_grouped_config_file_under_options(captured, tmp_path, synthetic_npz):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "run": {"data": str(synthetic_npz)}, "optimisation": {"lr": 0.01, "epochs": 4}, "data": {"normalize": "half"}}))
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "c.yaml"), "--lr", "0.02"])
    assert result.exit_code == 0, result.output
    cfg = captured["config"]
    assert (cfg.lr, cfg.epochs, cfg.normalize, cfg.data) == (0.02, 4, "half", str(synthetic_npz))
    assert cfg == TrainConfig.from_dict({**cfg.to_dict()})


@pytest.mark.parametrize("args,option", [
    (["--schedule", "linear"], "--schedule"), (["--gamma", "0"], "--gamma"), (["--ensemble", "17"], "--ensemble"),
    (["--val-fraction", "0.5"], "--val-fraction"), (["--semi", "pseudo"], "--semi"), (["--lr", "nan"], "--lr"),
])
def test_values_outside_a_field_s_declaration_are_refused_while_parsing(args, option):
    result = CliRunner().invoke(app, ["train", "x.npz", *args])
    assert result.exit_code == 2 and option in result.output and "Invalid value" in result.output, result.output
