"""The embedded backend: two lanes on this machine's device, each a worker pool (service/worker/) whose
batches run in this process (a thread, through the engine core) or in an engine process of the lane's own
(`worker=process`, service/engine_process.py)."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from prometheus_client import CollectorRegistry

from ..engine import ImageExplanation
from ..engine_core import Batch, EngineCore, boot_host
from ..engine_process import EngineProcess
from ..errors import Cancelled
from ..host import passes_in_passing_threads, run_in_passing_thread
from ..jobs import Job, JobStore, LocalJobs
from ..metrics import WorkerMetrics
from ..settings import Settings
from ..worker import Item, WorkerPool
from ..zoo import ModelRegistry, resolve_device
from .base import LANES, CallItem

log = logging.getLogger(__name__)


class Lane:
    """One lane on the device: its queue and worker (a pool), and under worker=process its engine process."""

    def __init__(self, name: str, pool: WorkerPool, engine: EngineProcess | None):
        self.name, self.pool, self.engine = name, pool, engine
        self.warmed = threading.Event()  # its pass thread has run its warm-up (a no-op off a GPU)

    @property
    def restarts(self) -> int:
        """Worker threads restarted, plus engine processes started again."""
        return self.pool.stats.restarts + (self.engine.restarts if self.engine else 0)


class EmbeddedBackend:
    submits_from_threads = True

    def __init__(self, settings: Settings, registry: ModelRegistry | None = None):
        self.settings = settings
        self.device = resolve_device(settings.device)
        # Where the passes run: a thread of this process, or a child process per lane
        # (service/engine_process.py).
        self.isolated = settings.worker == "process" or (settings.worker == "auto"
                                                         and self.device.type == "cuda")
        if self.isolated and registry is not None:
            raise ValueError("worker=process: the engine processes load the models from models_dir; "
                             "pass no registry")
        self.preloaded = registry is not None
        self._given = registry
        self.core: EngineCore | None = None  # in this process (not isolated), once booted
        self.lanes = {name: Lane(name, self._pool(name), EngineProcess(settings.model_dump_json(),
                                                                        f"engine-{name}-{self.device}")
                                 if self.isolated else None)
                      for name in LANES}
        self._loaded = threading.Event()
        self._stopping = False
        self.metrics: WorkerMetrics | None = None
        # Fault injection for tests: called with each batch before it runs (may raise, e.g. a fake CUDA OOM).
        self.fault_hook: Callable[[list[Item]], None] | None = None

    def _pool(self, lane: str) -> WorkerPool:
        s = self.settings
        return WorkerPool(lambda items: self._run_batch(items, lane), max_queue=s.max_queue,
                          max_cost=s.max_batch_cost, max_items=s.max_batch_items,
                          max_wait=s.max_wait_ms / 1000, name=f"{lane}-{self.device}",
                          on_batch=self._on_batch, watchdog_interval=s.watchdog_s,
                          on_thread_start=lambda: self._warm_thread(lane))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if not self.isolated:  # this process runs the passes: tune it before its threads start
            boot_host(self.settings, self.device)
        for lane in self.lanes.values():
            lane.pool.start()

    def boot(self) -> ModelRegistry:
        try:
            if self.isolated:
                # the models here only serve validation and preprocessing: keep them off the device
                only = set(self.settings.models) if self.settings.models else None
                registry = ModelRegistry.from_dir(self.settings.card_dirs, torch.device("cpu"), only,
                                                  self.settings.fold_batchnorm)
                engines = [lane.engine for lane in self.lanes.values() if lane.engine is not None]
                with ThreadPoolExecutor(len(engines)) as starting:
                    list(starting.map(EngineProcess.start, engines))
                return registry
            self.core = EngineCore.boot(self.settings, registry=self._given)
            return self.core.registry
        finally:
            self._loaded.set()

    def _warm_thread(self, lane: str) -> None:
        """In a lane's worker thread, before it serves: once the models are loaded, warm this thread's GPU
        pass shapes (service/warmup.py). Engine processes warm their own main thread instead."""
        try:
            while not self._loaded.wait(0.5):
                if self._stopping:
                    return
            passing = passes_in_passing_threads(lane, self.device)  # then nothing to warm: service/host.py
            if self.core is not None and not passing:
                self.core.warm_up()
        finally:
            self.lanes[lane].warmed.set()

    def stop(self, grace: float) -> None:
        self._stopping = True
        for lane in self.lanes.values():
            lane.pool.stop(grace)
        for lane in self.lanes.values():
            if lane.engine is not None:
                lane.engine.stop(grace)

    @property
    def workers_alive(self) -> bool:
        return all(lane.pool.alive for lane in self.lanes.values())

    @property
    def warmed(self) -> bool:
        return all(lane.warmed.is_set() for lane in self.lanes.values())

    def serving_device(self) -> str:
        return str(self.device)

    # ------------------------------------------------------------------ work
    def submit(self, item: Item, lane: str) -> None:
        self.lanes[lane].pool.submit(item)

    def retry_after(self, lane: str) -> float:
        return self.lanes[lane].pool.retry_after()

    def start_estimate(self, lane: str) -> float | None:
        return self.lanes[lane].pool.start_estimate(stopping=lambda item: item.payload.job.cancelled)

    def withdraw(self, job: Job) -> None:
        """Nothing runs out of the lifecycle's reach here: it cancels the items' futures itself."""

    def _run_batch(self, items: list[Item], lane: str) -> list[ImageExplanation]:
        """Runs on the lane's worker thread, except the bulk lane's torch work on a CPU, which runs in a
        thread that ends with the batch (service/host.py)."""
        if not self.isolated and passes_in_passing_threads(lane, self.device):
            return run_in_passing_thread(self._run_batch_here, items, lane)
        return self._run_batch_here(items, lane)

    def _run_batch_here(self, items: list[Item], lane: str) -> list[ImageExplanation]:
        """Items share model, method and params (their key says so)."""
        parts: list[CallItem] = [item.payload for item in items]
        call = parts[0].call

        def progress(done: int, total: int) -> None:
            for part in parts:
                part.job.progress_for(part.index)(done, total)
            if all(part.job.cancelled for part in parts):
                raise Cancelled()

        for part in parts:  # "running" from now on, even for methods that report progress only at the end
            part.job.started = True
            part.call_started()
        if self.fault_hook is not None:
            self.fault_hook(items)
        engine = self.lanes[lane].engine
        pixels = torch.stack([part.call.pixels[part.index] for part in parts])
        batch = Batch(call.model.name, call.method.name, call.params,
                      pixels.numpy() if engine is not None else pixels,
                      [part.call.targets[part.index] for part in parts],
                      ["raw" in part.call.outputs for part in parts],
                      [part.call.original_size(part.index) for part in parts], call.metrics)
        started = time.monotonic()
        if engine is not None:
            results = engine.run(batch, progress)
        else:
            assert self.core is not None, "a batch ran before the models were loaded"
            results = self.core.run_batch(batch, progress)
        for part in parts:  # recorded before the pool resolves the futures: encoding reads it
            part.compute_s = time.monotonic() - started
        return results

    # ------------------------------------------------------------------ jobs and metrics
    def job_book(self, store: JobStore) -> LocalJobs:
        return LocalJobs(store)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self.metrics = WorkerMetrics(registry)

    def _on_batch(self, items: list[Item], duration: float) -> None:
        if self.metrics is None:
            return
        method = items[0].payload.call.method.name
        self.metrics.batch_size.labels(method).observe(len(items))
        self.metrics.compute.labels(method).observe(duration)

    async def refresh_metrics(self) -> None:
        m = self.metrics
        if m is None:
            return
        for lane in self.lanes.values():
            m.queue_depth.labels(lane.pool.name).set(lane.pool.depth)
            m.worker_restarts.labels(lane.pool.name).set(lane.restarts)
        if self.isolated:  # the engine processes report theirs with each batch; this process holds no device
            m.device_memory.labels(str(self.device)).set(
                sum(lane.engine.device_memory for lane in self.lanes.values() if lane.engine is not None))
        else:
            m.sample_device(self.device)
