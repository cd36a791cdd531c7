"""The `saliency` command line against a real server."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saliency_client import Client
from saliency_client.cli import main
from service.settings import Settings
from tests.server import running_server


@pytest.fixture(scope="module")
def server(registry):
    with running_server(Settings(max_wait_ms=5), registry) as (base, _):
        yield base


def test_explain_writes_overlay_gray_and_npy(server, chelsea, tmp_path, capsys):
    cat = tmp_path / "cat.png"
    chelsea.save(cat)
    out, gray, npy = tmp_path / "cat_gradcam.png", tmp_path / "cat_gray.png", tmp_path / "cat.npy"
    assert main(["--url", server, "explain", str(cat), "--method", "gradcam", "--out", str(out),
                 "--gray", str(gray), "--npy", str(npy)]) == 0
    assert "Egyptian cat (class 285" in capsys.readouterr().out
    overlay = Image.open(out)
    assert overlay.size == (451, 300) and overlay.mode == "RGB"
    assert Image.open(gray).mode == "L"
    with Client(server) as c:
        np.testing.assert_array_equal(np.load(npy), c.explain(cat)[0].map)


def test_several_images_json_params_and_job(server, tmp_path, capsys):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3),
                                                          dtype=np.uint8)).save(paths[-1])
    assert main(["--url", server, "explain", *map(str, paths), "-m", "integrated-gradients",
                 "--model", "tiny_cnn", "-p", "n_steps=4", "--npy", str(tmp_path / "{stem}_ig.npy"),
                 "--json", "--job", "-q"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert ([x["image"] for x in lines] == list(map(str, paths))
            and all(x["model"] == "tiny_cnn" for x in lines))
    assert np.load(tmp_path / "img1_ig.npy").shape == (64, 64)
    with pytest.raises(SystemExit):  # several images need a {stem} in output names
        main(["--url", server, "explain", *map(str, paths), "--model", "tiny_cnn", "--npy", "x.npy"])


def test_models_methods_and_errors_through_the_installed_script(server, tmp_path):
    script = Path(sys.executable).with_name("saliency")
    models = subprocess.run([script, "--url", server, "models", "--json"], capture_output=True, text=True,
                            check=True)
    assert {m["name"] for m in json.loads(models.stdout)} >= {"efficientnet_lite0", "tiny_cnn"}
    methods = subprocess.run([script, "--url", server, "methods"], capture_output=True, text=True, check=True)
    assert methods.stdout.startswith("gradcam") or "gradcam" in methods.stdout
    bad = subprocess.run([script, "--url", server, "explain", str(tmp_path / "missing.png")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "missing.png" in bad.stderr
    wrong = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(wrong)
    bad = subprocess.run([script, "--url", server, "explain", str(wrong), "-m", "nosuch"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown method 'nosuch'" in bad.stderr


def test_methods_show_the_defaults_the_server_applies(server, capsys):
    """A null default is the server's choice, said as the parameter's description says it, never `None`."""
    assert main(["--url", server, "methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "None" not in "".join(lines.values())
    assert "precision=<the server's setting>" in lines["gradient"]
    assert "layer=<the model card's>" in lines["gradcam"]
    assert "eta=<5e-3 l1, 5e-2 group>" in lines["moreaugrad"]
    assert "n_steps=50" in lines["integrated-gradients"]
