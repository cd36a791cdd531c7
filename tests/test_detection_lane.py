"""The D-RISE lane (service/detection/lane.py): concurrent calls' masked images share detector forwards.
Oracles: work that waits while the lane is busy runs as one batch when it can (same detector, size and
masks), never when it cannot; each image's maps equal D-RISE run on it alone (batching changes nothing); a
caller that cancels is answered Cancelled at once while the others of its batch finish."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from service.detection.base import Detections
from service.detection.drise import DriseSettings, drise
from service.detection.lane import DriseLane
from service.detection.zoo import LoadedDetector
from service.errors import Cancelled
from service.zoo.cards import ModelCard, WeightsSpec

BOX = torch.tensor([[8.0, 8.0, 24.0, 24.0]])


class Planted:
    """One box whose score is the mean of its region's pixels; records the batch of every forward. `gate`
    holds the first forward until set, so that work can queue behind it."""

    def __init__(self):
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, images: torch.Tensor) -> list[Detections]:
        self.entered.set()
        self.gate.wait(timeout=30)
        self.batches.append(images.shape[0])
        scores = images[:, :, 8:24, 8:24].mean(dim=(1, 2, 3))
        return [Detections(BOX.clone(), torch.zeros(1, dtype=torch.long), s[None]) for s in scores]


def detector(fn) -> LoadedDetector:
    card = ModelCard(name="planted", architecture="builtin:planted", task="detection", num_classes=1,
                     weights=WeightsSpec(path=["none"]))
    return LoadedDetector(card, fn, ("thing",), torch.device("cpu"))


def image(seed: int, size=(32, 32)) -> torch.Tensor:
    return torch.rand(3, *size, generator=torch.Generator().manual_seed(seed))


def target(img: torch.Tensor) -> Detections:
    return Detections(BOX.clone(), torch.zeros(1, dtype=torch.long), img[:, 8:24, 8:24].mean()[None])


SETTINGS = DriseSettings(n_masks=64, grid=4, p=0.5, seed=3)


def run_all(lane: DriseLane, found: LoadedDetector, planted: Planted, works: list[tuple[torch.Tensor,
                                                                                         DriseSettings]]):
    """The first work occupies the lane (held at its first forward); the rest queue, then all go."""
    with ThreadPoolExecutor(len(works)) as pool:
        first = pool.submit(lane.run, found, works[0][0], target(works[0][0]), works[0][1], None, None,
                            lambda: False)
        assert planted.entered.wait(timeout=30)
        rest = [pool.submit(lane.run, found, img, target(img), settings, None, None, lambda: False)
                for img, settings in works[1:]]
        while len(lane._waiting) < len(rest):
            threading.Event().wait(0.01)
        planted.gate.set()
        return [f.result(timeout=60) for f in [first, *rest]]


def test_waiting_work_with_the_same_masks_shares_forwards_and_keeps_its_maps():
    planted = Planted()
    found, lane = detector(planted), DriseLane(chunk=16)
    images = [image(i) for i in range(3)]
    results = run_all(lane, found, planted, [(img, SETTINGS) for img in images])
    assert lane.batches == [1, 2]  # the first alone (it was running), the two that waited together
    assert planted.batches[:4] == [16] * 4 and set(planted.batches[4:]) == {16}
    planted.gate.set()
    for img, (maps, info) in zip(images, results, strict=True):
        alone, _ = drise(planted, img, target(img), 1, SETTINGS, chunk=7)
        torch.testing.assert_close(maps, alone)
        assert info["n_masks"] == 64


def test_work_that_cannot_share_masks_or_size_runs_apart():
    planted = Planted()
    found, lane = detector(planted), DriseLane(chunk=16)
    other_seed = DriseSettings(n_masks=64, grid=4, p=0.5, seed=4)
    works = [(image(0), SETTINGS), (image(1), other_seed), (image(2, (32, 40)), SETTINGS)]
    run_all(lane, found, planted, works)
    assert lane.batches == [1, 1, 1]


def test_a_cancelled_caller_is_answered_at_once_and_the_others_finish():
    planted = Planted()
    found, lane = detector(planted), DriseLane(chunk=16)
    gone = threading.Event()
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(lane.run, found, image(0), target(image(0)), SETTINGS, None, None, lambda: False)
        assert planted.entered.wait(timeout=30)

        def submit(seed: int, cancelled):
            img = image(seed)
            return pool.submit(lane.run, found, img, target(img), SETTINGS, None, None, cancelled)

        leaving, staying = submit(1, gone.is_set), submit(2, lambda: False)
        while len(lane._waiting) < 2:
            threading.Event().wait(0.01)
        gone.set()
        with pytest.raises(Cancelled):
            leaving.result(timeout=10)
        planted.gate.set()
        assert first.result(timeout=60)[1]["n_masks"] == 64
        assert staying.result(timeout=60)[1]["n_masks"] == 64
    assert lane.batches == [1, 1]  # the cancelled one was dropped before it ran
