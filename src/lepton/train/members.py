"""An ensemble's members after training: their best records (kept for a resume), a member's epoch time for the
budget, and the choice between the members' mean and the best member, made on val alone."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from lepton.config import TrainConfig
from lepton.rundir import BEST, RunDir, model_from_checkpoint
from lepton.tasks import Task
from lepton.train.budget import PLAN_AFTER_EPOCH
from lepton.train.data import (
    Prepared,
    val_outputs,
    val_targets,
)

log = logging.getLogger("lepton.train")


def member_epoch_seconds(history: list[dict[str, Any]]) -> float:
    """A member's epoch time, from the first member's epochs after the planning point (all of them when it trained
    fewer: a one-epoch member still tells what the next one costs)."""
    first = [h["seconds"] for h in history if h.get("member", 1) == 1]
    rows = first[PLAN_AFTER_EPOCH - 1:] or first
    return float(np.median(rows)) if rows else 0.0


def members_done(history: list[dict[str, Any]], task: Task, member: int) -> list[dict[str, Any]]:
    """The best records of the members before ``member`` (kept in last.pt, so a resume knows them)."""
    out = []
    for k in range(1, member):
        rows = [h for h in history if h.get("member", 1) == k]
        if rows:
            pick = max(rows, key=lambda h: h[task.selection_metric] * (1 if task.higher_is_better else -1))
            out.append({"member": k, "score": pick[task.selection_metric], "epoch": pick["epoch"],
                        "loss": pick["val_loss"]})
    return out


def choose_members(run_dir: Path, task: Task, prepared: Prepared, config: TrainConfig, device: str,
                    done: list[dict[str, Any]]) -> dict[str, Any]:
    """Ensemble or best member, by val alone: the members' mean probabilities are kept when they score at least
    the members' mean on the selection metric, else the best member. Writes ``best.pt`` and returns the choice."""
    ckpts, outputs, files = [], [], RunDir(run_dir)
    for d in done:
        ckpt = files.load_checkpoint(f"members/{d['member']}.pt")
        model = model_from_checkpoint(ckpt, device, str(files.file(f"members/{d['member']}.pt")))
        ckpts.append(ckpt)
        found = val_outputs(model, prepared, task.activate, tta=config.tta, device=device,
                            batch_size=config.batch_size)
        outputs.append(found if isinstance(found, np.ndarray) else list(found))
    scores = [task.val_metrics(val_targets(prepared.y_val), o) for o in outputs]
    sign = 1 if task.higher_is_better else -1
    best_k = max(range(len(done)), key=lambda k: sign * scores[k][task.selection_metric])
    mean = (np.mean(outputs, axis=0) if isinstance(outputs[0], np.ndarray)
            else [np.mean(case, axis=0) for case in zip(*outputs, strict=True)])
    ensemble = task.val_metrics(val_targets(prepared.y_val), mean)
    # Against the members' mean, not their best: the best of K figures on a small val set is an optimistic one
    # (a maximum of noisy estimates), while the ensemble's expected gain over a member is real.
    typical = float(np.mean([sc[task.selection_metric] for sc in scores]))
    keep = len(done) > 1 and sign * ensemble[task.selection_metric] >= sign * typical
    if keep:
        spec = {**ckpts[0]["spec"], "members": len(done)}
        weights = {f"members.{k}.{name}": v for k, c in enumerate(ckpts) for name, v in c["model"].items()}
        files.save_checkpoint({"model": weights, "spec": spec, "epoch": None, "val": ensemble}, BEST)
    else:
        files.save_checkpoint(ckpts[best_k], BEST)
    log.info("members' val %s: %s; ensemble %.4f: %s", task.selection_metric,
             ", ".join(f"{s[task.selection_metric]:.4f}" for s in scores), ensemble[task.selection_metric],
             "kept" if keep else f"member {done[best_k]['member']} kept")
    return {"members": len(done) if keep else 1, "member_val": [s[task.selection_metric] for s in scores],
            "ensemble_val": ensemble[task.selection_metric], "metrics": ensemble if keep else scores[best_k],
            "best": done[best_k]}
