"""What the ingress sends an explainer replica for one item, and what comes back (plain, picklable)."""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from ..engine import ImageExplanation
from ..errors import ServiceError
from ..evidence.spec import MetricsParams
from ..methods import MethodParams


@dataclass
class RemoteItem:
    """One item (one image of a call) on its way to a replica. Only items with equal `key` share a batch."""

    key: Hashable  # (model, method, params as JSON)
    method: str
    params: MethodParams
    pixels: torch.Tensor  # (3, H, W), preprocessed on the ingress
    target: int | None
    cost: int  # forward+backward passes per image for the batch budget (capped at max_batch_cost)
    deadline: float  # wall clock (time.time()) by which the work must start, else DeadlineExceeded
    job_id: str
    index: int  # the image's position in its call
    bulk: bool = False  # long work: the replica's bulk lane
    raw: bool = False  # the caller asked for the signed attribution (else it is not sent back)
    size: tuple[int, int] | None = None  # (height, width) the map is wanted at: resized on the replica
    metrics: MetricsParams | None = None  # the per-map metrics (part of the batch key)


@dataclass
class Outcome:
    """A replica's answer for one item: the explanation or a service error (pickled whole), and how long its
    batch took."""

    result: ImageExplanation | None = None
    error: ServiceError | None = None
    compute_s: float = 0.0
    replica: str = ""


def batch_cost(items: list[Any]) -> int:
    """`@serve.batch`'s size function: a batch is full when its images' passes reach max_batch_cost."""
    return sum(item.cost for item in items)
