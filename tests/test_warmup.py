"""GPU pass shapes: padding sizes, and the warm-up that runs in each pass thread before the server is
ready."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import torch

from service.engine import pass_sizes
from service.methods.base import padded_size
from service.settings import Settings
from service.warmup import warm_sizes, warm_up


def test_pass_sizes_are_powers_of_two_then_multiples_of_32_up_to_the_budget_on_a_gpu_only():
    assert pass_sizes(torch.device("cuda"), 256) == (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256)
    assert pass_sizes(torch.device("cuda"), 48) == (1, 2, 4, 8, 16, 32, 48)
    assert pass_sizes(torch.device("cuda"), 12) == (1, 2, 4, 8, 12)
    assert pass_sizes(torch.device("cuda"), 1) == (1,)
    assert pass_sizes(torch.device("cpu"), 256) == ()
    # 9, beyond the sizes: as is
    assert [padded_size(n, (1, 2, 4, 8)) for n in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, 9]


def test_warm_sizes_cover_every_batch_the_queue_can_form():
    gpu = SimpleNamespace(device=torch.device("cuda"))
    sizes = warm_sizes(gpu, 256, Settings(max_batch_items=32))
    assert sizes == [1, 2, 4, 8, 16, 32]
    assert {padded_size(n, pass_sizes(gpu.device, 256)) for n in range(1, 33)} == set(sizes)
    assert warm_sizes(gpu, 256, Settings(max_batch_items=20)) == [1, 2, 4, 8, 16, 32]
    assert warm_sizes(gpu, 24, Settings(max_batch_items=32)) == [1, 2, 4, 8, 16, 24]


def test_warm_up_on_a_cpu_runs_two_passes_at_the_pass_batch_when_memory_is_retained(registry, monkeypatch):
    # What the passes do to the heap is measured in tests/test_hostmem.py; here, what runs.
    import service.warmup as warmup_module

    sizes = []
    monkeypatch.setattr(warmup_module, "explain",
                        lambda model, method, x, targets, params, max_batch: sizes.append(
                            (model.name, x.shape[0], max_batch)))
    pass_batch = {name: 3 for name in registry.models}
    assert warm_up(registry.models, pass_batch, Settings(retain_host_memory=False)) == 0
    assert warm_up(registry.models, pass_batch, Settings()) == 2 * len(registry.models)
    assert sorted(sizes) == sorted((name, 3, 3) for name in registry.models for _ in range(2))


def test_the_runtime_warms_the_pass_thread_before_it_is_ready(registry, monkeypatch):
    # The cuDNN plan cache is per thread, so the warm-up must run in the lanes' worker threads themselves. On
    # a CPU only the interactive lane's: the bulk lane's passes run in passing threads (service/host.py).
    import service.engine_core
    from service.backends import EmbeddedBackend
    from service.runtime import Runtime

    threads, release = [], threading.Event()

    def fake_warm_up(models, pass_batch, settings):
        threads.append(threading.current_thread().name)
        release.wait(10)
        return 1

    monkeypatch.setattr(service.engine_core, "warm_up", fake_warm_up)
    settings = Settings(device="cpu", retain_host_memory=False)
    runtime = Runtime(settings, EmbeddedBackend(settings, registry))
    try:
        runtime.start()
        deadline = time.monotonic() + 10
        while not threads and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # room for a wrong second warm-up to show
        assert [name.rsplit("-", 1)[0] for name in threads] == ["interactive-cpu"]
        assert not runtime.ready  # loaded, but the lanes are still warming
        release.set()
        while not runtime.ready and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runtime.ready
    finally:
        release.set()
        runtime.stop(grace=1)
