"""The batching work queue: generic over what a batch does (the engine supplies the runner)."""

from service.worker.collate import Collation, collate
from service.worker.job import DeadlineExceeded, QueueFull, WorkerStopped, WorkItem
from service.worker.pool import Runner, WorkerPool, WorkerStats, default_is_oom

__all__ = [
    "Collation",
    "DeadlineExceeded",
    "QueueFull",
    "Runner",
    "WorkItem",
    "WorkerPool",
    "WorkerStats",
    "WorkerStopped",
    "collate",
    "default_is_oom",
]
