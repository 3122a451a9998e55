"""Federated learning on Flower: one model trained across sites whose images never leave them.

``site`` is what a site does (describe, train, evaluate; no Flower types), ``apps`` the Flower ``ClientApp`` and
``ServerApp`` on the Message API, ``rundir`` the federation's record and its run directory, and ``app/`` the Flower
app project that ``flwr run`` submits to a SuperLink (``lepton federate run``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The Flower app project (pyproject.toml with [tool.flwr.app]) submitted to a SuperLink.
APP_DIR = Path(__file__).resolve().parent / "app"

#: Federation settings that are ``TrainConfig`` fields every site trains with (run-config key → field): their
#: defaults, bounds and choices are the field's own (``lepton.config``); ``local-epochs`` is one round's epochs and an
#: ``image-size`` of 0 the sites' native size.
CONFIG_FIELDS: dict[str, str] = {"model": "model", "lr": "lr", "batch-size": "batch_size", "local-epochs": "epochs",
                                 "augment": "augment", "seed": "seed", "image-size": "image_size"}

#: The federation's own numeric settings (run config keys): (low, high, whole number, low end open), inclusive
#: otherwise. Checked, with the CONFIG_FIELDS, where a run config enters: ``lepton federate run``/``simulate``, the
#: ServerApp, every site.
SETTING_BOUNDS: dict[str, tuple[float, float, bool, bool]] = {
    "rounds": (1, 10_000, True, False),
    "fraction": (0, 1, False, True),
    "min-sites": (1, 10_000, True, False),
    "proximal-mu": (0, 1e6, False, False),
    "timeout": (0, 7 * 86_400, False, True),
    "dp-noise": (0, 1e6, False, False),
    "dp-clip": (0, 1e9, False, False),
    "secagg-shares": (0, 10_000, False, True),
    "secagg-threshold": (0, 10_000, False, True),
    "secagg-clip": (0, 1e9, False, True),
}


def check_settings(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every setting that is a config field checked as that field is (``check_field``) and every
    other numeric setting finite and within SETTING_BOUNDS (a whole number sent as 3.0 taken as 3); ConfigError
    naming the setting otherwise. Other keys pass unchanged."""
    from lepton.config import check_field, check_number

    out = dict(values)
    for key, name in CONFIG_FIELDS.items():
        if key in out and not (key == "image-size" and out[key] == 0 and not isinstance(out[key], bool)):
            out[key] = check_field(name, out[key], f"federation setting {key}")
    for key, (low, high, whole, open_low) in SETTING_BOUNDS.items():
        if key in out:
            out[key] = check_number(f"federation setting {key}", out[key], low, high, whole, open_low)
    return out
