from __future__ import annotations

import pytest
import torch

from service.calibrate import calibrate, measure_peaks, pass_batch_from_peaks


def test_pass_batch_from_two_measurements():
    # 100 MB fixed + 30 MB per image; 8 GB free, half of it usable -> (4000 - 100) / 30 = 130 images
    mb = 10**6
    peaks = {1: 130 * mb, 4: 220 * mb}
    assert pass_batch_from_peaks(peaks, 8000 * mb, 0.5, cap=1000) == 130
    assert pass_batch_from_peaks(peaks, 8000 * mb, 0.5, cap=64) == 64  # the setting caps it
    assert pass_batch_from_peaks(peaks, 100 * mb, 0.5, cap=64) == 1  # never below one image


def test_cpu_models_use_the_cpu_setting_within_the_cap(registry):
    assert calibrate(registry.models, cap=48, cpu_pass_batch=8) == {name: 8 for name in registry.models}
    assert calibrate(registry.models, cap=4, cpu_pass_batch=8) == {name: 4 for name in registry.models}


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
    from service.runtime import Runtime
    from service.settings import Settings

    assert Settings().cudnn_benchmark is False
    before = torch.backends.cudnn.benchmark
    runtime = Runtime(Settings(cudnn_benchmark=enabled, device="cpu", retain_host_memory=False), registry)
    try:
        runtime.start()
        assert torch.backends.cudnn.benchmark is enabled
    finally:
        runtime.stop(grace=1)
        torch.backends.cudnn.benchmark = before
