"""Robustness: accuracy and AUC under image corruptions at five severities and under FGSM/PGD attacks.

The corruption families follow those MedMNIST-C applies to X-ray data (noise, blur, pixelation,
JPEG, exposure); severities are scaled so level 1 is barely visible and level 5 is strong.
Every corruption and attack works on images in [0, 1], before the run's normalisation.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lepton.errors import ConfigError

Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


def _gaussian_noise(x, s, g):
    return x + torch.randn(x.shape, generator=g) * [0.02, 0.04, 0.06, 0.09, 0.12][s - 1]


def _speckle_noise(x, s, g):
    return x + x * torch.randn(x.shape, generator=g) * [0.06, 0.10, 0.15, 0.20, 0.30][s - 1]


def _impulse_noise(x, s, g):
    amount = [0.01, 0.02, 0.04, 0.06, 0.09][s - 1]
    u = torch.rand(x.shape, generator=g)
    return torch.where(u < amount / 2, 0.0, torch.where(u > 1 - amount / 2, 1.0, x))


def _gaussian_blur(x, s, g):
    sigma = [0.4, 0.6, 0.8, 1.0, 1.3][s - 1] * x.shape[-1] / 28
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                    groups=c)


def _pixelate(x, s, g):
    h, w = x.shape[-2:]
    f = [0.85, 0.7, 0.55, 0.45, 0.35][s - 1]
    small = F.interpolate(x, size=(max(1, int(h * f)), max(1, int(w * f))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def _jpeg(x, s, g):
    from PIL import Image

    quality = [75, 50, 30, 18, 10][s - 1]
    out = torch.empty_like(x)
    for i, img in enumerate((x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()):
        mode_img = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
        buf = io.BytesIO()
        mode_img.save(buf, format="JPEG", quality=quality)
        arr = np.asarray(Image.open(buf), dtype=np.float32) / 255
        out[i] = torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    return out


def _brightness(x, s, g):
    return x + [0.05, 0.10, 0.15, 0.22, 0.30][s - 1]


def _contrast(x, s, g):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * [0.75, 0.6, 0.45, 0.3, 0.2][s - 1] + mean


def _gamma(x, s, g):
    return x.clamp(1e-6, 1) ** [1.25, 1.5, 1.8, 2.2, 2.7][s - 1]


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": _gaussian_noise, "speckle_noise": _speckle_noise, "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur, "pixelate": _pixelate, "jpeg": _jpeg, "brightness": _brightness,
    "contrast": _contrast, "gamma": _gamma,
}


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1–5) to a batch in [0, 1]."""
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ConfigError(f"severity must be 1-5 (got {severity})")
    return CORRUPTIONS[name](x, severity, torch.Generator().manual_seed(seed)).clamp(0, 1)


def attack(model, normalize, x: torch.Tensor, y: torch.Tensor, eps: float, method: str = "pgd",
           steps: int = 10, seed: int = 0) -> torch.Tensor:
    """FGSM or PGD (L∞, random start, step eps/4) adversarial images in [0, 1] for labels ``y``."""
    if method not in ("fgsm", "pgd"):
        raise ConfigError(f"unknown attack {method!r}; use fgsm or pgd")
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    x0 = x.detach()
    if method == "fgsm":
        x_adv, steps, step = x0.clone(), 1, eps
    else:
        x_adv = (x0 + (torch.rand(x0.shape, generator=g).to(x0.device) * 2 - 1) * eps).clamp(0, 1)
        step = eps / 4
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(normalize(x_adv).contiguous(memory_format=torch.channels_last)), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = (x_adv.detach() + step * grad.sign()).clamp(x0 - eps, x0 + eps).clamp(0, 1)
    model.train(was_training)
    return x_adv.detach()


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
) -> dict[str, Any]:
    """Measure a run under corruptions and attacks; write ``robustness.json``, ``.md`` and ``.png``."""
    from lepton.evaluate import auc_score, select_split
    from lepton.runs import Run, load_run, predict_proba
    from lepton.utils import atomic_write_json, atomic_write_text

    run = run if isinstance(run, Run) else load_run(run)
    subset, used = select_split(run, data, split)
    spec = run.preprocessing
    x = spec.resize(subset.images)
    y = torch.from_numpy(subset.labels)
    if max_images is not None and len(y) > max_images:
        pick = torch.from_numpy(np.random.default_rng(0).permutation(len(y))[:max_images])
        x, y = x[pick], y[pick]
    model = run.model.float().eval()

    def score(images: torch.Tensor) -> dict[str, float]:
        probs = predict_proba(model, spec.normalize(images), tta=run.config.tta, device=run.device)
        return {"acc": float((run.decide(probs) == y.numpy()).mean()), "auc": auc_score(y.numpy(), probs)}

    names = corruptions or tuple(CORRUPTIONS)
    report: dict[str, Any] = {"run": str(run.path), "split": used, "images": len(y), "clean": score(x),
                              "corruptions": {}, "adversarial": {}}
    for name in names:
        report["corruptions"][name] = [{"severity": s, **score(corrupt(x, name, s, seed=s))} for s in severities]
    for method in attacks:
        rows = []
        for eps in epsilons:
            adv = torch.cat([attack(model, spec.normalize, x[i:i + 128], y[i:i + 128], eps, method, pgd_steps)
                             for i in range(0, len(y), 128)])
            rows.append({"epsilon": eps, "epsilon_255": round(eps * 255, 3), **score(adv)})
        report["adversarial"][method] = rows
    report["mean_corruption"] = [
        {"severity": s, "acc": float(np.mean([report["corruptions"][n][i]["acc"] for n in names])),
         "auc": float(np.mean([report["corruptions"][n][i]["auc"] for n in names]))}
        for i, s in enumerate(severities)]
    out = Path(output) if output else run.path / "robustness" / used
    out.mkdir(parents=True, exist_ok=True)
    _plot(report, out / "robustness.png")
    atomic_write_json(out / "robustness.json", report)
    atomic_write_text(out / "robustness.md", render_markdown(report))
    report["output"] = str(out)
    return report


def render_markdown(report: dict[str, Any]) -> str:
    sev = [r["severity"] for r in next(iter(report["corruptions"].values()), [])]
    lines = [f"# Robustness: {Path(report['run']).name}", "",
             f"{report['split']} split, {report['images']} images. Clean: ACC {report['clean']['acc']:.4f}, "
             f"AUC {report['clean']['auc']:.4f}.", "", "## Corruptions (ACC / AUC by severity)", "",
             "| corruption | " + " | ".join(f"s{s}" for s in sev) + " |", "|---|" + "---|" * len(sev)]
    for name, rows in report["corruptions"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['acc']:.3f} / {r['auc']:.3f}" for r in rows) + " |")
    lines.append("| **mean** | " + " | ".join(f"{r['acc']:.3f} / {r['auc']:.3f}" for r in report["mean_corruption"])
                 + " |")
    lines += ["", "## Adversarial (L∞, pixel scale 0–255)", "", "| attack | ε | ACC | AUC |", "|---|---|---|---|"]
    for method, rows in report["adversarial"].items():
        lines += [f"| {method} | {r['epsilon_255']:g}/255 | {r['acc']:.3f} | {r['auc']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    from lepton.plots import _figure, _save

    plt, fig, (ax1, ax2) = _figure(1, 2, (11, 4))
    for name, rows in report["corruptions"].items():
        ax1.plot([r["severity"] for r in rows], [r["acc"] for r in rows], "o-", label=name)
    ax1.axhline(report["clean"]["acc"], color="k", ls="--", lw=0.8, label="clean")
    ax1.set_xlabel("severity")
    ax1.set_ylabel("accuracy")
    ax1.legend(fontsize=7)
    for method, rows in report["adversarial"].items():
        ax2.plot([r["epsilon_255"] for r in rows], [r["acc"] for r in rows], "o-", label=f"{method} ACC")
        ax2.plot([r["epsilon_255"] for r in rows], [r["auc"] for r in rows], "s--", label=f"{method} AUC")
    ax2.set_xlabel("ε (pixel scale 0–255)")
    ax2.legend(fontsize=7)
    _save(plt, fig, path)
