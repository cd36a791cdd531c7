"""What bounds the detection calls waiting and running, as a lane's queue bounds a classifier's.

A detection call holds its decoded images (up to `max_side` on the longer side, float32) from its start until
it is answered, and waits for one of the detection threads (calls.py): without a bound, a burst of D-RISE
calls would queue without end and hold their images meanwhile. So a call is admitted only while the images
of the detection calls admitted and not yet answered stay within `max_queue` (one call alone is always
admitted; `max_images` bounds it), and its uploads' pixels within the server's in-flight pixel
budget (the one the classifiers' calls share). Otherwise the call gets a 429 whose Retry-After is the time
the work admitted ahead should take: its passes (D-RISE's masks) at the recent seconds per pass.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from ..errors import Busy

# Seconds per pass when the server has answered nothing for the model and method yet: a CPU detector's
# forward on one masked image, on the order of the MTCNN's (docs/benchmarks.md, D-RISE)
UNMEASURED_SECONDS_PER_PASS = 0.05

SecondsPerPass = Callable[[str, str], float | None]  # (model, method) -> the recent figure, None: none yet


class DetectionAdmission:
    """Thread-safe: calls are admitted on the event loop and released from the detection threads."""

    def __init__(self) -> None:
        self.images = 0  # of the calls admitted and not yet answered
        self._passes: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def admit(self, model: str, method: str, images: int, passes: int, limit: int,
              seconds_per_pass: SecondsPerPass) -> None:
        """Count the call in (`passes`: all of its images'), or raise Busy with the expected wait."""
        with self._lock:
            if self.images and self.images + images > limit:
                ahead = sum(p * (seconds_per_pass(*key) or UNMEASURED_SECONDS_PER_PASS)
                            for key, p in self._passes.items())
                raise Busy(f"the detection calls admitted hold {self.images} images and this one {images}; "
                           f"the limit is {limit} (setting max_queue): retry after {max(1.0, ahead):.0f}s",
                           retry_after=max(1.0, ahead))
            self.images += images
            self._passes[model, method] = self._passes.get((model, method), 0) + passes

    def release(self, model: str, method: str, images: int, passes: int) -> None:
        with self._lock:
            self.images -= images
            left = self._passes.get((model, method), 0) - passes
            if left > 0:
                self._passes[model, method] = left
            else:
                self._passes.pop((model, method), None)
