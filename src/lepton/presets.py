"""Named training recipes: a preset sets ``TrainConfig`` defaults; explicit arguments override them
(``lepton.config.make_config``)."""

from __future__ import annotations

from typing import Any

# Named recipes. A preset sets defaults; explicit arguments override them.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Small synthetic demo: fast on 2 CPU cores.
    "demo": {
        "model": "lepton_cnn",
        "epochs": 8,
        "batch_size": 64,
        "lr": 1e-3,
        "augment": "light",
        "imbalance": "weighted",
    },
    # MedMNIST-format data (28-px gray or RGB): the default for .npz and medmnist: sources. Tuned on
    # PneumoniaMNIST train/val only, to train within 10 minutes on 2 CPU cores (see benchmarks/).
    "medmnist": {
        "model": "lepton_cnn",
        "epochs": 40,
        "batch_size": 128,
        "lr": 2e-3,
        "weight_decay": 5e-4,
        "warmup_epochs": 1.0,
        "augment": "xray",
        "label_smoothing": 0.05,
        "normalize": "half",
        "ema_decay": 0.995,
        "tta": True,
        "imbalance": "weighted",
        # The 10-minute budget of `lepton train`, less start-up, data loading and the final evaluation
        # (about 10 s on PneumoniaMNIST) and a margin.
        "time_budget_s": 580.0,
        # Small sets finish the 40 epochs in a fraction of the budget (546 images: ~20 s), and longer schedules
        # only overfit them (benchmarks/preset_adapt.py): the spare budget trains up to 4 more members from other
        # seeds, kept as an ensemble unless it scores below a typical member on val.
        "ensemble": 5,
    },
    # MedMNIST-3D volumes (28^3 grey, e.g. AdrenalMNIST3D, VesselMNIST3D): the default for .npz files holding
    # volumes. The 3-D lepton_cnn on whole volumes with flips, small rotations and shifts; chosen on the shared
    # AdrenalMNIST3D train/val split only, to train within 10 minutes on 2 CPU cores (benchmarks/volumes.py).
    "medmnist3d": {
        "model": "lepton_cnn",
        "epochs": 40,
        "batch_size": 64,
        "lr": 2e-3,
        "weight_decay": 5e-4,
        "warmup_epochs": 1.0,
        "augment": "light",
        "label_smoothing": 0.05,
        "normalize": "half",
        "ema_decay": 0.99,
        "tta": True,
        "imbalance": "weighted",
        # 3-D evaluation and start-up take longer than 2-D: a wider margin under the 10 minutes.
        "time_budget_s": 540.0,
    },
    # Segmentation (2-D or 3-D): MONAI's residual U-Net with Dice + cross-entropy on whole cases (padded to the
    # largest), flips, small rotations and intensity changes, EMA and flip TTA; chosen on the shared hippocampus
    # train cases only (a seeded case split), to train within 15 minutes on 2 CPU cores
    # (benchmarks/segmentation.py).
    "segmentation": {
        "task": "segmentation",
        "model": "unet",
        "epochs": 200,
        "batch_size": 8,
        "lr": 3e-3,
        "weight_decay": 1e-4,
        "warmup_epochs": 2.0,
        "augment": "light",
        "normalize": "dataset",
        "ema_decay": 0.99,
        "tta": True,
        "imbalance": "weighted",
        # 15 minutes less start-up, loading and the final evaluation
        "time_budget_s": 840.0,
    },
    # Detection (2-D or 3-D boxes): MONAI's RetinaNet on a small ResNet + FPN with anchors fitted to the training
    # boxes, box-aware flips, scaling and intensity changes, flip TTA merged by weighted box fusion; model selection on
    # val mAP (benchmarks/detection.py).
    "detection": {
        "task": "detection",
        "model": "retinanet",
        "epochs": 60,
        "batch_size": 8,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "warmup_epochs": 2.0,
        "augment": "light",
        "augment_options": {"rotate": 0.0, "vflip": 0.5},
        "normalize": "dataset",
        "tta": True,
        "time_budget_s": 840.0,
    },
}

