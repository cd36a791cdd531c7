"""The FiftyOne helper's checks; run by tests/test_fiftyone.py under .venv/tools (fiftyone).

FiftyOne's database (MongoDB) does not run on this machine, so datasets cannot be created: the checks use
real in-memory fo.Sample objects and FiftyOne's own Heatmap validation. SALIENCY_URL is a real server;
IMAGES_DIR holds chelsea.png, noise.png and photo0-3.png written by the outer test, with the service's own
maps (.npy); SALIENCY_SMALL_URL is a server whose answers are bounded at 150 KB.
"""
from __future__ import annotations

import os
from pathlib import Path

import fiftyone as fo
import numpy as np
import pytest

from saliency_client import Client
from saliency_fiftyone import add_saliency, to_heatmap

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
