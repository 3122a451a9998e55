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

from lepton.federated.site import SiteSettings
from lepton.utils import atomic_torch_save, atomic_write_json, atomic_write_text

#: Metric names a site reports that identify it rather than measure anything (left out of the pooled figures).
SITE_KEY = "site"


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

        name = str(self.run_config.get("name") or f"federated-{self.strategy}-"
                   f"{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}")
        run_dir = Path(str(self.run_config.get("output-dir", "runs"))) / name
        run_dir.mkdir(parents=True, exist_ok=True)
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
        config.to_yaml(run_dir / "config.yaml")
        atomic_write_json(run_dir / "preprocessing.json", self.agreed["spec"])
        atomic_write_json(run_dir / "labels.json", self.agreed["label_names"])
        atomic_write_json(run_dir / "data.json", {
            "source": "federated", "sites": len(self.summaries),
            "counts": {site: {"train": s["train"], "val": s["val"]} for site, s in self.summaries.items()}})
        metrics = {k: v for k, v in best.items() if k.startswith("val_")}
        atomic_torch_save(run_dir / "best.pt", {"model": self.weights[best["epoch"]], "spec": self.model_spec,
                                                "epoch": best["epoch"], "val": metrics})
        write_history(run_dir, history)
        plot_curves(history, run_dir / "curves.png")
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
        atomic_write_json(run_dir / "run.json", info)
        return run_dir

    def _write_sites(self, run_dir: Path) -> None:
        keys = sorted({k for row in self.site_rows for k in row} - {"round", "kind", SITE_KEY})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["round", "kind", SITE_KEY, *keys], extrasaction="ignore")
        writer.writeheader()
        for row in self.site_rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        atomic_write_text(run_dir / "sites.csv", buf.getvalue())
