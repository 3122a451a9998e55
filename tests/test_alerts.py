"""deploy/prometheus/alerts.yml: promtool validates it when installed; it is always parsed and checked
against the metric names the server really exports."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lepton.serve.metrics import Metrics

RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "alerts.yml"


def exported_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update({f"{family.name}_total", f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"})
    return names


def test_rules_parse_and_cover_the_required_signals():
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"LeptonHighErrorRate", "LeptonP99LatencyHigh", "LeptonQueueSaturated", "LeptonInputDrift"} <= names
    known = exported_names()
    for rule in rules:
        assert rule["for"] and rule["labels"]["severity"] and rule["annotations"]["summary"]
        used = set(re.findall(r"\blepton_[a-z_]+", rule["expr"]))
        assert used and used <= known, (rule["alert"], used - known)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_checks_rules():
    out = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
