"""Robustness: the task's headline scores (ACC and AUC for classification) under image corruptions at five
severities and under FGSM/PGD attacks.

The corruption families follow those MedMNIST-C applies to X-ray data (noise, blur, pixelation,
JPEG, exposure); severities are scaled so level 1 is barely visible and level 5 is strong.
Every corruption and attack works on images in [0, 1], before the run's normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lepton.data.transforms.corruptions import CORRUPTIONS, corrupt
from lepton.models.adversarial import attack

__all__ = ["CORRUPTIONS", "attack", "corrupt", "render_markdown", "robustness"]


def robustness(
    run,
    data: str | Path | None = None,
    *,
    split: str = "val",
    corruptions: tuple[str, ...] | None = None,
    severities: tuple[int, ...] = (1, 2, 3, 4, 5),
    epsilons: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255),
    attacks: tuple[str, ...] = ("fgsm", "pgd"),
    pgd_steps: int = 10,
    max_images: int | None = None,
    output: str | Path | None = None,
    track: str | list[str] | None = None,
) -> dict[str, Any]:
    """Measure a run under corruptions and attacks; write ``robustness.json``, ``.md`` and ``.png``. The figures
    (along severity and ε) and the files go to the trackers ``track`` names, by default to the run's own."""
    from lepton.evaluate import select_split
    from lepton.runs import Run, load_run, predict_outputs
    from lepton.utils import atomic_write_json, atomic_write_text

    run = run if isinstance(run, Run) else load_run(run)
    subset, used = select_split(run, data, split)
    spec = run.preprocessing
    task = run.task
    x, y = task.tensors(subset, spec)
    if max_images is not None and len(y) > max_images:
        pick = torch.from_numpy(np.random.default_rng(0).permutation(len(y))[:max_images])
        x, y = x[pick], y[pick]
    model = run.model.float().eval()

    def score(images: torch.Tensor) -> dict[str, float]:
        outputs = predict_outputs(model, spec.normalize(images), task.activate, tta=run.config.tta, device=run.device)
        return task.scores(y.numpy(), outputs, run.info)

    names = corruptions or tuple(CORRUPTIONS)
    report: dict[str, Any] = {"run": str(run.path), "split": used, "images": len(y), "clean": score(x),
                              "corruptions": {}, "adversarial": {}}
    for name in names:
        report["corruptions"][name] = [{"severity": s, **score(corrupt(x, name, s, seed=s))} for s in severities]
    for method in attacks:
        rows = []
        for eps in epsilons:
            adv = torch.cat([attack(model, spec.normalize, x[i:i + 128], y[i:i + 128], eps, method, pgd_steps,
                                    loss_fn=task.loss) for i in range(0, len(y), 128)])
            rows.append({"epsilon": eps, "epsilon_255": round(eps * 255, 3), **score(adv)})
        report["adversarial"][method] = rows
    keys = list(report["clean"])
    report["mean_corruption"] = [
        {"severity": s, **{k: float(np.mean([report["corruptions"][n][i][k] for n in names])) for k in keys}}
        for i, s in enumerate(severities)]
    out = Path(output) if output else run.path / "robustness" / used
    out.mkdir(parents=True, exist_ok=True)
    _plot(report, out / "robustness.png")
    atomic_write_json(out / "robustness.json", report)
    atomic_write_text(out / "robustness.md", render_markdown(report))
    report["output"] = str(out)
    from lepton.tracking.factory import log_report

    series = {f"{name}/{k}": [(r["severity"], r[k]) for r in rows] for name, rows in
              [*report["corruptions"].items(), ("mean_corruption", report["mean_corruption"])] for k in keys}
    series.update({f"{method}/{k}": [(round(r["epsilon_255"]), r[k]) for r in rows]
                   for method, rows in report["adversarial"].items() for k in keys})
    log_report(run.path, track, kind="robustness", folder=f"robustness/{out.name}", series=series,
               metrics={f"clean/{k}": v for k, v in report["clean"].items()}, text=render_markdown(report),
               files=[out / "robustness.json", out / "robustness.md", out / "robustness.png"])
    return report


def render_markdown(report: dict[str, Any]) -> str:
    keys = list(report["clean"])
    names = " / ".join(k.upper() for k in keys)

    def cell(r: dict[str, Any]) -> str:
        return " / ".join(f"{r[k]:.3f}" for k in keys)

    sev = [r["severity"] for r in next(iter(report["corruptions"].values()), [])]
    clean = ", ".join(f"{k.upper()} {report['clean'][k]:.4f}" for k in keys)
    lines = [f"# Robustness: {Path(report['run']).name}", "",
             f"{report['split']} split, {report['images']} images. Clean: {clean}.", "",
             f"## Corruptions ({names} by severity)", "",
             "| corruption | " + " | ".join(f"s{s}" for s in sev) + " |", "|---|" + "---|" * len(sev)]
    for name, rows in report["corruptions"].items():
        lines.append(f"| {name} | " + " | ".join(cell(r) for r in rows) + " |")
    lines.append("| **mean** | " + " | ".join(cell(r) for r in report["mean_corruption"]) + " |")
    lines += ["", "## Adversarial (L∞, pixel scale 0–255)", "",
              "| attack | ε | " + " | ".join(k.upper() for k in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for method, rows in report["adversarial"].items():
        lines += [f"| {method} | {r['epsilon_255']:g}/255 | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |"
                  for r in rows]
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    from lepton.plots import _figure, _save

    keys = list(report["clean"])
    first = keys[0]
    plt, fig, (ax1, ax2) = _figure(1, 2, (11, 4))
    for name, rows in report["corruptions"].items():
        ax1.plot([r["severity"] for r in rows], [r[first] for r in rows], "o-", label=name)
    ax1.axhline(report["clean"][first], color="k", ls="--", lw=0.8, label="clean")
    ax1.set_xlabel("severity")
    ax1.set_ylabel(first.upper())
    ax1.legend(fontsize=7)
    for method, rows in report["adversarial"].items():
        for key, style in zip(keys, ("o-", "s--", "^:"), strict=False):
            ax2.plot([r["epsilon_255"] for r in rows], [r[key] for r in rows], style, label=f"{method} {key.upper()}")
    ax2.set_xlabel("ε (pixel scale 0–255)")
    ax2.legend(fontsize=7)
    _save(plt, fig, path)
