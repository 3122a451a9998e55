"""Dynamic batching: requests are grouped up to ``max_batch_size`` or ``max_wait_ms`` (or, with ``idle_ms``,
until arrivals pause) and run off the event loop in worker threads (one per model version unless ``concurrency``
says more); a bounded queue sheds load with QueueFull. A dense task's requests batch their sliding windows instead
(``window_submitter``): the windows of every request in flight share forward passes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _share_cores(concurrency: int) -> None:
    """In a model thread of a batcher that runs ``concurrency`` batches at once: PyTorch's intra-op threads for
    this thread only (OpenMP's thread count is per calling thread), so side-by-side calls split the cores instead
    of each spinning up all of them (measured +30 % requests/s without batching)."""
    import sys

    if concurrency > 1 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(max(1, _cores() // concurrency))


def _yield_to_event_loop() -> None:
    """Lower the model thread's CPU priority (its OpenMP workers inherit it) so the event loop, which feeds
    the batches, is never starved by a running batch; Linux only, a no-op elsewhere or when refused."""
    import os
    import threading

    try:
        tid, nice = threading.get_native_id(), int(os.environ.get("LEPTON_MODEL_NICE", "10"))
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:  # only ever lower the priority
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except (AttributeError, OSError, ValueError):
        pass


def model_concurrency(max_batch_size: int) -> int:
    """Batches that may run at once by default: one when batching (a batch uses every core), one per core when
    ``max_batch_size`` is 1 (a single image's forward pass leaves cores idle)."""
    return 1 if max_batch_size > 1 else _cores()


class QueueFull(Exception):
    """The batcher's queue is at capacity: the client should retry later (HTTP 503)."""


@dataclass
class _Item:
    pixels: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, prepare: Callable[[list[np.ndarray]], np.ndarray], predict: Callable[[np.ndarray], np.ndarray],
                 *, max_batch_size: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256,
                 idle_ms: float = 0.0, on_batch: Callable[[int, float], None] | None = None, concurrency: int = 1):
        self.prepare, self.predict = prepare, predict
        self.max_batch_size, self.max_wait = max(1, max_batch_size), max_wait_ms / 1000
        self.max_queue = max_queue
        # With idle_ms > 0 a batch also closes once no request has arrived for that long, so max_wait_ms can
        # be generous under load (large batches) without making a lone request wait for all of it.
        self.idle = idle_ms / 1000 if idle_ms > 0 else None
        self.on_batch = on_batch
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        # Batches that may run at once. One suits batching (a batch uses every core); without batching, single
        # requests run side by side as a plain threaded endpoint's would, or the cores idle between small calls.
        self.concurrency = max(1, concurrency)
        self.executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="lepton-model",
                                           initializer=self._init_thread)
        self.in_flight = 0  # requests in the batch being formed
        self.running = 0  # requests in batches running now
        self._slots: asyncio.Semaphore | None = None
        self._running_tasks: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None

    def _init_thread(self) -> None:
        _yield_to_event_loop()
        _share_cores(self.concurrency)

    def start(self) -> None:
        self._slots = asyncio.Semaphore(self.concurrency)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    @property
    def depth(self) -> int:
        return self.queue.qsize() + self.in_flight + self.running

    async def submit(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities for one decoded image; raises QueueFull when the queue is at capacity."""
        if self.queue.qsize() >= self.max_queue:
            raise QueueFull
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Item(pixels, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.concurrency > 1:  # a free slot first: while all are busy, requests wait (and batch) in the queue
                await self._slots.acquire()
            first = await self.queue.get()
            self.in_flight = 1  # counted before the queue looks empty, so a drain never misses it
            items = [first]
            deadline = first.enqueued + self.max_wait
            while len(items) < self.max_batch_size:
                if not self.queue.empty():  # whatever is already waiting joins, however old the batch is
                    items.append(self.queue.get_nowait())
                    self.in_flight = len(items)
                    continue
                timeout = deadline - time.perf_counter()
                if timeout <= 0:
                    break
                if self.idle is not None:
                    timeout = min(timeout, self.idle)
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), timeout))
                    self.in_flight = len(items)
                except TimeoutError:
                    break
            self.in_flight, self.running = 0, self.running + len(items)  # one update: depth never dips
            if self.concurrency == 1:
                await self._dispatch(items)
            else:
                task = loop.create_task(self._dispatch(items, release=True))
                self._running_tasks.add(task)  # referenced until done
                task.add_done_callback(self._running_tasks.discard)

    async def _dispatch(self, items: list[_Item], release: bool = False) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            probs = await loop.run_in_executor(self.executor, self._run, [i.pixels for i in items])
            for item, row in zip(items, probs, strict=True):
                if not item.future.done():
                    item.future.set_result(row)
        except Exception as exc:  # a model failure fails this batch's requests, not the server
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
        finally:
            self.running -= len(items)
            if release:
                self._slots.release()
        if self.on_batch:
            self.on_batch(len(items), time.perf_counter() - start)

    def _run(self, images: list[np.ndarray]) -> np.ndarray:
        return self.predict(self.prepare(images))

    def window_submitter(self, loop: asyncio.AbstractEventLoop) -> Callable:
        """A callable for a thread that slides over one request's image (MONAI's sliding-window inference): each
        batch of windows it is given joins this batcher's queue, window by window, so windows of concurrent
        requests share forward passes; it blocks until their outputs are back (QueueFull when the queue is full)."""

        def run(windows):
            import torch

            arrays = np.ascontiguousarray(windows.detach().float().cpu().numpy())
            futures = [asyncio.run_coroutine_threadsafe(self.submit(w), loop) for w in arrays]
            return torch.from_numpy(np.stack([f.result() for f in futures]))

        return run

    async def drain_and_stop(self, timeout: float = 30.0) -> None:
        """Wait until queued and running requests are answered, then stop (used by hot swaps)."""
        deadline = time.perf_counter() + timeout
        while self.depth and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        if self._task:
            self._task.cancel()
        self.executor.shutdown(wait=False)
