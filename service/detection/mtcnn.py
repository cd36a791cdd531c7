"""The MTCNN face detector (Zhang et al. 2016) of the PyPI package `facenet-pytorch`, with the real weights
its wheel ships (P-, R- and O-Net), loaded through the service's safe reader (torch.load with
weights_only=True): facenet-pytorch's own `MTCNN()` loads them itself, so it is not built; its three networks
and its cascade (`detect_face`) are used as they are.

facenet-pytorch pins torch < 2.3 in its metadata while running on the newer torch the service uses; the
Makefile installs it with `--no-deps` (its imports, torch/torchvision/numpy/PIL, are the service's own).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..zoo.cards import CardError
from ..zoo.weights import package_file, read_state_dict
from .base import Detections

PACKAGE = "facenet_pytorch"
NETS = ("pnet", "rnet", "onet")


@dataclass(frozen=True)
class CascadeSettings:
    """facenet-pytorch's defaults (its MTCNN class): the smallest face searched for, in pixels, the three
    stages' score thresholds and the image pyramid's scale factor."""

    min_face_size: int = 20
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709


class MtcnnDetector:
    """`detect(images)`: the faces in each image of a (B, 3, H, W) batch in [0, 1], one class ("face"); the
    O-Net's face probability is the score."""

    labels = ("face",)
    num_classes = 1

    def __init__(self, weights_dir: Path, device: torch.device, card: str = "mtcnn",
                 settings: CascadeSettings = CascadeSettings()):
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

        self.settings, self.device = settings, device
        nets = {"pnet": PNet(pretrained=False), "rnet": RNet(pretrained=False),
                "onet": ONet(pretrained=False)}
        for name, net in nets.items():
            state = read_state_dict(weights_dir / f"{name}.pt", card)
            missing, unexpected = set(net.state_dict()) - set(state), set(state) - set(net.state_dict())
            if missing or unexpected:
                raise CardError(card, f"{name}.pt: key mismatch: missing {sorted(missing)[:5]}, unexpected "
                                      f"{sorted(unexpected)[:5]}")
            net.load_state_dict(state, strict=True)
            net.eval().requires_grad_(False).to(device)
        self.pnet, self.rnet, self.onet = nets["pnet"], nets["rnet"], nets["onet"]

    @classmethod
    def from_package(cls, device: torch.device, card: str = "mtcnn") -> MtcnnDetector:
        """The weights facenet-pytorch's wheel ships (its `data/` folder), found without importing it."""
        folder = package_file(PACKAGE, "data", card)
        if not all((folder / f"{name}.pt").is_file() for name in NETS):
            raise CardError(card, f"{PACKAGE} has no {', '.join(n + '.pt' for n in NETS)} in {folder}")
        return cls(folder, device, card)

    def __call__(self, images: torch.Tensor) -> list[Detections]:
        return self.detect(images)

    def detect(self, images: torch.Tensor) -> list[Detections]:
        try:
            return self._cascade(images)
        except RuntimeError as exc:
            # The cascade concatenates the crops that pass a stage; when every candidate of the batch is a
            # degenerate crop that list is empty and torch.cat raises: such an image has no face.
            if "non-empty" not in str(exc):
                raise
        if images.shape[0] == 1:
            return [Detections.empty()]
        return [found for image in images for found in self.detect(image[None])]

    def _cascade(self, images: torch.Tensor) -> list[Detections]:
        from facenet_pytorch.models.utils.detect_face import detect_face

        s = self.settings
        pixels = (images.to(self.device, torch.float32) * 255.0).permute(0, 2, 3, 1)  # (B, H, W, 3), 0-255
        with torch.no_grad():
            batch_boxes, _points = detect_face(pixels, s.min_face_size, self.pnet, self.rnet, self.onet,
                                               list(s.thresholds), s.factor, self.device)
        out = []
        for found in batch_boxes:
            rows = torch.as_tensor(found.astype("float32")).reshape(-1, 5)
            out.append(Detections(boxes=rows[:, :4].contiguous(), scores=rows[:, 4].contiguous(),
                                  labels=torch.zeros(len(rows), dtype=torch.long)))
        return out
