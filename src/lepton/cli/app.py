"""The ``lepton`` command line: thin verbs over the library API. Each verb group is a module of this package that
registers its commands on the root app (``lepton.cli.common.app``); importing them here, in the order ``--help``
lists them, assembles the command line."""

from __future__ import annotations

import sys

# The order of these imports is the order of --help: verbs (serve … dicom-node), then groups (data … runs).
from lepton.cli import data, models, access, serve, train, distill  # noqa: F401  # isort: skip
from lepton.cli import pretrain, label, predict, validate, demo, federate, dicom, slides, runs  # noqa: F401  # isort: skip
from lepton.cli.common import _state, app, err
from lepton.errors import LeptonError

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point: LeptonError → message and exit code 2, no traceback."""
    try:
        app()
    except LeptonError as exc:
        if _state["debug"] or "--debug" in sys.argv:
            raise
        err.print(f"[red]error[/]: {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
