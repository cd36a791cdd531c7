"""A bounded in-memory LRU of explanations: a repeated request costs no model pass.

Keyed by (image content hash, model, method, params, target); sized by the bytes of the tensors it holds.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable

from .engine import ImageExplanation


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _size(entry: ImageExplanation) -> int:
    size = entry.heatmap.numel() * entry.heatmap.element_size() + 1024  # + labels, top-k, diagnostics
    for tensor in (entry.attribution, entry.sized_heatmap):
        if tensor is not None:
            size += tensor.numel() * tensor.element_size()
    return size


class ResultCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[ImageExplanation, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, need_attribution: bool) -> ImageExplanation | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None or (need_attribution and found[0].attribution is None):
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found[0]

    def put(self, key: Hashable, entry: ImageExplanation) -> None:
        size = _size(entry)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._entries[key] = (entry, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped

    def __len__(self) -> int:
        return len(self._entries)
