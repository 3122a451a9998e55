"""The batch engine on Ray Data: the same job, rows and parts as the local engine, with decoding and the model spread
over a Ray cluster (or a local Ray on this machine).

The pending inputs go to Ray a window at a time (``ray.data.from_items`` of their paths: the driver never holds the
whole archive), are read and decoded by Ray tasks (``map_batches`` of ``decode_batch``), and answered by an actor pool
of model actors (``ModelActor``: the run loaded once per actor, ``workers`` actors of ``cpus_per_actor`` CPUs and
``gpus_per_actor`` GPUs each). With CPU actors Ray fuses the decoding stage into the actors (an actor decodes the
batches it answers, so no decoded tensor crosses the object store); with GPU actors decoding stays a stage of its own,
its tasks spread over the cluster's CPUs. Rows come back to the driver in order as Arrow tables (a few hundred bytes
an input), where the local engine's part writer makes them exactly-once; a segmentation's label maps are written by
the actors themselves, so on a cluster ``masks`` must be storage every node sees.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np

from lepton.batch.rows import Predictor, decode
from lepton.batch.sources import Input
from lepton.errors import ConfigError

log = logging.getLogger("lepton.batch")

#: Inputs handed to Ray per dataset (the driver holds at most this many paths at once).
WINDOW = 50_000
#: Inputs per decoding task.
DECODE_BATCH = 32


def decode_batch(batch: dict[str, np.ndarray], spec: dict[str, Any], on_grid: bool) -> dict[str, np.ndarray]:
    """A Ray task: a batch of paths decoded as the local engine decodes them, each pickled whole (frames of any
    shape, or the error) into a binary column."""
    out = [pickle.dumps(decode(Input(str(p), str(t) or None, str(r) or None), spec, on_grid), protocol=5)
           for p, t, r in zip(batch["path"], batch["truth"], batch["root"], strict=True)]
    return {"path": batch["path"], "decoded": np.array(out, dtype=object)}


class ModelActor:
    """One model replica in Ray's actor pool: the run loaded once, answering decoded batches with the output's rows
    as an Arrow table."""

    def __init__(self, predictor: Predictor, threads: int = 1) -> None:
        import ray
        import torch

        from lepton.batch.rows import schema

        torch.set_num_threads(max(1, threads))
        if isinstance(predictor, ray.ObjectRef):  # the run is put in Ray's object store once, fetched per actor
            predictor = ray.get(predictor)
        self.predictor = predictor
        self.schema = schema(predictor.run)

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        decoded = [pickle.loads(b) for b in batch["decoded"]]
        return pa.Table.from_pylist(self.predictor.rows(decoded), schema=self.schema)


def ray_batches(predictor: Predictor, pending: Iterator[Input], *, workers: int, address: str | None = None,
                cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, window: int = WINDOW) -> Iterator[Any]:
    """Arrow tables of whole inputs' rows for ``pending``, computed on Ray (connected to ``address``, or the Ray
    this process already joined, or a new local one)."""
    try:
        import ray
        import ray.data
    except ImportError as exc:  # pragma: no cover - the ray extra is missing
        raise ConfigError("--engine ray needs Ray Data: pip install 'lepton-imaging[ray]'") from exc

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows in input order, as the local engine writes them
    ctx.enable_progress_bars = False  # the job's own bar counts inputs
    ctx.print_on_execution_start = False
    compute = ray.data.ActorPoolStrategy(size=max(1, workers))
    predictor_ref = ray.put(predictor)
    carry = None
    while True:
        items = list(islice(pending, window))
        if not items:
            break
        ds = ray.data.from_items([{"path": i.path, "truth": i.truth or "", "root": i.root or ""} for i in items],
                                 override_num_blocks=max(min(len(items), max(1, workers)),
                                                     min(len(items) // DECODE_BATCH, 4 * max(1, workers))))
        # With GPU actors, decoding runs as its own Ray tasks spread over the nodes' CPUs; with CPU actors Ray fuses it
        # into the actors (each decodes the batches it answers: no decoded tensors through the object store).
        spread = {"scheduling_strategy": "SPREAD"} if gpus_per_actor else {}
        ds = ds.map_batches(decode_batch, fn_kwargs={"spec": predictor.spec, "on_grid": predictor.on_grid},
                            batch_size=1 if predictor.on_grid else DECODE_BATCH, batch_format="numpy", num_cpus=1,
                            **spread)
        ds = ds.map_batches(ModelActor, fn_constructor_args=(predictor_ref, max(1, int(cpus_per_actor))),
                            batch_size=1 if predictor.on_grid else predictor.batch_size, batch_format="numpy",
                            compute=compute, num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None)
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            whole, carry = _whole_inputs(table, carry)
            if whole is not None and whole.num_rows:
                yield whole
    if carry is not None and carry.num_rows:
        yield carry


def _whole_inputs(table, carry):
    """Split rows so a multi-frame input's rows are never yielded apart (a part holds whole inputs): the rows up to
    the last input's first frame, with the previous remainder before them; and the new remainder."""
    import pyarrow as pa

    if carry is not None:
        table = pa.concat_tables([carry, table.cast(carry.schema)])
    frames = np.asarray(table.column("frame").to_numpy(zero_copy_only=False))
    starts = np.flatnonzero(frames == 0)
    if not len(starts):
        return None, table
    last = int(starts[-1])
    return table.slice(0, last), table.slice(last)
