"""Training progress: a rich progress bar on a terminal, one line per epoch otherwise, nothing when quiet."""

from __future__ import annotations

from typing import Any


class Reporter:
    """A rich progress bar on a terminal, one line per epoch otherwise, nothing when quiet."""

    def __init__(self, quiet: bool, epochs: int, steps: int, metric: str = "val_auc"):
        from rich.console import Console

        self.quiet, self.epochs, self.steps, self.metric = quiet, epochs, steps, metric
        self.metric_title = metric.replace("_", " ").replace("auc", "AUC")
        self.console = Console(stderr=True)
        self.progress = None
        self.task = None
        if not quiet and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("{task.fields[ips]:.0f} img/s"), TextColumn(self.metric_title + " {task.fields[auc]}"),
                TimeRemainingColumn(), console=self.console, transient=False)

    def __enter__(self):
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def start_epoch(self, epoch: int) -> None:
        if self.progress:
            if self.task is None:
                self.task = self.progress.add_task("train", total=self.steps, epoch=epoch,
                                                   epochs=self.epochs, loss=0.0, ips=0.0, auc="-")
            self.progress.reset(self.task, total=self.steps, epoch=epoch)

    def step(self, loss: float, ips: float) -> None:
        if self.progress:
            self.progress.update(self.task, advance=1, loss=loss, ips=ips)

    def end_epoch(self, row: dict[str, Any], best: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self.progress:
            self.progress.update(self.task, auc=f"{row[self.metric]:.4f}")
        else:
            self.console.print(
                f"epoch {row['epoch']}/{self.epochs}  loss {row['train_loss']:.4f}  "
                + "".join(f"{k.replace('_', ' ').replace('auc', 'AUC')} {v:.4f}  " for k, v in row.items()
                          if k.startswith("val_"))
                + f"{row['images_per_s']:.0f} img/s  (best epoch {best['epoch']})",
                highlight=False, soft_wrap=True)
