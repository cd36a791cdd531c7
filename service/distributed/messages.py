"""What the ingress sends an explainer replica for one image, and what comes back (plain, picklable)."""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from ..engine import ImageExplanation
from ..methods import MethodParams


@dataclass
class Task:
    """One image to explain. Only tasks with equal `key` share an engine batch (as in the embedded queue)."""

    key: Hashable  # (model, method, params as JSON)
    method: str
    params: MethodParams
    pixels: torch.Tensor  # (3, H, W), preprocessed on the ingress
    target: int | None
    cost: int  # forward+backward passes per image for the batch budget (capped at max_batch_cost)
    deadline: float  # wall clock (time.time()) by which the work must start, else 504
    job_id: str
    index: int  # the image's position in its request
    bulk: bool = False  # long work: the replica's second lane, as the embedded bulk worker
    raw: bool = False  # the caller asked for the signed attribution (else it is not sent back)
    size: tuple[int, int] | None = None  # (height, width) the map is wanted at: resized on the replica


# Errors cross the process boundary as (kind, message): exceptions with custom constructors do not pickle.
DEADLINE, CANCELLED, INVALID, INTERNAL = "deadline_exceeded", "cancelled", "invalid", "internal"


@dataclass
class Outcome:
    """A replica's answer for one task: the explanation or an error, and how long its batch took."""

    result: ImageExplanation | None = None
    error: tuple[str, str] | None = None  # (DEADLINE | CANCELLED | INVALID | INTERNAL, message)
    compute_s: float = 0.0
    replica: str = ""


def batch_cost(tasks: list[Any]) -> int:
    """`@serve.batch`'s size function: a batch is full when its images' passes reach max_batch_cost."""
    return sum(task.cost for task in tasks)
