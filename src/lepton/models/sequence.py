"""Sequence networks: a 2-D encoder per frame (any registered classifier) with a temporal head — GRU, LSTM or
attention pooling — and an R(2+1)-D video network; both take clips (N, C, T, H, W) and, optionally, a covariate vector
per clip fused with the clip's embedding (late fusion by concatenation, or FiLM).

The temporal heads take any (N, T, D) feature series, so a 1-D signal (an ECG, (N, C, T)) runs through the same heads
behind ``SignalEncoder``, a strided 1-D convolution stack.
"""

from __future__ import annotations

import torch
from torch import nn

from lepton.models.registry import register_model

#: Width of each frame's embedding.
FRAME_FEATURES = 128
FUSIONS = ("late", "film")


class AttentionPool(nn.Module):
    """Temporal attention pooling: a learned score per time step, softmax over time, the weighted mean."""

    def __init__(self, features: int):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(features, features // 2), nn.Tanh(), nn.Linear(features // 2, 1))
        self.out_features = features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.score(h).squeeze(-1), dim=1)
        return (weights.unsqueeze(-1) * h).sum(1)


class RecurrentPool(nn.Module):
    """A GRU or LSTM over time (bidirectional), read as its last hidden states in both directions.

    The per-frame embeddings come from a linear layer of any scale, which the recurrent gates (sigmoids and tanh)
    saturate on or barely move with; a LayerNorm puts every time step on one scale first (attention pooling, a
    weighted mean, needs none). The LSTM's forget gates start open (bias 1, Jozefowicz et al. 2015), so the state
    carries the early frames through the clip from the first step."""

    def __init__(self, kind: str, features: int, hidden: int = 64):
        super().__init__()
        cls = nn.GRU if kind == "gru" else nn.LSTM
        self.norm = nn.LayerNorm(features)
        self.rnn = cls(features, hidden, batch_first=True, bidirectional=True)
        if kind == "lstm":
            with torch.no_grad():  # gate order i, f, g, o: the second quarter of each bias is the forget gate's
                for name, bias in self.rnn.named_parameters():
                    if name.startswith("bias_ih"):
                        bias[hidden:2 * hidden] = 1.0
                    elif name.startswith("bias_hh"):
                        bias[hidden:2 * hidden] = 0.0
        self.out_features = 2 * hidden

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        _, state = self.rnn(self.norm(h))
        last = state[0] if isinstance(state, tuple) else state  # (2, N, hidden): forward and backward
        return torch.cat([last[0], last[1]], dim=1)


def temporal_head(kind: str, features: int) -> nn.Module:
    """``gru``, ``lstm`` or ``attention`` over (N, T, features) → (N, out_features)."""
    if kind in ("gru", "lstm"):
        return RecurrentPool(kind, features)
    if kind == "attention":
        return AttentionPool(features)
    raise ValueError(f"unknown temporal head {kind!r}; use gru, lstm or attention")


class Fusion(nn.Module):
    """The clip's embedding (N, D) with covariates (N, F) into outputs: ``late`` concatenates the embedding with an
    MLP's covariate features; ``film`` (Perez et al. 2018) scales and shifts the embedding feature-wise by amounts
    predicted from the covariates. Without covariates (None) the covariates count as all zero — under imputation:
    everything missing — and FiLM is the identity."""

    def __init__(self, features: int, covariates: int, num_outputs: int, kind: str = "late", dropout: float = 0.2,
                 target_mean: float = 0.0, target_std: float = 1.0):
        super().__init__()
        # A regression target's training mean and spread: the layer answers in the target's units while its weights
        # learn a standardised value.
        self.register_buffer("target_mean", torch.tensor(float(target_mean)))
        self.register_buffer("target_std", torch.tensor(float(target_std)))
        if kind not in FUSIONS:
            raise ValueError(f"unknown fusion {kind!r}; use one of {', '.join(FUSIONS)}")
        self.kind, self.covariates = kind, covariates
        self.dropout = nn.Dropout(dropout)
        if covariates and kind == "late":
            self.tabular = nn.Sequential(nn.Linear(covariates, 32), nn.ReLU(inplace=True))
            self.fc = nn.Linear(features + 32, num_outputs)
        else:
            self.fc = nn.Linear(features, num_outputs)
        if covariates and kind == "film":
            self.film = nn.Sequential(nn.Linear(covariates, 64), nn.ReLU(inplace=True), nn.Linear(64, 2 * features))
            nn.init.zeros_(self.film[-1].weight)  # starts as the identity: the image path trains as without
            nn.init.zeros_(self.film[-1].bias)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.covariates:
            if c is None:
                c = z.new_zeros(len(z), self.covariates)
            c = c.to(z.dtype)
            if self.kind == "late":
                z = torch.cat([z, self.tabular(c)], dim=1)
            else:
                gamma, beta = self.film(c).chunk(2, dim=1)
                z = z * (1 + gamma) + beta
        return self.fc(self.dropout(z)) * self.target_std + self.target_mean


class FrameSequenceNet(nn.Module):
    """A 2-D encoder applied to every frame, a temporal head over the frame embeddings, and the fusion layer."""

    def __init__(self, encoder: nn.Module, head: nn.Module, num_outputs: int, covariates: int = 0,
                 fusion: str = "late", target_mean: float = 0.0, target_std: float = 1.0):
        super().__init__()
        self.encoder, self.head = encoder, head
        self.fusion = Fusion(head.out_features, covariates, num_outputs, fusion, target_mean=target_mean,
                             target_std=target_std)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Clips (N, C, T, H, W) → per-frame features (N, T, D)."""
        n, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(n * t, c, h, w)
        return self.encoder(frames).reshape(n, t, -1)

    def forward(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        return self.fusion(self.head(self.embed(x)), covariates)


class SignalEncoder(nn.Module):
    """A 1-D signal (N, C, T) → a shorter feature series (N, T / 16, D): four strided convolution blocks."""

    def __init__(self, in_channels: int, features: int = FRAME_FEATURES):
        super().__init__()
        chans = [in_channels, 32, 64, features, features]
        blocks = []
        for i in range(4):
            blocks += [nn.Conv1d(chans[i], chans[i + 1], 7, stride=2, padding=3, bias=False),
                       nn.BatchNorm1d(chans[i + 1]), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*blocks)
        self.out_features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).transpose(1, 2)


class SignalNet(nn.Module):
    """A 1-D signal classifier/regressor through the same temporal heads as the frame networks."""

    def __init__(self, in_channels: int, num_outputs: int, head: str = "gru", target_mean: float = 0.0,
                 target_std: float = 1.0, covariates: int = 0, fusion: str = "late"):
        super().__init__()
        self.encoder = SignalEncoder(in_channels)
        self.head = temporal_head(head, self.encoder.out_features)
        self.fusion = Fusion(self.head.out_features, covariates, num_outputs, fusion, target_mean=target_mean,
                             target_std=target_std)

    def forward(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        return self.fusion(self.head(self.encoder(x)), covariates)


class Conv2Plus1D(nn.Sequential):
    """R(2+1)D's factorised convolution: a spatial 1×3×3 then a temporal 3×1×1 convolution (Tran et al. 2018)."""

    def __init__(self, cin: int, cout: int, stride: tuple[int, int]):
        mid = (cin * cout * 27) // (cin * 9 + 3 * cout)  # as many parameters as one 3×3×3 convolution
        super().__init__(nn.Conv3d(cin, mid, (1, 3, 3), (1, stride[1], stride[1]), (0, 1, 1), bias=False),
                         nn.BatchNorm3d(mid), nn.ReLU(inplace=True),
                         nn.Conv3d(mid, cout, (3, 1, 1), (stride[0], 1, 1), (1, 0, 0), bias=False))


class R2Plus1DBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: tuple[int, int]):
        super().__init__()
        self.conv1 = nn.Sequential(Conv2Plus1D(cin, cout, stride), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(Conv2Plus1D(cout, cout, (1, 1)), nn.BatchNorm3d(cout))
        self.skip = nn.Identity() if cin == cout and stride == (1, 1) else nn.Sequential(
            nn.Conv3d(cin, cout, 1, (stride[0], stride[1], stride[1]), bias=False), nn.BatchNorm3d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(self.conv1(x)) + self.skip(x))


class R2Plus1D(nn.Module):
    """A small R(2+1)-D residual video network (the family EchoNet-Dynamic regresses ejection fraction with): a stem,
    four stages of two blocks (8-64 channels: sized for CPUs), global pooling, the fusion layer."""

    def __init__(self, in_channels: int, num_outputs: int, covariates: int = 0, fusion: str = "late",
                 width: int = 8, target_mean: float = 0.0, target_std: float = 1.0):
        super().__init__()
        widths = [width, width * 2, width * 4, width * 8]
        self.stem = nn.Sequential(nn.Conv3d(in_channels, width, (1, 3, 3), 1, (0, 1, 1), bias=False),
                                  nn.BatchNorm3d(width), nn.ReLU(inplace=True))
        stages, cin = [], width
        for i, cout in enumerate(widths):
            stride = (1, 1) if i == 0 else (2, 2)
            stages += [R2Plus1DBlock(cin, cout, stride), R2Plus1DBlock(cout, cout, (1, 1))]
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fusion = Fusion(cin, covariates, num_outputs, fusion, target_mean=target_mean, target_std=target_std)

    def forward(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        return self.fusion(torch.flatten(self.pool(self.layers(self.stem(x))), 1), covariates)


@register_model("frame_cnn", "compact 2-D CNN (lepton_cnn at a quarter of its width: 8-64 channels), the default "
                "per-frame encoder of the seq_* networks", head="fc", cam_layer="features")
def frame_cnn(in_channels: int, num_classes: int, image_size: int, spatial_dims: int = 2) -> nn.Module:
    from lepton.models.networks import LeptonCNN

    return LeptonCNN(in_channels, num_classes, width=8, dropout=0.0)


def _frame_net(head: str, in_channels: int, num_classes: int, image_size: int, spatial_dims: int,
               encoder: str = "frame_cnn", covariates: int = 0, fusion: str = "late", target_mean: float = 0.0,
               target_std: float = 1.0) -> nn.Module:
    from lepton.errors import ModelError
    from lepton.models.registry import registered, registered_names

    if spatial_dims == 1:  # signals (N, C, T): the same temporal head behind the 1-D convolution encoder
        if encoder != "frame_cnn":
            raise ModelError(f"encoder {encoder!r} is a per-frame image network; signals use the 1-D encoder")
        return SignalNet(in_channels, num_classes, head, target_mean, target_std, covariates, fusion)
    if spatial_dims != 3:
        raise ModelError("sequence networks take clips (N, C, T, H, W) or signals (N, C, T): spatial_dims 3 or 1")
    info = registered(encoder)
    if info is None or info.kind != ("image", "vector") or 2 not in info.spatial_dims:
        fitting = [n for n in registered_names() if (i := registered(n)) and i.kind == ("image", "vector")
                   and 2 in i.spatial_dims]
        raise ModelError(f"encoder {encoder!r} is not a registered 2-D classifier; use one of {', '.join(fitting)}")
    # The encoder is any registered 2-D classifier; its final linear layer projects to the frame embedding.
    enc = info.builder(in_channels=in_channels, num_classes=FRAME_FEATURES, image_size=image_size, spatial_dims=2)
    return FrameSequenceNet(enc, temporal_head(head, FRAME_FEATURES), num_classes, covariates, fusion, target_mean,
                            target_std)


@register_model("seq_gru", "2-D encoder per frame (encoder option, default frame_cnn; signals: a 1-D convolution "
                "encoder) + bidirectional GRU over time", head="fusion.fc", spatial_dims=(3, 1), inputs="clip")
def seq_gru(in_channels: int, num_classes: int, image_size: int, spatial_dims: int = 3, **options) -> nn.Module:
    return _frame_net("gru", in_channels, num_classes, image_size, spatial_dims, **options)


@register_model("seq_lstm", "2-D encoder per frame (encoder option, default frame_cnn; signals: a 1-D convolution "
                "encoder) + bidirectional LSTM over time", head="fusion.fc", spatial_dims=(3, 1), inputs="clip")
def seq_lstm(in_channels: int, num_classes: int, image_size: int, spatial_dims: int = 3, **options) -> nn.Module:
    return _frame_net("lstm", in_channels, num_classes, image_size, spatial_dims, **options)


@register_model("seq_attention", "2-D encoder per frame (encoder option, default frame_cnn; signals: a 1-D "
                "convolution encoder) + temporal attention pooling",
                head="fusion.fc", spatial_dims=(3, 1), inputs="clip")
def seq_attention(in_channels: int, num_classes: int, image_size: int, spatial_dims: int = 3,
                  **options) -> nn.Module:
    return _frame_net("attention", in_channels, num_classes, image_size, spatial_dims, **options)


@register_model("r2plus1d", "R(2+1)-D residual video network over clips (N, C, T, H, W)", head="fusion.fc",
                spatial_dims=(3,), inputs="clip")
def r2plus1d(in_channels: int, num_classes: int, image_size: int, spatial_dims: int = 3, covariates: int = 0,
             fusion: str = "late", target_mean: float = 0.0, target_std: float = 1.0) -> nn.Module:
    from lepton.errors import ModelError

    if spatial_dims != 3:
        raise ModelError("r2plus1d takes clips (N, C, T, H, W): spatial_dims=3")
    return R2Plus1D(in_channels, num_classes, covariates, fusion, target_mean=target_mean, target_std=target_std)
