"""The result cache stays within its byte budget, evicting least recently used entries."""
from __future__ import annotations

import torch

from service.cache import ResultCache
from service.engine import ImageExplanation


def entry(pixels: int, with_attribution: bool = True) -> ImageExplanation:
    return ImageExplanation(target=0, label="x", probability=1.0, top_k=[], heatmap=torch.zeros(pixels),
                            attribution=torch.zeros(3 * pixels) if with_attribution else None)


def test_lru_eviction_within_the_budget():
    cache = ResultCache(max_bytes=3 * (4 * 4000 + 1024))  # room for three 1000-pixel entries
    for key in range(5):
        cache.put(key, entry(1000))
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 3 and cache.get(0, False) is None and cache.get(4, False) is not None
    cache.get(2, False)  # 2 becomes the most recent
    cache.put(5, entry(1000))
    assert cache.get(2, False) is not None and cache.get(3, False) is None


def test_an_entry_without_attribution_does_not_answer_a_raw_request():
    cache = ResultCache(max_bytes=10**6)
    cache.put("k", entry(10, with_attribution=False))
    assert (cache.get("k", need_attribution=True) is None
            and cache.get("k", need_attribution=False) is not None)
    assert (cache.hits, cache.misses) == (1, 1)


def test_disabled_cache_holds_nothing():
    cache = ResultCache(max_bytes=0)
    cache.put("k", entry(10))
    assert len(cache) == 0 and cache.get("k", False) is None
