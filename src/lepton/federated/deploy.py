"""Running a federation on Flower's Deployment Engine: a SuperNode per site (``flower-supernode`` with the site's
data in its node config) and ``flwr run`` submitting Lepton's app to the SuperLink with the recipe as run config.
The connection to the SuperLink (address, TLS root certificate or insecure) lives in a private Flower home."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lepton.errors import ConfigError
from lepton.federated import APP_DIR, check_settings

#: Run-config keys `lepton federate run` may set (those of the app's [tool.flwr.app.config]).
RUN_KEYS = ("strategy", "rounds", "local-epochs", "fraction", "min-sites", "model", "lr", "batch-size", "augment",
            "seed", "proximal-mu", "image-size", "timeout", "output-dir", "name", "dp-noise", "dp-clip", "secagg",
            "secagg-shares", "secagg-threshold", "secagg-clip", "track")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if any(c in text for c in '"\\\n'):
        raise ConfigError(f"run-config value {text!r} may not contain quotes, backslashes or newlines")
    return f'"{text}"'


def run_config_arg(values: dict[str, Any]) -> str:
    """``--run-config`` for ``flwr run``: ``key=value`` pairs in TOML syntax."""
    unknown = sorted(set(values) - set(RUN_KEYS))
    if unknown:
        raise ConfigError(f"unknown federation setting(s) {', '.join(unknown)}; known: {', '.join(RUN_KEYS)}")
    values = check_settings(values)
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items() if v is not None)


def flower_home(superlink: str, insecure: bool, root_certificates: Path | None, into: Path) -> Path:
    """A Flower home whose config names one SuperLink connection, ``lepton``."""
    if not insecure and root_certificates is None:
        raise ConfigError("give --root-certificates CA.pem (TLS, as the SuperLink was started with "
                          "--ssl-certfile/--ssl-keyfile) or --insecure (loopback or a trusted network only)")
    lines = ["[superlink]", 'default = "lepton"', "", "[superlink.lepton]", f"address = {_toml_value(superlink)}"]
    ca = None if insecure else _toml_value(Path(root_certificates).resolve())
    lines.append("insecure = true" if insecure else f"root-certificates = {ca}")
    into.mkdir(parents=True, exist_ok=True)
    (into / "config.toml").write_text("\n".join(lines) + "\n")
    return into


def _flower_bin(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        raise ConfigError(f"{name} not found: install Flower with pip install 'lepton[federated]'")
    return found


def run(superlink: str, settings: dict[str, Any], insecure: bool = False, root_certificates: Path | None = None,
        stream: bool = True) -> int:
    """Submit Lepton's Flower app to ``superlink`` with ``settings`` and follow it; ``flwr run``'s exit status.
    ``output-dir`` is made absolute: the ServerApp writes the run directory on the SuperLink's machine."""
    settings = dict(settings)
    if settings.get("output-dir"):
        settings["output-dir"] = str(Path(settings["output-dir"]).resolve())
    with tempfile.TemporaryDirectory(prefix="lepton-flower-") as tmp:
        tmp = Path(tmp)
        home = flower_home(superlink, insecure, root_certificates, tmp / "home")
        app = tmp / "app"
        shutil.copytree(APP_DIR, app)
        cmd = [_flower_bin("flwr"), "run", str(app), "lepton", "--run-config", run_config_arg(settings)]
        if stream:
            cmd.append("--stream")
        env = {**os.environ, "FLWR_HOME": str(home)}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return subprocess.call(cmd, env=env)


def supernode_command(superlink: str, data: str, port: int, insecure: bool = False,
                      root_certificates: Path | None = None) -> list[str]:
    """``flower-supernode`` for one site: the SuperLink to join, the site's data, its own ClientAppIo port."""
    if not insecure and root_certificates is None:
        raise ConfigError("give --root-certificates CA.pem (the SuperLink's TLS) or --insecure")
    if '"' in data:
        raise ConfigError(f"--data {data!r} may not contain double quotes")
    if Path(data).exists():  # the ClientApp runs in a process of its own, elsewhere
        data = str(Path(data).resolve())
    cmd = [_flower_bin("flower-supernode"), "--superlink", superlink, "--node-config", f'data="{data}"',
           "--port", str(port)]
    return cmd + (["--insecure"] if insecure else ["--root-certificates", str(root_certificates)])
