"""Federated learning on Flower: one model trained across sites whose images never leave them.

``site`` is what a site does (describe, train, evaluate; no Flower types), ``apps`` the Flower ``ClientApp`` and
``ServerApp`` on the Message API, ``rundir`` the federation's record and its run directory, and ``app/`` the Flower
app project that ``flwr run`` submits to a SuperLink (``lepton federate run``).
"""

from __future__ import annotations

from pathlib import Path

#: The Flower app project (pyproject.toml with [tool.flwr.app]) submitted to a SuperLink.
APP_DIR = Path(__file__).resolve().parent / "app"
