"""Built-in networks. MONAI supplies the ResNet, DenseNet and EfficientNet implementations."""

from __future__ import annotations

import torch
from torch import nn

from lepton.models.registry import register_model

SMALL_INPUT = 64  # at or below this size, networks keep full resolution in their stem


class SliceChannels(nn.Module):
    """2.5-D: a 2-D network over volumes (N, C, D, H, W), reading the D slices as C x D input channels.

    Much cheaper than a 3-D network (2-D convolutions only), at the cost of depth-wise weight sharing; the module
    takes and returns what a 3-D network would, so training, export and serving see a volume model.
    """

    def __init__(self, net: nn.Module, depth: int):
        super().__init__()
        self.net, self.depth = net, depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1, 2))


class Ensemble(nn.Module):
    """Members of one architecture trained apart (other seeds) that answer together: the log of their mean softmax,
    so that the task's softmax gives exactly their mean class probabilities."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(x).float(), dim=1) for m in self.members])
        return torch.logsumexp(logp, dim=0) - torch.log(torch.tensor(float(len(self.members))))


class LeptonCNN(nn.Module):
    """A compact VGG-style baseline: four conv blocks, global average pooling, dropout, linear; 2-D or 3-D."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.2,
                 spatial_dims: int = 2):
        super().__init__()
        conv, norm, pool, gap = ((nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d) if spatial_dims == 2
                                 else (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.AdaptiveAvgPool3d))
        if spatial_dims == 3:
            width = width // 2  # a volume has ~30x the voxels of a slice: half the width keeps CPU training fast
        chans = [in_channels, width, width * 2, width * 4, width * 8]
        blocks = []
        for i in range(4):
            blocks += [
                conv(chans[i], chans[i + 1], 3, padding=1, bias=False),
                norm(chans[i + 1]),
                nn.ReLU(inplace=True),
                conv(chans[i + 1], chans[i + 1], 3, padding=1, bias=False),
                norm(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i < 3:
                blocks.append(pool(2))
        self.features = nn.Sequential(*blocks)
        self.pool = gap(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


@register_model("lepton_cnn", "compact 8-layer CNN baseline (fast on CPU; 2-D or 3-D)", head="fc",
                cam_layer="features", spatial_dims=(2, 3))
def lepton_cnn(in_channels: int, num_classes: int, image_size: int, spatial_dims: int = 2) -> nn.Module:
    return LeptonCNN(in_channels, num_classes, spatial_dims=spatial_dims)


@register_model("lepton_cnn_tiny", "the compact CNN at a quarter of the width (8-64 channels, 74 k parameters): "
                "CPU benchmarks and very small data sets", head="fc", cam_layer="features", spatial_dims=(2, 3))
def lepton_cnn_tiny(in_channels: int, num_classes: int, image_size: int, spatial_dims: int = 2) -> nn.Module:
    return LeptonCNN(in_channels, num_classes, width=8, spatial_dims=spatial_dims)


def _resnet(block: str, layers: list[int], in_channels: int, num_classes: int, image_size: int, spatial_dims: int):
    from monai.networks.nets import ResNet

    small = image_size <= SMALL_INPUT
    return ResNet(
        block, layers, [64, 128, 256, 512], spatial_dims=spatial_dims, n_input_channels=in_channels,
        conv1_t_size=3 if small else 7, conv1_t_stride=1 if small else 2, no_max_pool=small,
        num_classes=num_classes,
    )


@register_model("resnet18", "ResNet-18 (small-input stem at <= 64 px)", head="fc",
                pretrained_layout="torchvision/timm resnet18", cam_layer="layer4", spatial_dims=(2, 3))
def resnet18(in_channels: int, num_classes: int, image_size: int, spatial_dims: int = 2) -> nn.Module:
    return _resnet("basic", [2, 2, 2, 2], in_channels, num_classes, image_size, spatial_dims)


@register_model("resnet34", "ResNet-34 (small-input stem at <= 64 px)", head="fc",
                pretrained_layout="torchvision/timm resnet34", cam_layer="layer4", spatial_dims=(2, 3))
def resnet34(in_channels: int, num_classes: int, image_size: int, spatial_dims: int = 2) -> nn.Module:
    return _resnet("basic", [3, 4, 6, 3], in_channels, num_classes, image_size, spatial_dims)


@register_model("resnet50", "ResNet-50 (small-input stem at <= 64 px)", head="fc",
                pretrained_layout="torchvision/timm resnet50", cam_layer="layer4", spatial_dims=(2, 3))
def resnet50(in_channels: int, num_classes: int, image_size: int, spatial_dims: int = 2) -> nn.Module:
    return _resnet("bottleneck", [3, 4, 6, 3], in_channels, num_classes, image_size, spatial_dims)


@register_model("densenet121", "DenseNet-121 (small-input stem at <= 64 px; 2-D or 3-D)", head="class_layers.out",
                cam_layer="class_layers.relu", spatial_dims=(2, 3))
def densenet121(in_channels: int, num_classes: int, image_size: int, spatial_dims: int = 2) -> nn.Module:
    from monai.networks.nets import DenseNet121

    model = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes)
    if image_size <= SMALL_INPUT:
        # The stock stem divides resolution by 4; three transitions more would leave < 1 pixel.
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        model.features.conv0 = conv(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.features.pool0 = nn.Identity()
    return model


# EfficientNet-B0's stages (Tan & Le, 2019) in MONAI's block-string notation.
_B0_BLOCKS = ["r1_k3_s11_e1_i32_o16_se0.25", "r2_k3_s22_e6_i16_o24_se0.25", "r2_k5_s22_e6_i24_o40_se0.25",
              "r3_k3_s22_e6_i40_o80_se0.25", "r3_k5_s11_e6_i80_o112_se0.25", "r4_k5_s22_e6_i112_o192_se0.25",
              "r1_k3_s11_e6_i192_o320_se0.25"]


@register_model("efficientnet_b0", "EfficientNet-B0 (efficient small network, 4.0 M parameters)",
                head="_fc", cam_layer="_bn1")
def efficientnet_b0(in_channels: int, num_classes: int, image_size: int, spatial_dims: int = 2) -> nn.Module:
    from monai.networks.nets import EfficientNet

    # MONAI's EfficientNetBN fixes "same" padding for 224 px; the base class takes the real size.
    return EfficientNet(_B0_BLOCKS, spatial_dims=2, in_channels=in_channels, num_classes=num_classes,
                        width_coefficient=1.0, depth_coefficient=1.0, dropout_rate=0.2,
                        image_size=image_size, drop_connect_rate=0.2)


# -- segmentation: encoder-decoders with one output channel per class (background included) ---------------------

@register_model("unet", "U-Net with residual units (MONAI; 2-D or 3-D segmentation)", head="model.2",
                spatial_dims=(2, 3), output="map", divisor=16)
def unet(in_channels: int, num_classes: int, image_size: int, spatial_dims: int = 2) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="INSTANCE")


@register_model("segresnet", "SegResNet (MONAI; 2-D or 3-D segmentation, residual encoder)", head="conv_final",
                spatial_dims=(2, 3), output="map", divisor=8)
def segresnet(in_channels: int, num_classes: int, image_size: int, spatial_dims: int = 2) -> nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, init_filters=16)


@register_model("attention_unet", "Attention U-Net (MONAI; 2-D or 3-D segmentation)", head="model.2",
                spatial_dims=(2, 3), output="map", divisor=16)
def attention_unet(in_channels: int, num_classes: int, image_size: int, spatial_dims: int = 2) -> nn.Module:
    from monai.networks.nets import AttentionUnet

    return AttentionUnet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                         channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))
