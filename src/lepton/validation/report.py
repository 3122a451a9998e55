"""The validation report: a run's evidence laid out by the TRIPOD+AI (2024) and CLAIM (2024) items Lepton can fill —
data sources, splits and leakage checks, performance with CIs, subgroups, calibration, decision curve, external
validation, failure cases with Grad-CAM — in Markdown and self-contained HTML, optionally attached to a registry
version (its card then points to it). Items only people can answer (how labels were established, eligibility,
ethics) are listed as such, not guessed."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lepton.rundir import RunDir

#: Items Lepton cannot fill from a run; the report lists them for the authors.
NOT_FILLED = (
    "Eligibility criteria, study dates and setting of the participants",
    "How the reference standard (the labels) was established, by whom, and its reliability",
    "Sample size rationale",
    "Ethics approval, consent, funding, conflicts of interest, protocol and registration",
    "Handling of missing data beyond images that could not be read",
)


def validation_report(run, data: str | Path | None = None, *, split: str = "test", by: Sequence[str] | None = None,
                      external: str | Path | None = None, prevalence: float | None = None,
                      output: str | Path | None = None, n_bootstrap: int = 1000, failures: int = 4,
                      min_size: int = 30, registry=None, ref: str | None = None) -> dict[str, Any]:
    """Evaluate ``run`` on ``data`` (default: its own ``split``, re-split as in training) with subgroups ``by``, and
    on ``external`` (another site's labelled data) with the shift and calibration checks, then write ``report.md``
    and ``report.html`` to ``output`` (default ``RUN/validation``). With ``registry`` (a
    ``lepton.registry.Registry``) and ``ref`` the report is attached to that version. Returns the paths and the
    summary."""
    from lepton.evaluate import evaluate, select_split
    from lepton.runs import Run, load_run
    from lepton.utils import atomic_write_json, atomic_write_text

    run = run if isinstance(run, Run) else load_run(run)
    out = Path(output) if output is not None else Path(run.path) / "validation"
    out.mkdir(parents=True, exist_ok=True)
    internal = evaluate(run, data, split=split, output=out / "evaluation", n_bootstrap=n_bootstrap, by=by,
                        prevalence=prevalence, min_size=min_size, track=[])
    ext = None
    if external is not None:
        ext = evaluate(run, external, split=split, output=out / "external", n_bootstrap=n_bootstrap,
                       external=True, prevalence=prevalence, min_size=min_size, track=[])
    subset, used = select_split(run, data, split)
    leakage = leakage_checks(run, subset, data)
    cases = failure_cases(run, subset, out / "evaluation" / "predictions.csv", out / "failures", failures) \
        if failures and run.task.prediction_table else []
    calib = None
    if run.task.binary_test(run.label_names):
        from lepton.validation.external import calibration_summary

        y, probs = _read_predictions(out / "evaluation" / "predictions.csv")
        calib = calibration_summary(y, probs[:, 1], n_bootstrap=n_bootstrap)
    lines, highlights = _markdown(run, internal, ext, leakage, cases, calib, out)
    markdown = "\n".join(lines) + "\n"
    html = to_html(markdown, out)
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.html", html)
    summary = {"created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "data": internal["data"],
               "split": used, "images": internal["images"], "external": None if ext is None else ext["data"],
               "subgroups": list(by or []), "highlights": highlights}
    atomic_write_json(out / "summary.json", summary)
    result = {"output": str(out), "markdown": str(out / "report.md"), "html": str(out / "report.html"),
              "summary": summary}
    if registry is not None and ref:
        result["version"] = registry.attach_report(ref, markdown, html, summary).ref
    return result


def _read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    body = rows[1:]
    y = np.array([int(r[1]) for r in body], dtype=np.int64)
    probs = np.array([[float(v) for v in r[2:]] for r in body], dtype=np.float64).reshape(len(body), -1)
    return y, probs


def leakage_checks(run, subset, data) -> dict[str, Any]:
    """Whether any evaluated image also sits in the training split: identical decoded pixels (content hashes) and,
    with patient ids, the same patient pseudonym. Against another source the training split is re-read."""
    from lepton.validation.clinical import training_reference

    train = training_reference(run)
    if train is None:
        return {"checked": False, "note": "the training data are not readable here"}
    train_hashes = set(train.content_hashes())
    eval_hashes = subset.content_hashes()
    same_pixels = sum(h in train_hashes for h in eval_hashes)
    shared_patients = None
    if subset.has_patient_ids and train.has_patient_ids:
        shared_patients = len(set(map(str, subset.groups)) & set(map(str, train.groups)))
    return {"checked": True, "training_images": len(train), "evaluated_images": len(subset),
            "identical_images": int(same_pixels), "shared_patients": shared_patients,
            "patient_grouped": bool(train.has_patient_ids)}


def failure_cases(run, subset, predictions: Path, folder: Path, k: int) -> list[dict[str, Any]]:
    """The ``k`` most confident wrong answers, each with a Grad-CAM overlay of the class the model chose."""
    from lepton.explain import overlay_png, saliency_maps
    from lepton.utils import atomic_write_bytes

    y, probs = _read_predictions(predictions)
    pred = run.task.decide(probs, run.info)
    wrong = np.flatnonzero(pred != y)
    if not len(wrong):
        return []
    order = wrong[np.argsort(-probs[wrong, pred[wrong]])][:k]
    images = [subset.images[i] for i in order]
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    try:
        maps, _ = saliency_maps(run, images)
        shown = run.preprocessing.resize(images).mean(1).numpy()
    except Exception as exc:  # a network without a Grad-CAM layer: the cases without maps
        maps, shown, note = None, None, f"Grad-CAM not available ({type(exc).__name__}: {exc})"
    else:
        note = None
    for j, i in enumerate(order):
        case = {"image": Path(str(subset.names[i])).name, "true": run.label_names[int(y[i])],
                "predicted": run.label_names[int(pred[i])], "confidence": round(float(probs[i, pred[i]]), 4)}
        if maps is not None and maps[j].ndim == 2:
            path = folder / f"failure_{j + 1}.png"
            atomic_write_bytes(path, overlay_png(shown[j], maps[j]))
            case["overlay"] = str(path)
        elif note:
            case["note"] = note
        cases.append(case)
    return cases


def _markdown(run, internal: dict[str, Any], ext: dict[str, Any] | None, leakage: dict[str, Any],
              cases: list[dict[str, Any]], calib: dict[str, Any] | None, out: Path) -> tuple[list[str], dict[str, Any]]:
    from lepton.validation import decision, subgroups
    from lepton.validation import external as external_mod

    cfg, info = run.config, run.info
    fp = RunDir(run.path).read_data(default={})
    spec = run.preprocessing
    highlights: dict[str, Any] = {}
    text = run.task.card_text(run.label_names, spec.channels, info.get("threshold"), {})
    lines = [f"# Validation report: {Path(run.path).name}", "",
             f"Generated by Lepton on {dt.date.today().isoformat()}. Sections follow the TRIPOD+AI (2024) and CLAIM "
             "(2024) checklists by topic. Figures are measured by Lepton from the run and data "
             "named below.", "",
             "## 1. Model and intended use (TRIPOD+AI, CLAIM: title, objectives, intended use)", "", *text["use"], "",
             f"- Task: {run.task.name}; classes: {', '.join(run.label_names)}",
             f"- Architecture: `{cfg.model}`; input {list(spec.size)} px, {spec.channels} channel(s), mean "
             f"{[round(v, 4) for v in spec.mean]}, std {[round(v, 4) for v in spec.std]}; window {spec.window}",
             *text["decision"], ""]
    if info.get("calibration"):
        c = info["calibration"]
        lines += [f"- Recalibrated ({c.get('method')}) on `{c.get('fitted_on')}` ({c.get('n')} images): slope "
                  f"{_n(c.get('slope_before'))} → {_n(c.get('slope_after'))} on the fitting data", ""]
    lines += ["## 2. Data sources (data sources, data preparation)", "",
              f"- Training source: `{cfg.data}` — {fp.get('images', 'n/a')} images; content fingerprint "
              f"`{str(fp.get('sha256', ''))[:16]}…`",
              *[f"- {split}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                for split, counts in (fp.get("counts") or {}).items()],
              f"- Evaluated: `{internal['data']}`, split **{internal['split']}**, {internal['images']} images",
              *([f"- External: `{ext['data']}`, {ext['images']} images"] if ext else []),
              f"- Preprocessing saved with the run and applied identically at prediction and serving: resize to "
              f"{list(spec.size)}, {spec.channels} channel(s), steps {spec.steps or 'none'}", "",
              "## 3. Splits and leakage checks (data partitions)", "",
              f"- Split: val fraction {cfg.val_fraction}, test fraction {cfg.test_fraction}, seed {cfg.seed}; "
              f"grouped by patient: {fp.get('patient_grouped', 'n/a')}"]
    if leakage.get("checked"):
        lines += [f"- Evaluated images with pixels identical to a training image: {leakage['identical_images']} of "
                  f"{leakage['evaluated_images']}",
                  "- Patients in both training and evaluation: "
                  + ("not checkable (no patient ids)" if leakage["shared_patients"] is None
                     else str(leakage["shared_patients"]))]
        highlights["leakage"] = (f"{leakage['identical_images']} identical images, "
                                 f"{leakage['shared_patients'] if leakage['shared_patients'] is not None else 'n/a'}"
                                 " shared patients")
    else:
        lines.append(f"- Leakage not checked: {leakage.get('note')}")
    lines += ["", "## 4. Performance (model performance with confidence intervals)", ""]
    lines += [f"- {s}" for s in internal.get("summary", [])]
    primary = internal.get("metrics", {}).get(internal.get("primary_threshold", ""), {})
    if primary.get("auc") is not None:
        ci = (primary.get("ci95") or {}).get("auc")
        highlights["AUC"] = f"{primary['auc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    if internal.get("mean_dice") is not None:
        highlights["mean Dice"] = f"{internal['mean_dice']:.3f}"
    plots = [Path(p) for p in internal.get("plots", [])]
    lines += ["", *[f"![{p.stem}]({_rel(p, out)})" for p in plots if p.stem in ("roc", "reliability")], ""]
    if internal.get("subgroups"):
        table = internal["subgroups"]
        lines += ["## 5. Subgroups (fairness, performance in key subgroups)", "", *subgroups.markdown(table)]
        lines += [f"![subgroups]({_rel(p, out)})" for p in plots if p.stem == "subgroups"] + [""]
        gaps = []
        for column, entry in table["columns"].items():
            gap = entry["largest_gap"].get(table["metrics"][0])
            if gap:
                gaps.append(f"{column}: {gap['group']} {gap['gap']:+.3f}" + (" (clear)" if gap["clear"] else ""))
        small = sum(g["too_small"] for e in table["columns"].values() for g in e["groups"])
        highlights["largest subgroup gaps"] = "; ".join(gaps) or "none judged"
        highlights["subgroups too small to judge"] = small
    lines += ["## 6. Calibration", ""]
    if internal.get("ece") is not None:
        lines.append(f"- Expected calibration error (15 bins, top-class confidence): {internal['ece']:.4f}")
    if calib is not None:
        lines.append(external_mod.calibration_line(calib, "the evaluated split"))
        highlights["calibration slope"] = _n(calib.get("slope"))
    lines.append("")
    if internal.get("decision"):
        d = internal["decision"]
        lines += ["## 7. Clinical utility: decision curve", "",
                  *decision.markdown(d, d["operating_points"]),
                  *[f"![decision curve]({_rel(p, out)})" for p in plots if p.stem == "decision_curve"], ""]
        highlights["net benefit range"] = d["useful_range"]
    if ext is not None:
        lines += ["## 8. External validation", "",
                  f"- {ext['data']}: " + "; ".join(ext.get("summary", [])), ""]
        lines += external_mod.markdown(ext["external"], ext["external"].get("calibration"))
        lines += [f"![{Path(p).stem}]({_rel(Path(p), out)})" for p in ext.get("plots", [])
                  if Path(p).stem in ("calibration_external", "roc")] + [""]
        highlights["external shift flagged"] = ext["external"]["shift_flagged"]
        dc = ext["external"]["domain_classifier"]
        if dc.get("auc") is not None:
            highlights["domain classifier AUC"] = f"{dc['auc']:.3f}"
    lines += ["## 9. Failure cases (failure analysis)", ""]
    if cases:
        lines += ["The most confident wrong answers on the evaluated split, with Grad-CAM of the class the model "
                  "chose (where it looked, not why).", "", "| image | true | predicted | confidence |",
                  "|---|---|---|---|"]
        lines += [f"| {c['image']} | {c['true']} | {c['predicted']} | {c['confidence']:.3f} |" for c in cases]
        lines += [""] + [f"![{c['image']}]({_rel(Path(c['overlay']), out)})" for c in cases if c.get("overlay")]
        lines += [f"- {c['note']}" for c in cases[:1] if c.get("note")]
    else:
        lines.append("- No wrong answer on the evaluated split (or not a classification task).")
    lines += ["", "## 10. Limitations", "",
              "- Figures hold for the data named above; populations, devices or protocols unlike them need their own "
              "validation."]
    if internal.get("subgroups"):
        lines.append(f"- {highlights['subgroups too small to judge']} subgroup(s) too small to judge (flagged ⚠).")
    if ext is not None and ext["external"]["shift_flagged"]:
        lines.append("- The external data differ measurably from the training data (domain classifier).")
    lines += ["", "## Items for the authors (not filled by Lepton)", "", *[f"- {item}" for item in NOT_FILLED], ""]
    return lines, highlights


def _rel(path: Path, out: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def _n(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def to_html(markdown: str, folder: Path) -> str:
    """The report as one self-contained HTML page: CommonMark with raw HTML off, tables on, figures embedded as
    PNG data URIs."""
    from markdown_it import MarkdownIt

    def embed(match: re.Match) -> str:
        path = folder / match.group(2)
        if path.suffix.lower() == ".png" and path.is_file():
            return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"
        return match.group(0)

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(
        re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", embed, markdown))
    style = ("body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#111}"
             "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .5rem;"
             "font-size:.9rem}img{max-width:32rem;display:block;margin:.5rem 0}")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Validation report</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")
