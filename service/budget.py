"""Decoded pixels held by calls in flight, bounded.

The queue counts images, and one image may hold 40 MP: a few hundred queued photos, each decoded and later
answered with maps at its own size, would take tens of GB. Calls beyond the budget get a 429, as for a full
queue, and the clients retry.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future


class PixelBudget:
    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def hold(self, pixels: int) -> bool:
        """Reserve `pixels`, or refuse. A call alone is always admitted (max_request_pixels bounds it), so a
        budget below one request's size slows callers down instead of refusing them for good."""
        with self._lock:
            if self.held and self.held + pixels > self.limit:
                return False
            self.held += pixels
            return True

    def release(self, pixels: int) -> None:
        with self._lock:
            self.held -= pixels

    def release_when_done(self, pixels: int, futures: Sequence[Future]) -> None:
        """Release `pixels` once every future is done (finished, failed or cancelled), whoever waits on
        them."""
        remaining = [len(futures)]
        lock = threading.Lock()

        def one_done(_: Future) -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                self.release(pixels)

        if not futures:
            self.release(pixels)
        for future in futures:
            future.add_done_callback(one_done)
