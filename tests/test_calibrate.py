from __future__ import annotations

import pytest
import torch

from service.calibrate import (
    calibrate,
    calibrate_lane,
    hold_process_to_lane_share,
    lane_share,
    largest_activation_bytes,
    measure_peaks,
    pass_batch_from_peaks,
    process_memory_fraction,
)
from service.settings import Settings


def test_pass_batch_from_two_measurements():
    # 100 MB fixed + 30 MB per image; 8 GB free, half of it usable -> (4000 - 100) / 30 = 130 images
    mb = 10**6
    peaks = {1: 130 * mb, 4: 220 * mb}
    assert pass_batch_from_peaks(peaks, 8000 * mb, 0.5, cap=1000) == 130
    assert pass_batch_from_peaks(peaks, 8000 * mb, 0.5, cap=64) == 64  # the setting caps it
    assert pass_batch_from_peaks(peaks, 100 * mb, 0.5, cap=64) == 1  # never below one image


def test_each_lane_gets_half_of_the_memory_fraction():
    # Two lanes can each be mid-pass at once: together they stay within the setting.
    assert lane_share(Settings(gpu_memory_fraction=0.8)) == pytest.approx(0.4)
    mb = 10**6
    peaks = {1: 130 * mb, 4: 220 * mb}
    one_lane = pass_batch_from_peaks(peaks, 8000 * mb, lane_share(Settings()), cap=1000)
    assert one_lane == (0.4 * 8000 - 100) // 30
    assert 2 * (100 + one_lane * 30) <= 0.8 * 8000


def test_an_engine_process_keeps_its_weights_and_its_lane_share_of_the_free_memory():
    gib = 2**30
    # 80 GiB device, 2 GiB in this process's allocator (its weights), 70 GiB free: 2 + 0.4 * 70 = 30 GiB.
    assert process_memory_fraction(2 * gib, 70 * gib, 80 * gib, 0.4) == pytest.approx(30 / 80)
    assert process_memory_fraction(0, 80 * gib, 80 * gib, 1.0) == 1.0  # never above the whole device
    assert hold_process_to_lane_share(torch.device("cpu"), Settings()) is None  # nothing to cap on a CPU


def test_cpu_models_use_the_cpu_setting_within_the_cap(registry):
    assert calibrate(registry.models, cap=48, cpu_pass_batch=8) == {name: 8 for name in registry.models}
    assert calibrate(registry.models, cap=4, cpu_pass_batch=8) == {name: 4 for name in registry.models}
    assert calibrate_lane(registry.models, Settings(cpu_pass_batch=6)) == {name: 6
                                                                           for name in registry.models}


def test_cpu_passes_keep_the_largest_activation_below_the_host_block_limit(registry):
    largest = {name: largest_activation_bytes(model) for name, model in registry.models.items()}
    assert largest["efficientnet_lite0"] == 96 * 112 * 112 * 4  # blocks.1.0's expansion, per image
    limit = 3 * largest["tiny_cnn"] + 4096  # room for three, with the allocator's slack
    assert calibrate(registry.models, cap=48, cpu_pass_batch=8, host_block_limit=limit) == {
        "tiny_cnn": 3, "efficientnet_lite0": 1}  # never below one image
    # The server's settings: glibc's 32 MiB when freed memory is retained (6 x 4.8 MB fit), the setting when
    # not.
    assert calibrate_lane(registry.models, Settings()) == {"tiny_cnn": 8, "efficientnet_lite0": 6}
    assert calibrate_lane(registry.models, Settings(retain_host_memory=False)) == {name: 8
                                                                                   for name in largest}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_peaks_grow_with_batch(registry):
    from service.zoo import load_model
    from tests.conftest import MODELS

    model = load_model(registry.models["efficientnet_lite0"].card, MODELS, torch.device("cuda"))
    peaks = measure_peaks(model)
    assert peaks[4] > peaks[1] > 0


@pytest.mark.parametrize("enabled", [True, False])
def test_the_runtime_sets_cudnn_autotuning_from_its_setting(registry, enabled):
    # Off by default: a batching server's pass sizes keep changing, and cuDNN times kernels for each new one.
    from service.backends import EmbeddedBackend
    from service.runtime import Runtime
    from service.settings import Settings

    assert Settings().cudnn_benchmark is False
    before = torch.backends.cudnn.benchmark
    settings = Settings(cudnn_benchmark=enabled, device="cpu", retain_host_memory=False)
    runtime = Runtime(settings, EmbeddedBackend(settings, registry))
    try:
        runtime.start()
        assert torch.backends.cudnn.benchmark is enabled
    finally:
        runtime.stop(grace=1)
        torch.backends.cudnn.benchmark = before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_process_cap_leaves_room_for_the_other_lane():
    device = torch.device("cuda")
    try:
        fraction = hold_process_to_lane_share(device, Settings(gpu_memory_fraction=0.5))
        assert 0.0 < fraction < 0.5
        free, total = torch.cuda.mem_get_info(device)
        with pytest.raises(torch.OutOfMemoryError):  # more than this process's share: refused, not taken
            torch.empty(int(0.6 * free), dtype=torch.uint8, device=device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
        torch.cuda.empty_cache()


def test_the_process_cap_names_the_device_by_index(monkeypatch):
    # The server's device setting is a bare "cuda"; PyTorch's cap refuses a device without an index, which
    # kept every engine process from starting on the first GPU run of worker=process. The CUDA calls are
    # stood in for here, so the call's arguments are checked on a CPU.
    calls = []
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 4 * gib)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: calls.append((fraction, device)))
    for name, index in (("cuda", 0), ("cuda:1", 1)):
        fraction = hold_process_to_lane_share(torch.device(name), Settings(gpu_memory_fraction=0.8))
        assert calls[-1] == (fraction, index)
        assert fraction == pytest.approx((4 + 0.4 * 60) / 80)
