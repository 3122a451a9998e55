"""Model cards: generated Markdown that teams edit (``lepton models card NAME@V --set FILE``)."""

from __future__ import annotations

from typing import Any

from lepton.tasks import get_task


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("n/a" if x is None else str(x))


def render_card(v) -> str:
    """A model card for a registered version: intended use, data, metrics with CIs, calibration, limits."""
    if v.format == "slide-mil":  # a whole-slide MIL model (lepton.registry.slides) is described by its own card
        from lepton.registry.slides import slide_card

        return slide_card(v)
    if v.format == "backbone":  # a pretrained backbone (lepton.registry.backbones): starting weights, no answers
        from lepton.registry.backbones import backbone_card

        return backbone_card(v)
    cfg, fp, m = v.config, v.data_fingerprint, v.metrics
    link, cost, teacher = m.get("mlflow_run"), m.get("cost"), m.get("teacher")
    m = {k: val for k, val in m.items() if k not in ("mlflow_run", "cost", "teacher")}
    task = get_task(cfg.get("task"), cfg.get("task_options"))
    text = task.card_text(v.labels, v.preprocessing.get("channels", 1), v.threshold, m)
    lines = [f"# Model card: {v.name} v{v.version}", "", "## Intended use", *text["use"], "",
             "## Model",
             f"- Format: {v.format}; architecture: `{cfg.get('model', 'external')}`",
             f"- Input: {v.preprocessing.get('size')} px, {v.preprocessing.get('channels')} channel(s), "
             f"normalised with mean {v.preprocessing.get('mean')} and std {v.preprocessing.get('std')}",
             *text["decision"],
             f"- Source: {v.source_run}; parent version: {_fmt(v.parent_version)}",
             *([_teacher_line(teacher)] if teacher else []),
             *([f"- MLflow run: `{link['model_uri'].rsplit('/', 1)[0]}` at {link['tracking_uri']} (experiment "
                f"{link.get('experiment')}); model `{link['model_uri']}`"] if link else []), ""]
    if v.format == "pytorch":
        from lepton.cost import cost_lines

        lines += ["## Inference cost", *cost_lines(cost), ""]
    lines += ["## Training data"]
    if fp:
        lines.append(f"- Source `{fp.get('source')}`, {fp.get('images')} images; fingerprint "
                     f"`{str(fp.get('sha256'))[:16]}…`; patient-grouped splits: {fp.get('patient_grouped')}")
        for split, counts in (fp.get("counts") or {}).items():
            lines.append(f"- {split}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    else:
        lines.append("- Not recorded (model registered from an external file).")
    lines += ["", "## Metrics", *text["metrics"]]
    if len(lines) and lines[-1] == "## Metrics":
        lines.append("- No evaluation recorded: run `lepton evaluate` before registering.")
    lines += ["", "## Limitations",
              "- Performance is measured on held-out data from the same source; expect lower figures under "
              "distribution shift (other scanners, sites, populations, image sizes).",
              "- Calibration (ECE above) may not transfer to a different disease prevalence; re-check the "
              "threshold on local data before clinical use.", ""]
    return "\n".join(lines)


def _teacher_line(teacher: dict[str, Any]) -> str:
    """A distilled student's teacher: its run (and registered version when known) and what it cost per answer."""
    ref = f" (registered as {teacher['version']})" if teacher.get("version") else ""
    return (f"- Distilled from teacher `{teacher.get('run')}`{ref}: `{teacher.get('model')}`, "
            f"{teacher.get('members')} member(s) × {teacher.get('tta_views')} TTA view(s) = "
            f"{teacher.get('forward_passes_per_image')} forward passes per image; temperature "
            f"{teacher.get('temperature')}, soft-target weight {teacher.get('alpha')}")


def card_html(markdown: str) -> str:
    """A model card as HTML that is safe to show in a page: CommonMark with raw HTML turned off (any tag in the card
    comes out as text) and markdown-it's link check (no ``javascript:``, ``vbscript:``, ``file:`` or non-image
    ``data:`` links); tables on."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable(
        "table").render(markdown)
