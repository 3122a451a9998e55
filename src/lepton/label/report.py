"""What each active-learning round cost and gained: the labels a round added (``rounds.json``) beside the headline
validation figure, with its 95 % CI, of the run trained after it (``lepton label report``).

Runs are paired with rounds by their data: each run's source is read (as ``lepton label import`` reads it) and the
pixel hashes of each round's cases (``labels.csv``) looked up in it; a run holding rounds 1…k and none later is the
run after round k (the starting run holds none). A run directory keeps only one hash of its whole training set
(``data.json``), so its source must still be readable; without it (``match=False``) runs are taken in the order
given. Either way each run's training images (``run.json``) are checked against the first run's plus the labels
added since, the difference named per row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lepton.errors import ConfigError, DataError, RunError
from lepton.label.rounds import open_labels
from lepton.rundir import CONFIG, INFO, LAST, RunDir
from lepton.utils import atomic_write_json, atomic_write_text

#: A gain is priced per point: 0.01 of the metric (one percentage point of AUC or Dice).
POINT = 0.01


def _run_record(path: Path) -> dict[str, Any]:
    run_dir = RunDir(path)
    if not run_dir.has(CONFIG):
        raise RunError(f"{path}: not a run directory (no config.yaml); give the runs trained after each round")
    try:
        info = run_dir.read_info(default={})
    except RunError as exc:
        raise RunError(f"{exc}; train the run again") from exc
    if info.get("status") != "complete":
        hint = "resume it with `lepton train --resume`" if run_dir.has(LAST) else "train it to the end"
        raise RunError(f"{path}: not a complete run (run.json has no status 'complete'); {hint}")
    return info


def _headline(path: Path, info: dict[str, Any], evaluate_missing: bool, n_bootstrap: int):
    """(metric, value, CI or None, where from) of a run's validation split."""
    from lepton.tasks import Task, get_task

    config = RunDir(path).read_config()
    task = get_task(config.task, config.task_options)
    if type(task).headline is Task.headline:
        raise ConfigError(f"{path}: the {task.name} task has no headline figure to report rounds on "
                          "(classification and segmentation runs have)")
    report_file = path / "eval" / "val" / "report.json"
    report = None
    if report_file.is_file():
        try:
            report = json.loads(report_file.read_text())
        except (OSError, ValueError) as exc:
            raise RunError(f"{report_file}: unreadable ({exc}); run `lepton evaluate {path} --split val` "
                           "again") from exc
    elif evaluate_missing:
        from lepton.evaluate import evaluate

        report = evaluate(path, split="val", output=path / "eval" / "val", n_bootstrap=n_bootstrap, plots=False,
                          track=[])
    if report is not None:
        metric, value, ci = task.headline(report)
        return metric, float(value), (list(ci) if ci else None), str(report_file)
    # no evaluation on val: the figure model selection stored, without a CI
    key = next((k for k, v in task.card_metrics(info, {}).items()
                if k.startswith("val_") and isinstance(v, int | float)), None)
    if key is None:
        raise RunError(f"{path}: run.json holds no validation figure; run `lepton evaluate {path} --split val`")
    return key.removeprefix("val_"), float(info[key]), None, str(path / INFO)


def _matched_round(path: Path, by_round: dict[int, set[str]]) -> tuple[int, dict[int, int]]:
    """How many rounds a run was trained after (``by_round``: each round's cases, in round order), from the rounds'
    cases found in its data (any split): an unbroken run of complete rounds from the first, none later; with the
    cases found per round."""
    from lepton.data.readers.unlabelled import pixel_hash
    from lepton.label.suggest import labelled_set
    from lepton.runs import load_run

    _, data = labelled_set(load_run(path), None)
    held = {pixel_hash(image) for image in data.images}
    found = {r: len(hashes & held) for r, hashes in by_round.items()}
    order = list(by_round)
    k = 0
    while k < len(order) and found[order[k]] == len(by_round[order[k]]):
        k += 1
    later = {r: found[r] for r in order[k:] if found[r]}
    if later:
        raise RunError(f"{path}: its data holds {', '.join(f'{n} case(s) of round {r}' for r, n in later.items())} "
                       f"but not all of round {order[k]}'s, so it follows no round; train it on every round's labels "
                       "up to the one it follows, or pair the runs by position (match=False, --no-match)")
    return k, found


def round_report(labels: str | Path, runs: list[str | Path], output: str | Path, *, match: bool = True,
                 evaluate_missing: bool = False, n_bootstrap: int = 1000) -> dict[str, Any]:
    """Per round: the labels it added and in total, the headline validation figure of the run trained after it with
    its 95 % CI (from ``RUN/eval/val/report.json``; with ``evaluate_missing`` that report is made where it is
    missing, else ``run.json``'s figure stands without a CI), the gain over the round before and the labels paid per
    point (0.01) gained. With ``match`` each run is paired with a round by the round's cases in its data (they must
    make rounds 0, 1, 2, … without gaps), else ``runs[0]`` is the starting run (round 0), ``runs[k]`` the run after
    round k. Writes ``report.json``, ``report.md`` and ``rounds.png`` (the figure with CI bars against the labels in
    total) to ``output``."""
    labels_dir, output = Path(labels), Path(output)
    if not runs:
        raise ConfigError("give the runs trained after each round, the starting run (round 0) first")
    record = open_labels(labels_dir)
    if not labels_dir.is_dir() or not record.rounds:
        raise DataError(f"{labels_dir}: no rounds recorded (rounds.json); import labels with `lepton label import "
                        f"RUN FILE --labels {labels_dir}` first")
    rounds = sorted(record.rounds, key=lambda r: r["round"])
    if len(runs) > len(rounds) + 1:
        raise ConfigError(f"{len(runs)} runs for {len(rounds)} round(s) in {labels_dir}: give at most "
                          f"{len(rounds) + 1} — the starting run, then one run per round in round order")
    paths = [Path(r) for r in runs]
    infos = [_run_record(p) for p in paths]
    found: list[dict[int, int] | None] = [None] * len(paths)
    if match:
        by_round: dict[int, set[str]] = {r["round"]: set() for r in rounds}
        for row in record.rows.values():
            by_round.setdefault(int(row["round"]), set()).add(row["sha256"])
        matched = [_matched_round(p, by_round) for p in paths]
        order = sorted(range(len(paths)), key=lambda i: matched[i][0])
        ks = [matched[i][0] for i in order]
        if ks != list(range(len(paths))):
            listing = ", ".join(f"{paths[i]} after round {matched[i][0]}" for i in order)
            raise RunError(f"the runs' data make rounds {ks}, not 0…{len(paths) - 1} once each ({listing}); give the "
                           "starting run and one run per round, each trained on the labels up to its round")
        paths, infos = [paths[i] for i in order], [infos[i] for i in order]
        found = [matched[i][1] for i in order]
    start = int(infos[0].get("train_images", 0))
    rows: list[dict[str, Any]] = []
    metric = None
    cumulative = 0
    for k, (path, info) in enumerate(zip(paths, infos, strict=True)):
        name, value, ci, source = _headline(path, info, evaluate_missing, n_bootstrap)
        if metric is not None and name != metric:
            raise RunError(f"{path}: its headline figure is {name}, the earlier runs' {metric}; give runs of one "
                           "task")
        metric = name
        added = int(rounds[k - 1]["cases"]) if k else 0
        cumulative += added
        trained = info.get("train_images")
        expected = start + cumulative
        row = {"round": rounds[k - 1]["round"] if k else 0, "run": str(path), "labels_added": added,
               "labels_total": expected, "train_images": trained, metric: value, "ci95": ci, "from": source,
               "gain": None, "labels_per_point": None, "round_cases_found": found[k],
               "check": "ok" if trained == expected else
               f"the run trained on {trained} images, the first run's {start} + {cumulative} labelled since make "
               f"{expected} (labelled cases split into val/test, or other images changed)"}
        if rows:
            gain = value - rows[-1][metric]
            row["gain"] = gain
            row["labels_per_point"] = added / (gain / POINT) if gain > 0 else None
        rows.append(row)
    report = {"labels": str(labels_dir), "metric": metric, "split": "val", "point": POINT, "rounds": rows,
              "rounds_recorded": len(rounds), "rounds_trained": len(rows) - 1,
              "matching": ("by data: each round's cases (pixel hashes in labels.csv) looked up in each run's source"
                           if match else "by position: the first run is round 0 (the starting run), the k-th after "
                           "round k") + "; each run's training images checked against the labels added"}
    output.mkdir(parents=True, exist_ok=True)
    from lepton.plots import plot_rounds

    plot_rounds(rows, metric, output / "rounds.png")
    report["plot"] = str(output / "rounds.png")
    atomic_write_json(output / "report.json", report)
    atomic_write_text(output / "report.md", _markdown(report))
    return report


def _markdown(report: dict[str, Any]) -> str:
    metric = report["metric"]
    name = metric.upper() if metric == "auc" else metric.capitalize()
    lines = [f"# Labelling rounds: {report['labels']}", "",
             f"Validation {name} with its 95 % CI of the run trained after each round; gain over the round before "
             f"and the labels paid per point ({POINT}) gained.", "",
             f"| round | labels added | labels total | {name} [95 % CI] | gain | labels per point | run |",
             "|---" * 7 + "|"]
    for r in report["rounds"]:
        ci = " [{:.4f}, {:.4f}]".format(*r["ci95"]) if r["ci95"] else " (no CI: not evaluated on val)"
        gain = f"{r['gain']:+.4f}" if r["gain"] is not None else "-"
        per = f"{r['labels_per_point']:.1f}" if r["labels_per_point"] is not None else \
            ("-" if r["gain"] is None else "no gain")
        lines.append(f"| {r['round']} | {r['labels_added']} | {r['labels_total']} | {r[metric]:.4f}{ci} | {gain} | "
                     f"{per} | {Path(r['run']).name} |")
    notes = [f"- round {r['round']}: {r['check']}" for r in report["rounds"] if r["check"] != "ok"]
    if report["rounds_trained"] < report["rounds_recorded"]:
        notes.append(f"- {report['rounds_recorded'] - report['rounds_trained']} recorded round(s) have no run yet")
    lines += ["", *notes, "", f"Runs paired with rounds {report['matching']}. Gains are differences of point values; "
              "each figure's CI is its own, not the gain's.", "",
              "![rounds](rounds.png)", ""]
    return "\n".join(lines)
