"""A federation's record: each site's figures every round, the global weights after every round, and at the end a
normal run directory (config, preprocessing, labels, ``best.pt`` from the round with the best pooled val figure,
per-round ``history.csv`` and curves, ``sites.csv`` with every site's figures, ``run.json``) that ``lepton
evaluate``, ``lepton models register`` and ``lepton serve`` take unchanged."""

from __future__ import annotations

import csv
import io
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from lepton import rundir
from lepton.federated.site import SiteSettings
from lepton.tracking.base import Tracker, code_version, flat_params
from lepton.utils import atomic_write_text

#: Metric names a site reports that identify it rather than measure anything (left out of the pooled figures).
SITE_KEY = "site"
#: Every site's figures every round, beside the run directory's own files.
SITES_FILE = "sites.csv"


class Recorder:
    """Collects the rounds as Flower runs them (its metric aggregation hooks and ``evaluate_fn``) and writes the
    run directory."""

    def __init__(self, strategy: str, settings: SiteSettings, run_config: dict[str, Any], agreed: dict[str, Any],
                 model_spec: dict[str, Any], summaries: dict[str, dict[str, Any]], dp: dict[str, Any] | None = None,
                 secure: dict[str, Any] | None = None):
        self.strategy, self.settings, self.run_config, self.dp, self.secure = strategy, settings, run_config, dp, secure
        self.agreed, self.model_spec, self.summaries = agreed, model_spec, summaries
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.site_rows: list[dict[str, Any]] = []
        self._round = {"train": 0, "evaluate": 0}
        self.bytes_per_round: list[int] = []
        self.name = str(run_config.get("name") or f"federated-{strategy}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}")
        self.run_dir = Path(str(run_config.get("output-dir", "runs"))) / self.name
        self.tracker = Tracker()

    def track(self, track: list[str]) -> Tracker:
        """The federation's trackers (``track``: ``--track`` values), started with its settings and tags: each round
        logs the pooled figures and every site's (``site-ID/…``) at the round as step."""
        from lepton.tracking.factory import open_tracker

        if track:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.tracker = open_tracker(track, self.run_dir, run_name=self.name)
            self.tracker.start(flat_params({k: v for k, v in self.run_config.items() if k != "track"}), {
                "task": "classification", "model": self.settings.model, "federated.strategy": self.strategy,
                "federated.sites": str(len(self.summaries)), "differential_privacy": str(bool(self.dp)),
                "secure_aggregation": str(bool(self.secure)), **code_version()})
        return self.tracker

    # -- Flower hooks ---------------------------------------------------------------------------------------
    def pool(self, kind: str, rows: list[dict[str, Any]], weighting: str = "num-examples") -> dict[str, float]:
        """Each site's figures kept; the pooled ones averaged by ``weighting`` (images) over the sites where the
        figure is defined (a site whose val holds one class has no AUC)."""
        self._round[kind] += 1
        rows = [dict(row) for row in rows]
        for row in rows:
            self.site_rows.append({"round": self._round[kind], "kind": kind, **row})
        pooled = {}
        for key in sorted({k for row in rows for k in row} - {SITE_KEY, weighting}):
            pairs = [(float(r[key]), float(r.get(weighting, 1))) for r in rows
                     if key in r and math.isfinite(float(r[key]))]
            total = sum(w for _, w in pairs)
            if total > 0:
                pooled[key] = sum(v * w for v, w in pairs) / total
        figures = dict(pooled)
        for row in rows:
            figures.update({f"site-{row[SITE_KEY]}/{k}": float(v) for k, v in row.items()
                            if k not in (SITE_KEY, weighting) and isinstance(v, int | float)})
        self.tracker.log_metrics(figures, self._round[kind])
        return pooled

    def _record(self, kind: str, records, weighting: str):
        from flwr.app import MetricRecord

        rows = [dict(metrics) for record in records for metrics in record.metric_records.values()]
        return MetricRecord(self.pool(kind, rows, weighting))

    def train_metrics(self, records, weighting: str):
        return self._record("train", records, weighting)

    def evaluate_metrics(self, records, weighting: str):
        return self._record("evaluate", records, weighting)

    def keep_weights(self, server_round: int, arrays) -> None:
        """``evaluate_fn``: the global weights after each round (round 0: the initial ones)."""
        self.keep_state(server_round, arrays.to_torch_state_dict())

    def keep_state(self, server_round: int, state: dict[str, torch.Tensor]) -> None:
        self.weights[server_round] = {k: v.clone() for k, v in state.items()}
        self.bytes_per_round.append(int(sum(v.numel() * v.element_size() for v in state.values())))

    # -- the run directory ----------------------------------------------------------------------------------
    def write(self, result, seconds: float) -> Path:
        from lepton.plots import plot_curves
        from lepton.train.checkpoint import write_history

        name, run_dir = self.name, self.run_dir
        files = rundir.RunDir(run_dir).create()
        history = []
        for r in sorted(result.evaluate_metrics_clientapp):
            ev = dict(result.evaluate_metrics_clientapp[r])
            tr = dict(result.train_metrics_clientapp.get(r, {}))
            history.append({"epoch": r, "lr": self.settings.lr, "train_loss": float(tr.get("train_loss", math.nan)),
                            **{k: float(ev.get(k, math.nan)) for k in ("val_loss", "val_acc", "val_auc")},
                            "images_per_s": 0.0, "seconds": float(tr.get("train_seconds", 0.0))})
        if not history:
            raise RuntimeError("the federation ended without an evaluated round")
        scored = [h for h in history if not math.isnan(h["val_auc"])]
        best = max(scored, key=lambda h: (h["val_auc"], -h["val_loss"])) if scored else min(
            history, key=lambda h: h["val_loss"])
        config = self.settings.train_config(f"federated:{len(self.summaries)} sites")
        config.name, config.output_dir, config.epochs = name, str(run_dir.parent), len(history)
        files.write_config(config)
        files.write_preprocessing(self.agreed["spec"])
        files.write_labels(self.agreed["label_names"])
        files.write_data({
            "source": "federated", "sites": len(self.summaries),
            "counts": {site: {"train": s["train"], "val": s["val"]} for site, s in self.summaries.items()}})
        metrics = {k: v for k, v in best.items() if k.startswith("val_")}
        files.save_checkpoint({"model": self.weights[best["epoch"]], "spec": self.model_spec, "epoch": best["epoch"],
                               "val": metrics})
        write_history(run_dir, history)
        plot_curves(history, files.file(rundir.CURVES))
        self._write_sites(run_dir)
        info = {
            "status": "complete", "name": name, "task": "classification", "model": self.settings.model,
            "epochs": len(history), "best_epoch": best["epoch"],
            **{k: v for k, v in metrics.items() if k != "val_loss"},
            "threshold": None, "threshold_rule": "arg-max (federated: no pooled val set to fit a threshold on)",
            "train_images": sum(s["train"] for s in self.summaries.values()),
            "val_images": sum(s["val"] for s in self.summaries.values()), "images_per_s": 0.0,
            "wall_seconds_this_call": round(seconds, 2), "device": "cpu", "precision": "fp32",
            "torch": torch.__version__, "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "federated": {"strategy": self.strategy, "rounds": len(history), "sites": len(self.summaries),
                          "local_epochs": self.settings.local_epochs, "proximal_mu": self.settings.proximal_mu,
                          "fraction": float(self.run_config.get("fraction", 1.0)),
                          "min_sites": int(self.run_config.get("min-sites", 2)),
                          "model_bytes_per_round": self.bytes_per_round[-1] if self.bytes_per_round else None,
                          "selection": "round with the best sites' pooled val AUC (weighted by val images)",
                          "differential_privacy": self.dp, "secure_aggregation": self.secure},
        }
        files.write_info(info)
        self.tracker.log_metrics({f"final/{k}": v for k, v in metrics.items() if math.isfinite(v)}, len(history))
        self.tracker.log_artifacts([files.file(f) for f in (*rundir.TRACKED, SITES_FILE) if f != rundir.VAL_SET],
                                   "run")
        self.tracker.log_artifacts([run_dir / "tracking" / "tracking.json"], "run/tracking")
        if self.tracker.backend != "none":
            self.tracker.log_model(files.load_model())
        return run_dir

    def _write_sites(self, run_dir: Path) -> None:
        keys = sorted({k for row in self.site_rows for k in row} - {"round", "kind", SITE_KEY})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["round", "kind", SITE_KEY, *keys], extrasaction="ignore")
        writer.writeheader()
        for row in self.site_rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        atomic_write_text(run_dir / SITES_FILE, buf.getvalue())
