"""Any registered 2-D (or 3-D) classifier with clinical covariates: the network's last layer projects to an embedding,
which ``Fusion`` (``lepton.models.sequence``: late fusion or FiLM) joins with the covariate vector before the class
outputs. ``create_model`` builds it when a classifier is asked for ``covariates``.
"""

from __future__ import annotations

import torch
from torch import nn

from lepton.models.sequence import FRAME_FEATURES, Fusion

#: Width of the image embedding the wrapped classifier's last layer gives.
FEATURES = FRAME_FEATURES


class ImageCovariateNet(nn.Module):
    """``encoder`` (a classifier built with ``FEATURES`` outputs) on the image, fused with covariates (N, F)."""

    #: ``head_parameters`` reads the fusion layer and the encoder's own last layer as the head.
    wraps_classifier = True

    def __init__(self, encoder: nn.Module, num_outputs: int, covariates: int, fusion: str = "late"):
        super().__init__()
        self.encoder = encoder
        self.fusion = Fusion(FEATURES, covariates, num_outputs, fusion)

    def forward(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        return self.fusion(torch.relu(self.encoder(x)), covariates)
