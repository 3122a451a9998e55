"""Model cards: generated Markdown that teams edit (``lepton models card NAME@V --set FILE``)."""

from __future__ import annotations

from typing import Any


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("n/a" if x is None else str(x))


def render_card(v) -> str:
    """A model card for a registered version: intended use, data, metrics with CIs, calibration, limits."""
    cfg, fp, m = v.config, v.data_fingerprint, v.metrics
    lines = [f"# Model card: {v.name} v{v.version}", "",
             "## Intended use",
             f"Classifies {v.preprocessing.get('channels', 1)}-channel medical images into "
             f"{', '.join(v.labels)}. Decision support for trained readers only: not a diagnosis, and not "
             "validated for populations, devices or protocols unlike the training data.", "",
             "## Model",
             f"- Format: {v.format}; architecture: `{cfg.get('model', 'external')}`",
             f"- Input: {v.preprocessing.get('size')} px, {v.preprocessing.get('channels')} channel(s), "
             f"normalised with mean {v.preprocessing.get('mean')} and std {v.preprocessing.get('std')}",
             f"- Decision threshold on P({v.labels[-1]}): {_fmt(v.threshold)}" if v.threshold is not None
             else "- Decision rule: arg-max over classes",
             f"- Source: {v.source_run}; parent version: {_fmt(v.parent_version)}", ""]
    lines += ["## Training data"]
    if fp:
        lines.append(f"- Source `{fp.get('source')}`, {fp.get('images')} images; fingerprint "
                     f"`{str(fp.get('sha256'))[:16]}…`; patient-grouped splits: {fp.get('patient_grouped')}")
        for split, counts in (fp.get("counts") or {}).items():
            lines.append(f"- {split}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    else:
        lines.append("- Not recorded (model registered from an external file).")
    lines += ["", "## Metrics"]
    if m.get("val_auc") is not None:
        lines.append(f"- Validation (model selection): AUC {_fmt(m.get('val_auc'))}, ACC {_fmt(m.get('val_acc'))}")
    for key, rep in m.items():
        if not key.startswith("eval/"):
            continue
        lines.append(f"- {rep['split']} split, {rep['images']} images, ECE {_fmt(rep.get('ece'))}:")
        for rule, r in rep.items():
            if isinstance(r, dict) and "acc" in r:
                ci = r.get("ci95") or {}
                acc_ci = " [{:.4f}, {:.4f}]".format(*ci["acc"]) if ci.get("acc") else ""
                auc_ci = " [{:.4f}, {:.4f}]".format(*ci["auc"]) if ci.get("auc") else ""
                lines.append(f"  - threshold {rule}: ACC {_fmt(r['acc'])}{acc_ci}, AUC {_fmt(r['auc'])}{auc_ci}")
    if len(lines) and lines[-1] == "## Metrics":
        lines.append("- No evaluation recorded: run `lepton evaluate` before registering.")
    lines += ["", "## Limitations",
              "- Performance is measured on held-out data from the same source; expect lower figures under "
              "distribution shift (other scanners, sites, populations, image sizes).",
              "- Calibration (ECE above) may not transfer to a different disease prevalence; re-check the "
              "threshold on local data before clinical use.", ""]
    return "\n".join(lines)
