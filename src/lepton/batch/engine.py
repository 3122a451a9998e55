"""The batch engine on one machine, and the driver both engines share.

``predict_batch`` streams a job's inputs past the ones already written, decodes them in worker processes (a bounded
number of chunks in flight, results taken in order), runs the run's forward pass at its batch size in this process
while the workers decode the next chunks, and writes rows as numbered parts (``lepton.batch.store``), merged into the
output at the end. ``engine="ray"`` hands decoding and the model to Ray Data (``lepton.batch.cluster``); the parts,
the resume and the output are the same.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lepton.batch.rows import Decoded, Predictor, answer_chunk, decode, decode_chunk, schema, worker_init
from lepton.batch.sources import Input, count_inputs, iter_inputs
from lepton.batch.store import PartStore, key_hash
from lepton.errors import ConfigError, RunError

log = logging.getLogger("lepton.batch")

ENGINES = ("local", "ray")


@dataclass
class BatchSummary:
    """What a batch job did: inputs in its sources, those already done before this start, those processed now,
    rows and error rows in the output, and the rate of this start."""

    output: str
    engine: str
    inputs: int
    skipped: int
    processed: int
    rows: int
    errors: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": round(self.rate, 2)}


def default_workers(answering: bool = False) -> int:
    """Worker processes (at most 8): one a core when the workers answer (a classifier on the CPU: each decodes and
    runs the model on one thread); every core but the one the forward pass runs on when they only decode."""
    cores = os.cpu_count() or 2
    return max(1, min(8, cores if answering else cores - 1))


def predict_batch(run, sources: str | Path | Iterable[str | Path], output: str | Path, *, engine: str = "local",
                  workers: int | None = None, batch_size: int | None = None, model_id: str | None = None,
                  precision: str = "fp32", masks: str | Path | None = None, overwrite: bool = False,
                  progress: bool = True, labelled: bool = False, address: str | None = None,
                  cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, flush_rows: int | None = None,
                  flush_seconds: float = 10.0, dicom_seg: bool = False) -> BatchSummary:
    """Run ``run`` (a ``Run``, or a run directory) over every input of ``sources`` into ``output`` (``.parquet``, or
    ``.csv``): one row per input (per frame of a multi-frame input), errors as rows. Restarted with the same
    arguments after a kill, it skips what is written and ends with each input exactly once.

    ``workers``: decoding processes (local; 0 decodes in this process) or model actors (ray). ``batch_size``: the
    forward pass's batch (default the run's). ``model_id``: what the ``model`` column says (default the run's
    folder). ``masks``: where a task with label maps writes them (default ``<output stem>_masks/`` beside the output).
    ``labelled``: class folders give each input its ``truth``. ``address``: the Ray cluster (``auto``,
    ``ray://host:10001``; default a local Ray). ``overwrite``: drop an earlier output and its parts first.
    ``dicom_seg``: a segmentation run's input that is a DICOM series also gets a DICOM SEG referencing it, beside its
    label map (the ``dicom_seg`` column)."""
    from lepton.runs import Run, load_run

    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r}: use one of {', '.join(ENGINES)}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision={precision!r}: use fp32, bf16 or fp16")
    run = run if isinstance(run, Run) else load_run(run)
    sources = [sources] if isinstance(sources, str | Path) else list(sources)
    if not sources:
        raise ConfigError("no sources given")
    output = Path(output)
    if output.suffix.lower() not in (".parquet", ".csv"):
        raise ConfigError(f"{output}: the output must end in .parquet or .csv")
    if "batch" not in run.task.capabilities:
        raise ConfigError(f"a {run.task.name} run has no batch rows: predict it with `lepton predict` without --batch")
    on_grid = run.task.on_grid  # one input at a time, answered on its own grid
    if dicom_seg and "dicom_seg" not in run.task.encodings:
        raise ConfigError(f"dicom_seg: a {run.task.name} run writes no label maps; a DICOM SEG is for segmentation")
    if "label_map" in run.task.encodings and masks is None:
        masks = output.with_name(output.name.rsplit(".", 1)[0] + "_masks")
    model_id = model_id or str(run.path)
    job = {"model": model_id, "task": run.task.name, "sources": [str(s) for s in sources], "precision": precision,
           "tta": bool(run.config.tta), "masks": str(masks) if masks is not None else None, "labelled": labelled,
           **({"dicom_seg": True} if dicom_seg else {})}
    out_schema = schema(run)
    store = PartStore(output, job, out_schema, overwrite=overwrite)
    done = store.done()
    series = run.preprocessing.spatial_dims == 3
    pending = (item for item in iter_inputs(sources, series=series, labelled=labelled)
               if not _contains(done, key_hash(item.path)))
    if store.finished:
        extra = sum(1 for _ in pending)
        if extra:
            raise ConfigError(f"{output} is a finished job and the sources now hold {extra} input(s) it lacks: "
                              "write to another output, or start again with --overwrite")
        rows = store.count_rows()
        return BatchSummary(str(output), engine, len(done), len(done), 0, rows, _errors(store), 0.0)
    total = count_inputs(sources, series=series, labelled=labelled) if progress else None
    predictor = Predictor(run, model_id=model_id, precision=precision, masks=masks, batch_size=batch_size,
                          dicom_seg=dicom_seg)
    started = time.monotonic()
    if engine == "local":
        answering = not on_grid and str(run.device) == "cpu" and workers != 0
        batches = _local(predictor, pending, workers=default_workers(answering) if workers is None else workers,
                         answering=answering)
    else:
        from lepton.batch.cluster import ray_batches

        batches = ray_batches(predictor, pending, workers=workers or 2, address=address,
                              cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor)
    flush_rows = flush_rows or (64 if on_grid else 4096)
    processed = _drive(batches, store, total=total, skipped=len(done), progress=progress, flush_rows=flush_rows,
                       flush_seconds=flush_seconds)
    seconds = time.monotonic() - started
    rows = store.finish()
    summary = BatchSummary(str(output), engine, len(done) + processed, len(done), processed, rows, _errors(store),
                           round(seconds, 3))
    log.info("%s: %d inputs (%d done before), %d rows, %d errors, %.1f inputs/s", output, summary.inputs,
             summary.skipped, summary.rows, summary.errors, summary.rate)
    return summary


def _contains(done: np.ndarray, key: int) -> bool:
    if not len(done):
        return False
    i = int(np.searchsorted(done, np.uint64(key)))
    return i < len(done) and int(done[i]) == key


def _errors(store: PartStore) -> int:
    """Error rows in the finished output."""
    return sum(sum(1 for v in b.column(0).to_pylist() if v) for b in store.read_output(["error"]))


def _drive(batches: Iterator, store: PartStore, *, total: int | None, skipped: int, progress: bool,
           flush_rows: int, flush_seconds: float) -> int:
    """Write ``batches`` (lists of row dicts, or Arrow tables, of whole inputs) as parts every ``flush_rows`` rows
    or ``flush_seconds``, with a progress bar; the number of inputs processed."""
    import pyarrow as pa

    buffer: list[Any] = []
    buffered, processed, last = 0, 0, time.monotonic()
    bar = _progress(total, skipped) if progress else None
    started = time.monotonic()

    def flush() -> None:
        nonlocal buffer, buffered, last
        if buffer:
            tables = [b if isinstance(b, pa.Table) else pa.Table.from_pylist(b, schema=store.schema) for b in buffer]
            store.write(pa.concat_tables([t.select(store.schema.names).cast(store.schema) for t in tables]))
        buffer, buffered, last = [], 0, time.monotonic()

    try:
        if bar is not None:
            bar[0].start()
        for batch in batches:
            n_rows = batch.num_rows if isinstance(batch, pa.Table) else len(batch)
            frames = (batch.column("frame").to_pylist() if isinstance(batch, pa.Table)
                      else [r.get("frame", 0) for r in batch])
            inputs = sum(1 for f in frames if not f)
            buffer.append(batch)
            buffered += n_rows
            processed += inputs
            if bar is not None:
                elapsed = max(time.monotonic() - started, 1e-9)
                bar[0].update(bar[1], advance=inputs, rate=f"{processed / elapsed:,.1f} inputs/s")
            if buffered >= flush_rows or time.monotonic() - last >= flush_seconds:
                flush()
        flush()
    finally:
        if bar is not None:
            bar[0].stop()
    return processed


def _progress(total: int | None, skipped: int):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=False)
    task = bar.add_task("predict", total=total, completed=skipped, rate="")
    return bar, task


def _local(predictor: Predictor, pending: Iterator[Input], *, workers: int,
           answering: bool = False) -> Iterator[list[dict[str, Any]]]:
    """Rows for ``pending`` on this machine, in order. ``answering`` (a classifier on the CPU): ``workers``
    processes each decode a chunk of a forward batch's inputs and answer it with the model on one thread — on a CPU,
    single-threaded forward passes side by side outrun one multi-threaded pass sharing its cores with decoders.
    Otherwise ``workers`` processes decode (a bounded number of chunks in flight) and the forward batches run here."""
    if answering:
        yield from _pooled(pending, answer_chunk, (), predictor.batch_size, workers, (predictor,),
                           lambda item, reason: [predictor.error_row(item, reason)])
        return
    decoded = _decode_stream(pending, predictor.spec, predictor.on_grid, workers)
    if predictor.on_grid:
        for d in decoded:
            yield [predictor.grid(d)]
        return
    group: list[Decoded] = []
    frames = 0
    for d in decoded:
        group.append(d)
        frames += len(d.x) if d.x is not None else 0
        if frames >= predictor.batch_size:
            yield predictor.classify(group)
            group, frames = [], 0
    if group:
        yield predictor.classify(group)


def _decode_stream(pending: Iterator[Input], spec: dict, on_grid: bool, workers: int) -> Iterator[Decoded]:
    """Decoded inputs in order. ``workers`` = 0 decodes here; otherwise chunks go to a process pool (``_pooled``)."""
    if workers <= 0:
        for item in pending:
            yield decode(item, spec, on_grid)
        return
    for results in _pooled(pending, decode_chunk, (spec, on_grid), 1 if on_grid else 16, workers, (),
                           lambda item, reason: [Decoded(item, error=reason)]):
        yield from results


def _pooled(pending: Iterator[Input], job, args: tuple, chunk: int, workers: int, initargs: tuple,
            crashed) -> Iterator[list]:
    """``job(items, *args)`` over chunks of ``pending`` in a pool of ``workers`` spawned processes (started by
    ``worker_init(*initargs)``), results yielded in input order, at most ``3 × workers`` chunks in flight. A worker
    that dies (a decoder crash) costs its chunk a retry one input at a time; an input that kills a worker again gets
    ``crashed(item, reason)`` as its result."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    from itertools import islice

    ctx = mp.get_context("spawn")  # never fork a process that holds PyTorch's thread pools

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=worker_init, initargs=initargs)

    pool = new_pool()
    stillborn = 0  # pools in a row that broke before answering a chunk
    inflight: deque[tuple[list[Input], Any]] = deque()
    try:
        while True:
            while len(inflight) < 3 * workers:
                items = list(islice(pending, chunk))
                if not items:
                    break
                inflight.append((items, pool.submit(job, items, *args)))
            if not inflight:
                return
            items, future = inflight.popleft()
            try:
                results = future.result()
                stillborn = 0
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                stillborn += 1
                if stillborn >= 3:  # fresh pools die before decoding anything: not an input's fault
                    raise RunError("the decoding processes die as they start (a script that calls this must guard "
                                   "its top level with `if __name__ == \"__main__\":`, as multiprocessing's spawn "
                                   "re-imports it); or decode in this process with workers=0") from None
                pool = new_pool()
                if len(items) == 1:
                    results = crashed(items[0], "the decoder crashed on this input (its process died)")
                else:
                    retry = [([it], pool.submit(job, [it], *args)) for it in items]
                    rest = [(its, pool.submit(job, its, *args)) for its, _ in inflight]
                    inflight = deque(retry + rest)
                    continue
                inflight = deque((its, pool.submit(job, its, *args)) for its, _ in inflight)
            yield results
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
