"""The FiftyOne helper's checks; run by tests/test_fiftyone.py under .venv/tools (fiftyone).

FiftyOne's database (MongoDB) does not run on this machine, so datasets cannot be created: the checks use
real in-memory fo.Sample objects and FiftyOne's own Heatmap validation. SALIENCY_URL is a real server;
IMAGES_DIR holds chelsea.png, noise.png and photo0-3.png written by the outer test, with the service's own
maps (.npy); SALIENCY_SMALL_URL is a server whose answers are bounded at 150 KB and whose requests at one
image's metrics (two images with metrics are a 422 too_costly).
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import fiftyone as fo
import numpy as np
import pytest
from fiftyone import ViewField as F

from saliency_client import Client, ValidationError
from saliency_fiftyone import METRIC_FIELDS, add_saliency, to_heatmap

IMAGES = Path(os.environ.get("IMAGES_DIR", "."))


@pytest.fixture
def client():
    with Client(os.environ["SALIENCY_URL"]) as c:
        yield c


def test_samples_get_float_heatmaps_and_the_explained_class(client):
    samples = [fo.Sample(filepath=str(IMAGES / name)) for name in ("chelsea.png", "noise.png")]
    assert add_saliency(samples, client, field="gradcam", batch_size=1, size="original") == 2
    cat = samples[0]
    heat = cat["gradcam"]
    assert isinstance(heat, fo.Heatmap) and heat.range == [0.0, 1.0]
    assert heat.map.dtype == np.float32 and heat.map.shape == (300, 451)
    np.testing.assert_array_equal(heat.map, np.load(IMAGES / "chelsea_gradcam.npy"))  # lossless
    assert cat["gradcam_class"].label == "Egyptian cat" and 0.5 < cat["gradcam_class"].confidence <= 1
    assert samples[1]["gradcam"].map.shape == (48, 80)


def test_maps_default_to_the_model_input_size_and_params_reach_the_method(client):
    """At the input size a map fits one MongoDB document whatever the photo's size; the App stretches it."""
    [sample] = samples = [fo.Sample(filepath=str(IMAGES / "chelsea.png"))]
    add_saliency(samples, client, field="ig", method="integrated-gradients",
                 params={"method": "riemann_left"}, n_steps=4)
    assert sample["ig"].map.shape == (224, 224) and sample["ig"].map.dtype == np.float32
    direct = client.explain(IMAGES / "chelsea.png", "integrated-gradients", size="input",
                            params={"method": "riemann_left", "n_steps": 4})[0]
    np.testing.assert_array_equal(sample["ig"].map, direct.map)


def test_heatmap_serialises_like_fiftyone_stores_it(client):
    result = client.explain(IMAGES / "noise.png", "gradient", model="tiny_cnn")[0]
    heat = to_heatmap(result)
    back = fo.Heatmap.from_dict(heat.to_dict())  # the document form FiftyOne writes to its database
    np.testing.assert_array_equal(back.map, result.map)
    with pytest.raises(ValueError):
        to_heatmap(client.explain(IMAGES / "noise.png", "gradient", model="tiny_cnn", outputs=["png"])[0])


def test_batches_too_large_for_one_answer_are_split():
    """A batch of 4 maps at the original size passes the small server's answer bound; each map fits alone."""
    samples = [fo.Sample(filepath=str(IMAGES / f"photo{i}.png")) for i in range(4)]
    with Client(os.environ["SALIENCY_SMALL_URL"]) as small:
        assert add_saliency(samples, small, method="gradient", model="tiny_cnn", batch_size=4,
                            size="original") == 4
        alone = small.explain(IMAGES / "photo3.png", "gradient", model="tiny_cnn")[0]
    assert all(s["saliency"].map.shape == (120, 160) for s in samples)
    np.testing.assert_array_equal(samples[3]["saliency"].map, alone.map)


def test_metrics_are_float_fields_to_sort_and_filter_by(client):
    """metrics=True: `<field>_<name>` for each of METRIC_FIELDS, the service's own figures for the map; None
    for a deterministic method's stability. Off by default: no such fields."""
    [sample] = samples = [fo.Sample(filepath=str(IMAGES / "chelsea.png"))]
    add_saliency(samples, client, field="gradcam", metrics=True)
    direct = client.explain(IMAGES / "chelsea.png", "gradcam", size="input", outputs=["npy", "metrics"])[0]
    assert direct.metrics is not None
    np.testing.assert_array_equal(sample["gradcam"].map, direct.map)  # the map is unchanged by asking
    assert list(METRIC_FIELDS) == ["deletion_auc", "insertion_auc", "deletion_auc_random",
                                   "insertion_auc_random", "stability"]
    for name in METRIC_FIELDS:
        assert sample[f"gradcam_{name}"] == direct.metrics[name]
    assert isinstance(sample["gradcam_deletion_auc"], float) and sample["gradcam_stability"] is None
    assert sample["gradcam_insertion_auc"] > sample["gradcam_insertion_auc_random"]  # Grad-CAM on the cat
    # the expression a view sorts by ("most faithful first") builds over these fields
    assert "gradcam_deletion_auc_random" in str(F("gradcam_deletion_auc") - F("gradcam_deletion_auc_random"))

    [plain] = others = [fo.Sample(filepath=str(IMAGES / "chelsea.png"))]
    add_saliency(others, client, field="gradcam")
    assert not any(plain.has_field(f"gradcam_{name}") for name in METRIC_FIELDS)


def test_a_stochastic_maps_stability_is_stored(client):
    [sample] = samples = [fo.Sample(filepath=str(IMAGES / "noise.png"))]
    add_saliency(samples, client, field="sg", method="smoothgrad", model="tiny_cnn", metrics=True,
                 n_samples=4)
    assert isinstance(sample["sg_stability"], float) and -1.0 <= sample["sg_stability"] <= 1.0
    assert all(isinstance(sample[f"sg_{name}"], float) for name in METRIC_FIELDS)


def test_batches_with_metrics_too_costly_or_too_large_are_split():
    """The small server takes one image's metrics per request (two: 422 too_costly) and one 160x120 float32
    map per answer: a batch of 4 with metrics is split down to single images, each with its own figures."""
    paths = [IMAGES / f"photo{i}.png" for i in range(4)]
    samples = [fo.Sample(filepath=str(p)) for p in paths]
    with Client(os.environ["SALIENCY_SMALL_URL"]) as small:
        with pytest.raises(ValidationError) as refused:
            small.explain(paths[:2], "gradient", model="tiny_cnn", outputs=["npy", "metrics"])
        assert refused.value.code == "too_costly"
        assert add_saliency(samples, small, method="gradient", model="tiny_cnn", batch_size=4,
                            size="original", metrics=True) == 4
        alone = small.explain(paths[3], "gradient", model="tiny_cnn", outputs=["npy", "metrics"])[0]
    assert all(s["saliency"].map.shape == (120, 160) for s in samples)
    np.testing.assert_array_equal(samples[3]["saliency"].map, alone.map)
    assert alone.metrics is not None
    assert samples[3]["saliency_deletion_auc"] == alone.metrics["deletion_auc"]


class RecordingDataset:
    """Stands in for a dataset (FiftyOne's database cannot run here): records add_sample_field calls, which
    are checked against the real fo.Dataset.add_sample_field's signature."""

    name = "recording"

    def __init__(self):
        self.calls = []

    def add_sample_field(self, *args, **kwargs):
        inspect.signature(fo.Dataset.add_sample_field).bind(self, *args, **kwargs)
        self.calls.append((args, kwargs))


class InDataset:
    def __init__(self, dataset):
        self.in_dataset, self.dataset = True, dataset


def test_metric_fields_are_declared_as_floats_once_per_dataset():
    """A dataset infers a new field's type from its first value, and cannot from None (gradcam's stability):
    the fields are declared FloatField first, with their descriptions, once per dataset."""
    from fiftyone.core.fields import FloatField

    from saliency_fiftyone import _declare_metric_fields

    dataset, declared = RecordingDataset(), set()
    for _ in range(3):
        _declare_metric_fields(InDataset(dataset), "gradcam", declared)
    _declare_metric_fields(fo.Sample(filepath=str(IMAGES / "noise.png")), "gradcam", declared)  # in memory
    assert [(args, kwargs["description"]) for args, kwargs in dataset.calls] == [
        ((f"gradcam_{name}", FloatField), description) for name, description in METRIC_FIELDS.items()]
