"""The batching work queue: generic over what a batch does (the backend supplies the runner)."""

from service.worker.collate import Collation, collate
from service.worker.item import Item
from service.worker.pool import Runner, WorkerPool, WorkerStats, default_is_oom

__all__ = ["Collation", "Item", "Runner", "WorkerPool", "WorkerStats", "collate", "default_is_oom"]
