"""A detector's pass budget (service/detection/budget.py): D-RISE's forwards carry at most the detector's
`pass_batch` masked images whatever N, and that budget follows the server's settings on a CPU and measured
memory on a GPU. Oracles: the largest forward seen by a recording detector, for N = 64 and N = 640; the
lane's maps equal plain D-RISE at that chunk; on a GPU, a detector whose memory per image is planted gives
the batch that the planted sizes allow."""
from __future__ import annotations

import pytest
import torch

from service.calibrate import pass_batch_from_peaks
from service.detection.base import Detections
from service.detection.budget import calibrate_detectors, detector_pass_batch, measure_detector_peaks
from service.detection.drise import DriseSettings, drise
from service.detection.lane import DriseLane
from service.detection.zoo import LoadedDetector
from service.settings import Settings
from service.zoo.cards import ModelCard, WeightsSpec

BOX = torch.tensor([[8.0, 8.0, 24.0, 24.0]])


class Recording:
    """One box scored by its region's mean; records every forward's batch."""

    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, images: torch.Tensor) -> list[Detections]:
        self.batches.append(images.shape[0])
        scores = images[:, :, 8:24, 8:24].mean(dim=(1, 2, 3))
        return [Detections(BOX.to(images.device), torch.zeros(1, dtype=torch.long, device=images.device),
                           s[None]) for s in scores]


def loaded(fn, device: str = "cpu", max_side: int = 640) -> LoadedDetector:
    card = ModelCard(name="planted", architecture="builtin:planted", task="detection", num_classes=1,
                     weights=WeightsSpec(path=["none"]))
    return LoadedDetector(card, fn, ("thing",), torch.device(device), max_side=max_side)


@pytest.mark.parametrize(("cpu_batch", "max_batch", "expected"), [(8, 256, 8), (5, 256, 5), (8, 3, 3)])
def test_on_a_cpu_the_budget_is_cpu_pass_batch_within_max_pass_batch(cpu_batch, max_batch, expected):
    settings = Settings(cpu_pass_batch=cpu_batch, max_pass_batch=max_batch)
    found = {"planted": loaded(Recording())}
    calibrate_detectors(found, settings)
    assert found["planted"].pass_batch == expected == detector_pass_batch(found["planted"], settings)


@pytest.mark.parametrize("n_masks", [64, 640])
def test_drise_forwards_never_pass_the_budget_whatever_n(n_masks):
    recording = Recording()
    found = loaded(recording)
    found.pass_batch = 5
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = Detections(BOX.clone(), torch.zeros(1, dtype=torch.long), image[:, 8:24, 8:24].mean()[None])
    settings = DriseSettings(n_masks=n_masks, grid=4, p=0.5, seed=2)
    maps, info = DriseLane().run(found, image, target, settings, None, None, lambda: False)
    assert info["n_masks"] == n_masks
    assert max(recording.batches) == 5  # every forward within the budget
    assert sum(recording.batches) == n_masks
    alone, _ = drise(Recording(), image, target, 1, settings, chunk=5)
    torch.testing.assert_close(maps, alone)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_budget_comes_from_measured_memory():
    per_image = 64 * 2**20  # each image of a forward allocates this much beside its input

    def hungry(images: torch.Tensor) -> list[Detections]:
        scratch = torch.empty(images.shape[0], per_image // 4, device=images.device)
        scratch.zero_()
        return Recording()(images)

    found = loaded(hungry, "cuda", max_side=64)
    peaks = measure_detector_peaks(found)
    input_bytes = 3 * 64 * 64 * 4
    for b, peak in peaks.items():
        assert b * (per_image + input_bytes) <= peak <= b * (per_image + input_bytes) + 2**20
    settings = Settings(max_pass_batch=10_000)
    free, _ = torch.cuda.mem_get_info(found.device)
    expected = pass_batch_from_peaks(peaks, free, settings.gpu_memory_fraction / 2, 10_000)
    assert detector_pass_batch(found, settings) == pytest.approx(expected, rel=0.02)
    assert detector_pass_batch(found, Settings(max_pass_batch=2)) == 2
