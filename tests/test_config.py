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
