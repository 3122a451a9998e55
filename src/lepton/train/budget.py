"""The wall-clock budget of a training run (``time_budget_s``): plan the epochs that fit, never start one late."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lepton.config import TrainConfig
from lepton.rundir import RunDir

log = logging.getLogger("lepton.train")

#: The run is re-planned after this epoch: by then first-epoch costs (warm-up, allocation) are behind it.
PLAN_AFTER_EPOCH = 2


class TimeBudget:
    """Wall-clock time since ``start`` against ``seconds`` (0: no budget)."""

    def __init__(self, seconds: float, start: float | None = None):
        self.seconds = seconds
        self.started = time.perf_counter() if start is None else start

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def would_overrun(self, next_epoch_s: float) -> bool:
        """Whether an epoch as long as ``next_epoch_s`` started now would end past the budget."""
        return bool(self.seconds) and self.elapsed() + next_epoch_s > self.seconds


def fit_to_budget(config: TrainConfig, elapsed: float, epoch_s: float, run_dir: Path, reporter=None) -> None:
    """Re-plan a fresh run after its second epoch to the epochs that fit ``time_budget_s`` at that epoch's pace;
    the new count is saved in config.yaml (so a resume keeps it) and the cosine schedule stretches over it.

    When the whole schedule fits with room to spare and ``ensemble`` allows more than one member, the spare time
    goes to further members (whole schedules from other seeds; small data sets finish one schedule in a fraction
    of the budget, and a longer schedule of one network only overfits them)."""
    fit = PLAN_AFTER_EPOCH + max(0, int((config.time_budget_s - elapsed) // max(epoch_s, 1e-9)))
    if fit >= config.epochs:
        members = max(1, min(config.ensemble, fit // config.epochs))
        if members != config.ensemble:
            log.info("time budget %.0f s: at %.1f s per epoch there is room for %d of %d members of %d epochs",
                     config.time_budget_s, epoch_s, members, config.ensemble, config.epochs)
            config.ensemble = members
            RunDir(run_dir).write_config(config)
        return
    log.warning("time budget %.0f s: at %.1f s per epoch this run trains %d of %d epochs",
                config.time_budget_s, epoch_s, fit, config.epochs)
    config.epochs, config.ensemble = fit, 1
    RunDir(run_dir).write_config(config)
    if reporter is not None:
        reporter.epochs = fit


def announce_members(config: TrainConfig) -> str | None:
    """Say before the first epoch when the run may train more than one member, why, what it costs each answer, and
    the option that turns it off (logged; returned for the caller)."""
    if config.ensemble <= 1:
        return None
    views = 2 if config.tta else 1
    why = (f"the {config.preset} preset fills its time budget of {config.time_budget_s:.0f} s with whole schedules "
           f"from other seeds while there is room" if config.time_budget_s else "asked for (ensemble)")
    text = (f"up to {config.ensemble} ensemble members of {config.epochs} epochs each: {why}; kept only if their mean "
            f"scores at least a typical member on val. Each answer then costs up to {config.ensemble * views} forward "
            f"passes ({config.ensemble} members x {views} TTA view(s)); --ensemble 1 trains one network "
            "(`lepton distill RUN` turns an ensemble into one afterwards)")
    log.warning("%s", text)
    return text
