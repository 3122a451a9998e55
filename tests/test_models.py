import pytest
import torch

from lepton.errors import ModelError
from lepton.models import create_model, head_parameters, list_models

NAMES = ["lepton_cnn", "lepton_cnn_tiny", "frame_cnn", "resnet18", "resnet34", "resnet50", "densenet121",
         "efficientnet_b0"]


def test_registry_lists_every_network():
    assert [m.name for m in list_models() if m.kind == ("image", "vector")] == sorted(NAMES)
    assert [m.name for m in list_models() if m.output == "map"] == ["attention_unet", "segresnet", "unet"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [28, 96])
def test_forward_shapes(name, size):
    model = create_model(name, in_channels=1, num_classes=3, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 3)


def test_small_input_stem():
    small = create_model("resnet18", image_size=28)
    large = create_model("resnet18", image_size=224)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)


def test_unknown_model():
    with pytest.raises(ModelError, match="unknown model 'vgg99'"):
        create_model("vgg99")


def _imagenet_resnet18_state(path):
    # Same key layout as torchvision's/timm's resnet18 ImageNet checkpoint: 3-channel 7x7 stem, 1000 classes.
    ref = create_model("resnet18", in_channels=3, num_classes=1000, image_size=224)
    state = ref.state_dict()
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer4.1.bn2.weight", "fc.weight"):
        assert key in state
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return state


def test_pretrained_grayscale_adaptation(tmp_path):
    state = _imagenet_resnet18_state(tmp_path / "r18.pth")
    model = create_model("resnet18", in_channels=1, num_classes=2, pretrained=tmp_path / "r18.pth", image_size=224)
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.layer3[0].conv2.weight, state["layer3.0.conv2.weight"])
    assert model.fc.out_features == 2
    small = create_model("resnet18", in_channels=1, num_classes=2, pretrained=tmp_path / "r18.pth", image_size=28)
    torch.testing.assert_close(small.layer4[1].conv1.weight, state["layer4.1.conv1.weight"])


def test_pretrained_mismatch_is_a_clear_error(tmp_path):
    _imagenet_resnet18_state(tmp_path / "r18.pth")
    with pytest.raises(ModelError, match="do not fit resnet34.*missing"):
        create_model("resnet34", pretrained=tmp_path / "r18.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a readable weight file"):
        create_model("resnet18", pretrained=tmp_path / "junk.pth")
    with pytest.raises(ModelError, match="does not support pretrained"):
        create_model("lepton_cnn", pretrained=tmp_path / "r18.pth")


@pytest.mark.parametrize("name", NAMES)
def test_head_split(name):
    model = create_model(name, num_classes=2, image_size=32)
    backbone, head = head_parameters(model, name)
    assert head and backbone
    assert sum(p.numel() for p in head) < sum(p.numel() for p in backbone)
