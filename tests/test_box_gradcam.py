"""Per-box Grad-CAM (service/detection/box_gradcam.py) and torchvision's detectors
(service/detection/torchvision_detectors.py), with random weights: nothing is downloaded.

The oracle is a planted detector whose one box's score depends only on the pixels of a known region: its
map's mass must fall in that region, and a decoy box whose score is a constant must get an empty map.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from service.detection.base import Detections
from service.detection.box_gradcam import box_gradcam
from service.detection.torchvision_detectors import (
    DETECTORS,
    TorchvisionDetector,
    coco_labels,
    load_torchvision_detector,
)
from service.zoo.cards import CardError, ModelCard, WeightsSpec
from service.zoo.weights import WeightsMissing

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module, restored after: at these input sizes the ops are too small to
    share, and on a busy 2-core machine two threads spin against each other (measured: 15 s with one, 37 to
    59 s with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

REGION = (16, 16, 32, 32)  # x1, y1, x2, y2: the planted box, whose score reads only these pixels
DECOY = (40, 40, 60, 60)  # the decoy box, constant score
GREEN = (0, 36, 28, 64)  # a green square, bigger than the red one: strong activation the score ignores


class _ReadsAnItem(torch.autograd.Function):
    """Identity whose backward reads a Python number (as a gradient clip by a tensor's norm would): vmap has
    no batching rule for it, so box_gradcam must fall back to one backward per box."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * (1.0 if float(grad.abs().sum().item()) >= 0 else 0.0)


class Planted(nn.Module):
    """A stride-2 conv "backbone" (channel 0: red, channel 1: green, each the mean of its 2x2 patch, ReLU) and
    a head returning two boxes: REGION (label 1), score sigmoid(4 * mean of channel 0 over REGION's cells
    - 2), and DECOY (label 2), score 0.9 whatever the image. `pad`: rows of zeros added below the image before
    the backbone (as torchvision's transform pads to a multiple of 32), so the map covers more than the
    image."""

    def __init__(self, pad: int = 0, opaque: bool = False):
        super().__init__()
        conv = nn.Conv2d(3, 2, kernel_size=2, stride=2, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0] = 0.25
            conv.weight[1, 1] = 0.25
        self.backbone = nn.Sequential(conv, nn.ReLU())
        self.pad, self.opaque = pad, opaque
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> list[Detections]:
        x = nn.functional.pad(images, (0, 0, 0, self.pad))
        features = self.backbone(x)
        x1, y1, x2, y2 = REGION
        scores = torch.sigmoid(4 * features[:, 0, y1 // 2:y2 // 2, x1 // 2:x2 // 2].mean((1, 2)) - 2)
        if self.opaque:
            scores = _ReadsAnItem.apply(scores)
        boxes = torch.tensor([REGION, DECOY], dtype=torch.float32)
        return [Detections(boxes, torch.tensor([1, 2]), torch.stack([s, torch.tensor(0.9)]))
                for s in scores]


def planted_image() -> torch.Tensor:
    image = 0.05 * torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    x1, y1, x2, y2 = REGION
    image[0, y1:y2, x1:x2] = 1.0
    x1, y1, x2, y2 = GREEN
    image[1, y1:y2, x1:x2] = 1.0
    return image


def targets(*boxes: tuple[int, int, int, int], labels: tuple[int, ...] = (1, 2)) -> Detections:
    labels = labels[:len(boxes)]
    return Detections(torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels), torch.ones(len(boxes)))


def inside(box: tuple[int, int, int, int]) -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = True
    return mask


def assert_in_region(heat: torch.Tensor) -> None:
    region = inside(REGION)
    assert heat[region].mean() > 2 * heat[~region].mean()
    assert region.flatten()[heat.argmax()]
    # the channel weights, not the activations alone, make the map: the green square is the strongest
    # activation of the layer and is nearly absent
    assert heat[inside(GREEN)].mean() < 0.1 * heat[region].mean()


# ------------------------------------------------------------------------------------- planted detector

def test_planted_box_map_falls_in_its_region_and_the_decoy_gets_none():
    model = Planted()
    maps, info = box_gradcam(model, model.backbone, planted_image(), targets(REGION, DECOY), num_classes=3)
    assert maps.shape == (2, SIZE, SIZE) and info.layer_size == (SIZE // 2, SIZE // 2)
    assert [m.matched for m in info.matches] == [True, True]
    assert [m.iou for m in info.matches] == pytest.approx([1.0, 1.0])
    assert info.matches[1].score == pytest.approx(0.9)
    assert info.backward == "batched"
    assert_in_region(maps[0])
    assert float(maps[0].max()) == pytest.approx(1.0) and float(maps[0].min()) == 0.0
    assert torch.all(maps[1] == 0)  # a constant score has no gradient: an empty map, not noise


def test_batched_and_looped_backward_give_the_same_maps():
    model, image, want = Planted(), planted_image(), targets(REGION, DECOY)
    batched, info_b = box_gradcam(model, model.backbone, image, want, backward="batched")
    looped, info_l = box_gradcam(model, model.backbone, image, want, backward="looped")
    assert (info_b.backward, info_l.backward) == ("batched", "looped")
    torch.testing.assert_close(batched, looped)


def test_an_op_vmap_cannot_batch_falls_back_to_the_loop():
    model, image, want = Planted(opaque=True), planted_image(), targets(REGION, DECOY)
    maps, info = box_gradcam(model, model.backbone, image, want)
    assert info.backward == "looped"
    plain = Planted()
    torch.testing.assert_close(maps, box_gradcam(plain, plain.backbone, image, want)[0])
    with pytest.raises(RuntimeError, match="Batching rule"):
        box_gradcam(model, model.backbone, image, want, backward="batched")


def test_the_padding_under_the_image_is_cropped_off():
    """The map covers image + padding (extent 0.5 of its height): upsampled over both, then cropped."""
    model, image, want = Planted(pad=SIZE), planted_image(), targets(REGION)
    maps, info = box_gradcam(model, model.backbone, image, want, extent=(0.5, 1.0))
    assert maps.shape == (1, SIZE, SIZE) and info.layer_size == (SIZE, SIZE // 2)
    assert_in_region(maps[0])
    plain = Planted()
    unpadded = box_gradcam(plain, plain.backbone, image, want)[0]
    # equal but for the last rows, which bilinear interpolation blends with the padding's first row
    torch.testing.assert_close(maps[0, :-2], unpadded[0, :-2], atol=2e-3, rtol=0)


def test_a_target_without_a_match_gets_an_empty_map_and_says_so():
    model, image = Planted(), planted_image()
    x1, y1, x2, y2 = REGION
    shifted = (x1 + 8, y1, x2 + 8, y2)  # IoU 1/3 with the planted box
    want = targets(DECOY, shifted, labels=(1, 1))  # DECOY's place with the planted box's label: IoU 0
    maps, info = box_gradcam(model, model.backbone, image, want)
    assert [m.matched for m in info.matches] == [False, False]
    assert info.matches[1].iou == pytest.approx(1 / 3) and info.matches[1].index is None
    assert torch.all(maps == 0) and info.backward == "none"
    maps, info = box_gradcam(model, model.backbone, image, want, iou_threshold=0.3)
    assert [m.matched for m in info.matches] == [False, True] and info.matches[1].index == 0
    assert_in_region(maps[1])


@pytest.mark.parametrize(("box", "label", "message"), [
    ((-10, 0, 20, 20), 1, "not inside the 64x64 image"),
    ((0, 0, 20, 70), 1, "not inside the 64x64 image"),
    ((30, 0, 20, 20), 1, "empty or inverted"),
    ((0, 20, 20, 20), 1, "empty or inverted"),
    ((0, 0, 20, 20), 3, "label 3 is not a class of this detector"),
    ((0, 0, 20, 20), -1, "label -1 is not a class"),
])
def test_bad_targets_are_refused_before_the_detector_runs(box, label, message):
    model = Planted()
    with pytest.raises(ValueError, match=message):
        box_gradcam(model, model.backbone, planted_image(), targets(box, labels=(label,)), num_classes=3)


def test_a_detector_without_a_graph_is_refused():
    model = Planted()

    def no_grad(images):
        with torch.no_grad():
            return model(images)

    with pytest.raises(ValueError, match="carry no gradient"):
        box_gradcam(no_grad, model.backbone, planted_image(), targets(REGION))


# ------------------------------------------------------------------------------------ torchvision detectors

# The R-CNN transform's own sizes are 800 (ResNet-50 FPN) and 320 (mobilenet): smaller here, for speed; the
# mobilenet at 128, its stride-32 map 3 x 4 (at 64, 2 x 2, ReLU empties some random-weight maps). SSDlite's
# 320 x 320 is fixed.
SIZES = {"fasterrcnn_mobilenet_v3_large_320_fpn": {"min_size": 128, "max_size": 128},
         "ssdlite320_mobilenet_v3_large": {}}
SMALL = {"min_size": 64, "max_size": 64}
LAYERS = {
    "fasterrcnn_resnet50_fpn": "backbone.body.layer4",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "backbone.body.16",
    "retinanet_resnet50_fpn": "backbone.body.layer4",
    "fcos_resnet50_fpn": "backbone.body.layer4",
    "ssdlite320_mobilenet_v3_large": "backbone.features.0",
}


@pytest.fixture(scope="module")
def detectors() -> dict[str, TorchvisionDetector]:
    built = {}
    for name in DETECTORS:
        torch.manual_seed(0)
        # score threshold 0: random weights still give boxes
        built[name] = TorchvisionDetector(name, score_threshold=0.0, max_detections=10,
                                          **SIZES.get(name, SMALL))
    return built


def random_images(batch: int = 1, height: int = 50, width: int = 70) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", DETECTORS)
def test_each_detector_builds_and_detects_inside_the_image(detectors, name):
    detector = detectors[name]
    assert detector.default_cam_layer == LAYERS[name]
    assert detector.num_classes == 91 and detector.labels[1] == "person"
    found = detector.detect(random_images(2))
    assert len(found) == 2
    for d in found:
        assert 0 < len(d) <= 10 and not d.scores.requires_grad
        assert d.boxes.shape == (len(d), 4) and d.labels.dtype == torch.long
        assert torch.all(d.boxes[:, :2] >= 0) and torch.all(d.boxes[:, 2:] >= d.boxes[:, :2])
        assert torch.all(d.boxes[:, 2] <= 70 + 1e-3) and torch.all(d.boxes[:, 3] <= 50 + 1e-3)
        assert torch.all((d.labels >= 0) & (d.labels < 91))
        assert torch.all((d.scores >= 0) & (d.scores <= 1))
    (narrowed,) = detector.detect(random_images(1), max_detections=2)
    assert len(narrowed) == 2 and narrowed.scores[0] >= narrowed.scores[1]


def own_boxes(detector: TorchvisionDetector, image: torch.Tensor, count: int = 3) -> Detections:
    """The detector's top boxes with an area (FCOS's random weights give some of zero width)."""
    d = detector.detect(image[None])[0]
    keep = ((d.boxes[:, 2] - d.boxes[:, 0]) > 1) & ((d.boxes[:, 3] - d.boxes[:, 1]) > 1)
    return Detections(d.boxes[keep][:count], d.labels[keep][:count], d.scores[keep][:count])


# Faster R-CNN ResNet-50 is left out: the same graph as the mobilenet one (RoIAlign, box head), 10x slower
@pytest.mark.parametrize("name", [n for n in DETECTORS if n != "fasterrcnn_resnet50_fpn"])
def test_box_gradcam_of_a_torchvision_detector(detectors, name):
    detector, image = detectors[name], random_images()[0]
    want = own_boxes(detector, image)
    maps, info = detector.box_gradcam(image, want)
    assert maps.shape == (len(want), 50, 70) and torch.isfinite(maps).all()
    assert torch.all((maps >= 0) & (maps <= 1))
    assert all(m.matched and m.iou == pytest.approx(1.0, abs=1e-4) for m in info.matches)
    # vmap goes through all of them, RoIAlign's backward included
    assert info.backward == "batched"
    if name in ("fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"):
        # (RetinaNet's and FCOS's random weights give maps that ReLU can empty: checked on the others)
        assert all(float(m.max() - m.min()) > 0 for m in maps)
    if name == "fasterrcnn_mobilenet_v3_large_320_fpn":  # RoIAlign's backward, batched and looped
        looped, _ = detector.box_gradcam(image, want, backward="looped")
        torch.testing.assert_close(maps, looped, atol=1e-5, rtol=1e-4)


def test_ssdlite_boxes_of_the_stride_16_level_miss_the_last_backbone_map(detectors):
    """Why SSDlite's layer is backbone.features.0: the head reads the stride-16 level before features.1."""
    detector, image = detectors["ssdlite320_mobilenet_v3_large"], random_images()[0]
    want = own_boxes(detector, image)
    maps, _ = detector.box_gradcam(image, want, layer="backbone.features.1")
    assert any(torch.all(m == 0) for m in maps)


def test_a_layer_changed_in_place_afterwards_still_has_its_gradient(detectors):
    """bn3's output is the target of the block's `out += identity`: the network gets a copy of the leaf."""
    detector, image = detectors["retinanet_resnet50_fpn"], random_images()[0]
    want = own_boxes(detector, image, 2)
    maps, info = detector.box_gradcam(image, want, layer="backbone.body.layer4.2.bn3")
    assert info.backward == "batched" and torch.isfinite(maps).all()


def test_layer_extent_is_the_image_inside_the_padded_input(detectors):
    # 50 x 70 resized to fit 64: 45 x 64, padded to 64 x 64 (a multiple of 32); SSDlite stretches to 320 x 320
    assert detectors["fasterrcnn_resnet50_fpn"].layer_extent((50, 70)) == (45 / 64, 1.0)
    assert detectors["ssdlite320_mobilenet_v3_large"].layer_extent((50, 70)) == (1.0, 1.0)


def test_a_label_the_detector_does_not_have_is_refused(detectors):
    detector = detectors["ssdlite320_mobilenet_v3_large"]
    with pytest.raises(ValueError, match="label 91 is not a class"):
        detector.box_gradcam(random_images()[0], targets((0, 0, 20, 20), labels=(91,)))
    with pytest.raises(ValueError, match="unknown torchvision detector"):
        TorchvisionDetector("maskrcnn_resnet50_fpn")
    with pytest.raises(ValueError, match="needs its labels"):
        TorchvisionDetector("ssdlite320_mobilenet_v3_large", num_classes=3)


def card(weights: str, **fields) -> ModelCard:
    return ModelCard(name="ssd", architecture="torchvision:ssdlite320_mobilenet_v3_large", task="detection",
                     weights=WeightsSpec(path=[weights]), **fields)


def test_operator_weights_load_strictly(detectors, tmp_path):
    source = detectors["ssdlite320_mobilenet_v3_large"]
    torch.save(source.model.state_dict(), tmp_path / "ssd.pt")
    loaded = load_torchvision_detector(card("ssd.pt"), tmp_path, torch.device("cpu"))
    assert loaded.labels == coco_labels() and loaded.cam_layer == "backbone.features.0"
    assert loaded.module is not None
    for key, value in source.model.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value)

    (tmp_path / "three.txt").write_text("background\ncat\ndog\n")
    three = card("ssd.pt", num_classes=3, labels={"source": "file", "file": "three.txt"})
    with pytest.raises(CardError, match="shape mismatch"):  # COCO's 91-class head into a 3-class model
        load_torchvision_detector(three, tmp_path, torch.device("cpu"))
    with pytest.raises(WeightsMissing):
        load_torchvision_detector(card("absent.pt"), tmp_path, torch.device("cpu"))
    with pytest.raises(CardError, match="needs \\[labels\\]"):
        load_torchvision_detector(card("ssd.pt", num_classes=3), tmp_path, torch.device("cpu"))
