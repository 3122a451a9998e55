"""External validation: how a second site's data differ from the training data, and how the model's probabilities
hold there.

The comparison reads simple statistics of every image as read (intensity percentiles, contrast, edges, size), the
DICOM spacing and manufacturer where the files carry them, and the run's training fingerprint (``data.json``). A
domain classifier — a logistic regression on those statistics, scored by cross-validation — says how well the two
sets can be told apart (AUC 0.5: not at all); its CI is a bootstrap over images. Calibration on the external labels
is summarised by calibration-in-the-large and the calibration slope (``lepton.tasks.calibration``), with CIs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lepton.tasks.calibration import calibration_fit, citl_fits, logistic_fits, logit
from lepton.validation.subgroups import rank_auc

#: The shift is flagged when the domain classifier's AUC CI lies wholly above this.
SHIFT_AUC = 0.6
FEATURES = ("mean", "std", "p01", "p50", "p99", "dark", "bright", "edges", "height", "width")
MAX_PER_SET = 2000


def image_features(images: Sequence[np.ndarray]) -> np.ndarray:
    """Per image: mean, std, 1st/50th/99th intensity percentiles, fractions near black and white, mean gradient
    magnitude (sharpness, noise), height and width — (N, 10)."""
    rows = []
    for im in images:
        a = np.asarray(im, dtype=np.float32)
        gray = a.mean(0) if a.ndim >= 3 else a
        plane = gray[gray.shape[0] // 2] if gray.ndim == 3 else gray  # a volume: its middle slice for edges
        flat = gray.ravel()
        p01, p50, p99 = np.percentile(flat, [1, 50, 99])
        gy, gx = np.gradient(plane) if min(plane.shape) > 1 else (np.zeros(1), np.zeros(1))
        rows.append([flat.mean(), flat.std(), p01, p50, p99, (flat < 0.02).mean(), (flat > 0.98).mean(),
                     float(np.hypot(gx, gy).mean()), plane.shape[-2], plane.shape[-1]])
    return np.asarray(rows, dtype=np.float64)


def domain_auc(ref: np.ndarray, ext: np.ndarray, *, n_bootstrap: int = 500, seed: int = 0,
               folds: int = 5) -> dict[str, Any]:
    """Cross-validated AUC of a logistic regression telling external rows from reference rows, with a bootstrap CI
    over rows; each set at most ``MAX_PER_SET`` rows (a random sample)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    ref = ref[rng.permutation(len(ref))[:MAX_PER_SET]]
    ext = ext[rng.permutation(len(ext))[:MAX_PER_SET]]
    x = np.concatenate([ref, ext])
    y = np.r_[np.zeros(len(ref)), np.ones(len(ext))].astype(np.int64)
    keep = x.std(0) > 0  # constant features (every image the same size) carry nothing
    if min(len(ref), len(ext)) < folds or not keep.any():
        return {"auc": None, "ci95": None, "reference": len(ref), "external": len(ext), "flagged": False,
                "note": "too few images or no varying feature to compare"}
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, x[:, keep], y, cv=cv, method="predict_proba")[:, 1]
    auc = float(rank_auc(y, scores)[0])
    idx = rng.integers(0, len(y), size=(max(n_bootstrap, 1), len(y)))
    boot = rank_auc(y[idx], scores[idx])
    boot = boot[np.isfinite(boot)]
    ci = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if n_bootstrap and len(boot) else None
    coef = model.fit(x[:, keep], y)[-1].coef_[0]
    names = [f for f, k in zip(FEATURES, keep, strict=True) if k]
    top = sorted(zip(names, coef, strict=True), key=lambda t: -abs(t[1]))[:3]
    return {"auc": auc, "ci95": ci, "reference": len(ref), "external": len(ext),
            "flagged": bool(ci is not None and ci[0] > SHIFT_AUC),
            "strongest": [{"feature": f, "weight": round(float(w), 3)} for f, w in top]}


def _ks(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    from scipy.stats import ks_2samp

    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return {"reference": _summary(a), "external": _summary(b), "ks": None, "p": None}
    test = ks_2samp(a, b)
    return {"reference": _summary(a), "external": _summary(b), "ks": round(float(test.statistic), 4),
            "p": float(test.pvalue)}


def _summary(v: np.ndarray) -> dict[str, Any] | None:
    if len(v) == 0:
        return None
    q = np.percentile(v, [5, 50, 95])
    return {"n": len(v), "mean": round(float(v.mean()), 4), "p05": round(float(q[0]), 4),
            "median": round(float(q[1]), 4), "p95": round(float(q[2]), 4)}


def _categorical(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    levels = sorted(set(a.tolist()) | set(b.tolist()))
    pa = {k: float((a == k).mean()) for k in levels} if len(a) else {}
    pb = {k: float((b == k).mean()) for k in levels} if len(b) else {}
    tv = 0.5 * sum(abs(pa.get(k, 0) - pb.get(k, 0)) for k in levels) if pa and pb else None
    return {"reference": pa, "external": pb, "total_variation": None if tv is None else round(tv, 4)}


def compare_sets(ref_images, ext_images, *, ref_columns: dict[str, np.ndarray] | None = None,
                 ext_columns: dict[str, np.ndarray] | None = None, fingerprint: dict[str, Any] | None = None,
                 ext_intensity: float | None = None, n_bootstrap: int = 500, seed: int = 0) -> dict[str, Any]:
    """The external set against the reference (training) set: per-feature distributions with a two-sample KS test,
    spacing and manufacturer where known, the external preprocessed mean intensity against the training
    fingerprint's (in SDs of the training images' means), and the domain classifier."""
    out: dict[str, Any] = {}
    fa = image_features(ref_images) if ref_images is not None and len(ref_images) else None
    fb = image_features(ext_images)
    if fa is not None:
        out["features"] = {name: _ks(fa[:, i], fb[:, i]) for i, name in enumerate(FEATURES)}
        out["domain_classifier"] = domain_auc(fa, fb, n_bootstrap=n_bootstrap, seed=seed)
    else:
        out["features"] = {name: {"external": _summary(fb[:, i])} for i, name in enumerate(FEATURES)}
        out["domain_classifier"] = {"auc": None, "ci95": None, "flagged": False,
                                    "note": "the training data are not readable here; only the fingerprint compared"}
    ref_columns, ext_columns = ref_columns or {}, ext_columns or {}
    for key in ("pixel_spacing", "slice_thickness"):
        if key in ext_columns or key in ref_columns:
            a = _floats(ref_columns.get(key, np.array([], dtype=object)))
            b = _floats(ext_columns.get(key, np.array([], dtype=object)))
            out.setdefault("acquisition", {})[key] = _ks(a, b)
    for key in ("manufacturer", "model", "view"):
        if key in ext_columns or key in ref_columns:
            out.setdefault("acquisition", {})[key] = _categorical(
                ref_columns.get(key, np.array([], dtype=object)), ext_columns.get(key, np.array([], dtype=object)))
    intensity = (fingerprint or {}).get("intensity") or {}
    if ext_intensity is not None and intensity.get("mean") is not None:
        sd = intensity.get("std_of_image_means") or None
        out["fingerprint"] = {"training_mean": intensity["mean"], "external_mean": round(float(ext_intensity), 6),
                              "difference_in_sd": round((ext_intensity - intensity["mean"]) / sd, 3) if sd else None,
                              "training_sha256": (fingerprint or {}).get("sha256")}
    ks_big = [k for k, v in out["features"].items() if v.get("ks") is not None and v["ks"] > 0.2 and v["p"] < 0.01]
    out["shift_flagged"] = bool(out["domain_classifier"].get("flagged")) or (
        fa is None and abs((out.get("fingerprint") or {}).get("difference_in_sd") or 0) > 2)
    out["shifted_features"] = ks_big
    return out


def _floats(values: np.ndarray) -> np.ndarray:
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
    return np.asarray(out, dtype=np.float64)


def calibration_summary(y: np.ndarray, p: np.ndarray, *, n_bootstrap: int = 500, seed: int = 0) -> dict[str, Any]:
    """Calibration-in-the-large and slope on labelled data, with bootstrap 95 % CIs; ``flagged`` when a CI excludes
    its ideal (0 for the intercept, 1 for the slope)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    fit = calibration_fit(y, p)
    out: dict[str, Any] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fit.items()}
    out["n"], out["events"] = len(y), int(y.sum())
    out["citl_ci95"] = out["slope_ci95"] = None
    if n_bootstrap and fit["slope"] == fit["slope"]:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(y), size=(n_bootstrap, len(y)))
        yy, zz = y[idx], logit(p)[idx]
        ok = (yy.sum(1) > 0) & (yy.sum(1) < len(y))
        _, slopes = logistic_fits(yy[ok], zz[ok])
        citl = citl_fits(yy[ok], zz[ok])
        out["slope_ci95"] = [float(np.percentile(slopes, 2.5)), float(np.percentile(slopes, 97.5))]
        out["citl_ci95"] = [float(np.percentile(citl, 2.5)), float(np.percentile(citl, 97.5))]
    s, c = out["slope_ci95"], out["citl_ci95"]
    out["flagged"] = bool((s and not s[0] <= 1 <= s[1]) or (c and not c[0] <= 0 <= c[1]))
    return out


def markdown(ext: dict[str, Any], calib: dict[str, Any] | None) -> list[str]:
    """The external-validation section as Markdown lines."""
    dc = ext["domain_classifier"]
    lines = []
    if dc.get("auc") is not None:
        ci = dc.get("ci95")
        lines.append(f"- Domain classifier (logistic regression on image statistics, {dc['reference']} training vs "
                     f"{dc['external']} external images, 5-fold CV): AUC {dc['auc']:.3f}"
                     + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
                     + (f" — **shift flagged** (CI above {SHIFT_AUC})" if dc["flagged"] else " — no clear shift")
                     + (f"; strongest: {', '.join(s['feature'] for s in dc.get('strongest', []))}"
                        if dc.get("strongest") else ""))
    else:
        lines.append(f"- Domain classifier: not computed ({dc.get('note')})")
    fp = ext.get("fingerprint")
    if fp:
        lines.append(f"- Mean preprocessed intensity: training {fp['training_mean']:.4f}, external "
                     f"{fp['external_mean']:.4f} ({fp['difference_in_sd']} SD of the training images' means)")
    if ext.get("shifted_features"):
        lines.append("- Features whose distributions differ (KS > 0.2, p < 0.01): "
                     + ", ".join(ext["shifted_features"]))
    lines += ["", "| feature | training median [5 %, 95 %] | external median [5 %, 95 %] | KS | p |",
              "|---|---|---|---|---|"]
    for name, f in ext["features"].items():
        lines.append(f"| {name} | {_dist(f.get('reference'))} | {_dist(f.get('external'))} | "
                     f"{'' if f.get('ks') is None else f['ks']} | "
                     f"{'' if f.get('p') is None else format(f['p'], '.2g')} |")
    for key, value in (ext.get("acquisition") or {}).items():
        if "total_variation" in value:
            lines.append(f"- {key}: training {_shares(value['reference'])}; external {_shares(value['external'])}"
                         f" (total variation {value['total_variation']})")
        else:
            lines.append(f"- {key}: training {_dist(value.get('reference'))}; external {_dist(value.get('external'))}")
    lines.append("")
    if calib:
        lines += [calibration_line(calib, "the external labels"), ""]
    return lines


def calibration_line(calib: dict[str, Any], where: str) -> str:
    """Calibration-in-the-large and slope with their CIs as one Markdown item."""
    s, c = calib.get("slope_ci95"), calib.get("citl_ci95")
    return (f"- Calibration on {where} ({calib['n']} images, {calib['events']} positive): "
            f"calibration-in-the-large {_n(calib.get('citl'))}" + (f" [{c[0]:.3f}, {c[1]:.3f}]" if c else "")
            + f", slope {_n(calib.get('slope'))}" + (f" [{s[0]:.3f}, {s[1]:.3f}]" if s else "")
            + f", observed/expected {_n(calib.get('observed_expected'))}"
            + (" — **recalibrate locally** (`lepton calibrate`)" if calib["flagged"] else ""))


def _dist(s: dict[str, Any] | None) -> str:
    return "n/a" if not s else f"{s['median']:.4g} [{s['p05']:.4g}, {s['p95']:.4g}]"


def _shares(p: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in p.items()) or "n/a"


def _n(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
