"""Recent seconds per pass, per model and method, as the server measured its own answers.

The viewer estimates a run's time before it is sent (passes x seconds per pass, GET /v1/timings); the
Prometheus families do not give it, since they count batches and images, not passes. Each answered image
adds (its passes, the compute time of the batch it ran in): for an image batched with others this
overstates the time per pass, which is what that image waited, so an estimate from it errs on the long side.
Images answered from the cache ran no pass and add nothing.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

RECENT_IMAGES = 20  # per model and method: smooths one slow batch, yet follows a change of load


@dataclass(frozen=True)
class PassRate:
    model: str
    method: str
    seconds_per_pass: float
    images: int  # how many recent images the figure is from


class RecentTimings:
    """Thread-safe: the encoder threads record, the event loop reads."""

    def __init__(self, keep: int = RECENT_IMAGES) -> None:
        self._keep = keep
        self._recent: dict[tuple[str, str], deque[tuple[int, float]]] = {}
        self._lock = threading.Lock()

    def record(self, model: str, method: str, passes: int, seconds: float) -> None:
        if passes <= 0 or not seconds > 0:
            return
        with self._lock:
            self._recent.setdefault((model, method), deque(maxlen=self._keep)).append((passes, seconds))

    def seconds_per_pass(self, model: str, method: str) -> float | None:
        """The recent figure for one model and method; None before its first answer."""
        with self._lock:
            values = list(self._recent.get((model, method), ()))
        return _per_pass(values) if values else None

    def rates(self) -> list[PassRate]:
        with self._lock:
            recent = {key: list(values) for key, values in self._recent.items()}
        return [PassRate(model, method, _per_pass(values), len(values))
                for (model, method), values in sorted(recent.items())]


def _per_pass(values: list[tuple[int, float]]) -> float:
    """Seconds per pass over recent (passes, seconds) records."""
    return sum(s for _, s in values) / sum(p for p, _ in values)
