import pytest

from lepton.config import PRESETS, TrainConfig, make_config
from lepton.errors import ConfigError


def test_auto_preset_picks_medmnist_for_npz():
    assert make_config(data="x.npz").preset == "medmnist"
    assert make_config(data="medmnist:pneumoniamnist").preset == "medmnist"
    assert make_config(data="folder/").preset == "default"
    cfg = make_config(data="x.npz", epochs=3)
    assert cfg.epochs == 3 and cfg.augment == PRESETS["medmnist"]["augment"]


def test_yaml_round_trip(tmp_path):
    cfg = make_config("medmnist", data="x.npz", augment_options={"rotate": 5.0})
    cfg.to_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("field,value", [("epochs", 0), ("val_fraction", 0.7), ("ema_decay", 1.0),
                                         ("channels", 2), ("image_size", 4), ("imbalance", "smote")])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        make_config(data="x.npz", **{field: value})


def test_bad_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("- a\n- list\n")
    with pytest.raises(ConfigError, match="mapping"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")


def test_the_default_task_is_left_out_of_saved_configs(tmp_path):
    """Classification runs stay readable by Lepton versions older than tasks; other tasks are named."""
    make_config("default", data="x.npz").to_yaml(tmp_path / "a.yaml")
    assert "task" not in (tmp_path / "a.yaml").read_text()
    assert TrainConfig.from_yaml(tmp_path / "a.yaml").task == "classification"
    make_config("default", data="x.npz", task="toy").to_yaml(tmp_path / "b.yaml")
    assert TrainConfig.from_yaml(tmp_path / "b.yaml").task == "toy"


def test_auto_preset_reads_whether_an_npz_holds_volumes(tmp_path):
    import numpy as np

    from lepton.config import auto_preset

    np.savez(tmp_path / "vol.npz", train_images=np.zeros((2, 8, 8, 8), np.uint8), train_labels=np.zeros((2, 1)))
    np.savez(tmp_path / "img.npz", train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.zeros((2, 1)))
    np.savez(tmp_path / "rgb.npz", train_images=np.zeros((2, 8, 8, 3), np.uint8), train_labels=np.zeros((2, 1)))
    assert auto_preset(str(tmp_path / "vol.npz")) == "medmnist3d"
    assert auto_preset(str(tmp_path / "img.npz")) == auto_preset(str(tmp_path / "rgb.npz")) == "medmnist"
    assert make_config("auto", data=str(tmp_path / "vol.npz")).preset == "medmnist3d"


@pytest.mark.parametrize("text,field", [
    ("lr: .nan", "lr"), ("lr: .inf", "lr"), ("warmup_epochs: .inf", "warmup_epochs"),
    ("time_budget_s: .nan", "time_budget_s"), ("weight_decay: -.inf", "weight_decay"),
    ("augment_options: {rotate: .nan}", "augment_options.rotate"),
    ("preprocess: [{name: spacing, mm: [1.5, .inf, 3.0]}]", r"preprocess\[0\].mm\[1\]"),
])
def test_non_finite_numbers_in_yaml_are_refused_naming_the_field(tmp_path, text, field):
    (tmp_path / "c.yaml").write_text(f"data: x.npz\n{text}\n")
    with pytest.raises(ConfigError, match=f"{field} must be a finite number"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")


@pytest.mark.parametrize("field,value", [("epochs", 2.5), ("epochs", 10**12), ("batch_size", 0), ("batch_size", True),
                                         ("lr", 0.0), ("lr", 1e9), ("seed", -1), ("seed", 2**40), ("threads", 0),
                                         ("gamma", 0.0), ("time_budget_s", 1e12), ("adv_steps", 0),
                                         ("backbone_lr", -1.0), ("early_stopping", -3), ("epochs", "20")])
def test_numbers_out_of_bounds_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field} must be"):
        make_config(data="x.npz", **{field: value})


def test_whole_numbers_written_as_floats_are_taken(tmp_path):
    (tmp_path / "c.yaml").write_text("data: x.npz\nepochs: 20.0\nbatch_size: 32.0\nlr: 0.001\n")
    cfg = TrainConfig.from_yaml(tmp_path / "c.yaml").validate()
    assert cfg.epochs == 20 and isinstance(cfg.epochs, int) and cfg.batch_size == 32


def test_every_field_is_declared_with_help_and_a_group():
    from lepton.config import FIELDS, GROUPS

    for name, f in FIELDS.items():
        assert f.metadata["help"] and f.metadata["group"] in GROUPS, name
    assert FIELDS["lr"].metadata["bounds"].open_low and FIELDS["schedule"].metadata["choices"] == ("cosine", "step",
                                                                                                   "none")


def test_a_config_grouped_by_concern_reads_as_the_flat_one(tmp_path):
    flat = make_config("medmnist", data="x.npz", lr=0.01, augment_options={"rotate": 5.0}, task_options={"a": 1})
    grouped = {"run": {"data": "x.npz", "preset": "medmnist"}, "optimisation": {"lr": 0.01}}
    grouped["augmentation"] = {"augment_options": {"rotate": 5.0}}
    grouped["task"] = {"task_options": {"a": 1}}
    rest = {k: v for k, v in flat.to_dict().items() if k not in ("data", "preset", "lr", "augment_options",
                                                                  "task_options")}
    assert TrainConfig.from_dict({**grouped, **rest}).validate() == flat
    (tmp_path / "g.yaml").write_text("data: {data: x.npz, image_size: 28}\ntask: segmentation\n")
    cfg = TrainConfig.from_yaml(tmp_path / "g.yaml")  # a group named like a field only when it holds a mapping
    assert (cfg.data, cfg.image_size, cfg.task) == ("x.npz", 28, "segmentation")
    with pytest.raises(ConfigError, match="lr is given twice"):
        TrainConfig.from_dict({"lr": 0.1, "optimisation": {"lr": 0.2}})
    with pytest.raises(ConfigError, match="unknown config field.*learning_rate"):
        TrainConfig.from_dict({"optimisation": {"learning_rate": 0.2}})


def test_federation_settings_that_are_config_fields_take_their_declaration():
    import tomllib

    from lepton.config import FIELDS
    from lepton.federated import APP_DIR, CONFIG_FIELDS, check_settings

    with pytest.raises(ConfigError, match="^federation setting image-size must be a whole number from 8"):
        check_settings({"image-size": 4})
    with pytest.raises(ConfigError, match="^federation setting local-epochs must be"):
        check_settings({"local-epochs": 0})
    assert check_settings({"image-size": 0, "batch-size": 32.0})["batch-size"] == 32
    app_config = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    for key, name in CONFIG_FIELDS.items():  # the Flower app's defaults are the fields' (one round: one epoch)
        if key not in ("local-epochs", "image-size"):
            assert app_config[key] == FIELDS[name].default, key
