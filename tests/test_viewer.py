"""The web viewer at /: its files as served, and the page driven in a real browser (Debian's chromium): the
main path (maps over the photo, one class picker for every map, downloads), jobs, errors, a large photo, the
API key. The comparison view, the rendering, the busy server, the phone and the link are in
tests/test_viewer_compare.py; the metrics and sanity verdicts in tests/test_viewer_trust.py.

The browser tests skip, saying why, when chromium or the playwright package is absent; `make test` installs
playwright, and chromium through apt when CI=true. The screenshots land in artifacts/viewer*.png.
"""
from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.api.viewer import FILES
from service.settings import Settings
from tests.server import running_server
from tests.viewer_page import (
    ARTIFACTS,
    STATUS,
    TIMEOUT_MS,
    canvas_stats,
    card,
    open_viewer,
    save_jpeg,
    set_param,
    wait_state,
)


@pytest.fixture(scope="module")
def server(registry):
    with running_server(Settings(max_wait_ms=5), registry) as (base, app):
        yield base, app


# ------------------------------------------------------------------------------------------ served files


def test_page_and_its_files_are_served(server):
    base, _ = server
    page = httpx.get(f"{base}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    for needle in ('id="image-input"', 'id="model-select"', 'id="methods"', 'id="colormap-select"',
                   'id="view-select"', 'id="opacity"', 'id="zoom-in"', 'id="colorbar"', 'id="top-k"',
                   'id="run-button"', 'role="alert"'):
        assert needle in html
    # every asset the page references is served with its type
    refs = re.findall(r'(?:src|href)="/static/([^"]+)"', html)
    assert {"viewer.js", "viewer.css"} <= set(refs)
    for name in refs:
        r = httpx.get(f"{base}/static/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"].split(";")[0] in ("text/javascript", "text/css")
    # and every module the modules import, all the way down (no build step: the browser loads each one)
    seen, todo = set(), ["viewer.js"]
    while todo:
        name = todo.pop()
        seen.add(name)
        assert name in FILES, name
        r = httpx.get(f"{base}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript"), name
        todo += [m for m in re.findall(r'from "\./([^"]+)"', r.text) if m not in seen]
    assert {"api.js", "colormaps.js", "zoom.js", "share.js"} <= seen


def test_only_shipped_files_are_served(server):
    base, _ = server
    for path in ("/static/nope.js", "/static/..%2Fapi%2Fviewer.py", "/static/%2e%2e%2fapp.py", "/static/"):
        r = httpx.get(f"{base}{path}")
        assert r.status_code == 404, path
        if r.headers["content-type"].startswith("application/json"):
            assert "error" in r.json()
    assert all(p.parent.name == "static" for p in FILES.values())


def test_viewer_is_public_when_an_api_key_guards_v1(registry):
    key = "k" * 24
    with running_server(Settings(api_key=key), registry) as (base, _):
        assert httpx.get(f"{base}/").status_code == 200
        assert httpx.get(f"{base}/static/viewer.js").status_code == 200
        assert httpx.get(f"{base}/v1/methods").status_code == 401
        assert httpx.get(f"{base}/v1/methods", headers={"Authorization": f"Bearer {key}"}).status_code == 200


# ------------------------------------------------------------------------------------------ in a browser


@pytest.fixture
def page(browser, server):
    context, page = open_viewer(browser, server[0])
    yield page
    context.close()


@pytest.mark.slow
@pytest.mark.browser
def test_gradcam_and_ig_on_chelsea_render_overlays_and_predict_a_cat(page, chelsea, tmp_path):
    # the note on a parameter several methods share (precision: 60 words) is in the form once
    form = page.text_content("#run-form")
    assert form.count("fp32, bf16 or fp16") == 1 and page.is_visible("#shared-notes")
    # a method the model's self-test refused cannot be ticked, and says why
    assert page.is_disabled("#method-attention-relevance")
    assert page.text_content("#method-attention-relevance-na").startswith("Not for efficientnet_lite0: ")
    photo = save_jpeg(chelsea, tmp_path / "chelsea.jpg")
    page.set_input_files("#image-input", str(photo))
    page.wait_for_selector("#preview:not([hidden])")
    assert "451 × 300" in page.text_content("#image-info")
    page.check("#method-integrated-gradients")
    # defaults and bounds from GET /v1/methods are shown
    assert page.input_value("#param-integrated-gradients-n_steps") == "50"
    assert "Default 50; range 1 to 1024" in page.text_content("#param-integrated-gradients-n_steps-hint")
    set_param(page, "integrated-gradients", "n_steps", "8")
    assert page.text_content("#params-integrated-gradients-summary") == "Parameters: n_steps 8"
    page.focus("#run-button")
    page.keyboard.press("Enter")  # keyboard only
    for method in ("gradcam", "integrated-gradients"):
        wait_state(page, method, "done")
        overlay = canvas_stats(page, f"{card(method)} canvas.heat")
        base = canvas_stats(page, f"{card(method)} canvas.base")
        assert (overlay["width"], overlay["height"]) == (451, 300)  # drawn at the photo's aspect
        assert base["std"] > 10 and overlay["std"] > 10, (method, base, overlay)
        # each card names its image, its model and its class
        context = page.text_content(f"{card(method)} .card-context")
        assert context.startswith("chelsea.jpg · efficientnet_lite0 · class 285 "), context
    # one top-5 list for every map
    labels = page.locator("#top-k .label").all_text_contents()
    assert len(labels) == 5 and "cat" in labels[0], labels
    assert page.locator(".card .top-k").count() == 0
    assert page.get_attribute("#top-k button >> nth=0", "aria-pressed") == "true"
    assert page.text_content("#run-context").startswith("chelsea.jpg · efficientnet_lite0 · class 285")
    # diagnostics under their names in words, with their meaning and, where known, a verdict
    ig_diagnostics = page.text_content(f"{card('integrated-gradients')} .diagnostics")
    assert "Convergence delta" in ig_diagnostics and "completeness" in ig_diagnostics
    names = page.locator(f"{card('integrated-gradients')} .diagnostics dt").all_text_contents()
    assert "Relative delta" in names and not any("_" in name for name in names), names
    verdict = page.text_content(f"{card('integrated-gradients')} .card-verdicts")
    assert re.search(r"(good|fair|poor) Relative delta [\d.e-]+: the map (adds up to|misses)", verdict), \
        verdict
    assert "compute" in page.text_content(f"{card('gradcam')} .timing")
    assert page.is_hidden(f"{card('gradcam')} .faithfulness")  # metrics were not asked for

    # colour map, view and opacity are applied in the page: no request is sent
    sent = []
    page.on("request", lambda r: sent.append(r.url))
    assert page.input_value("#colormap-select") == "viridis"  # perceptually uniform by default
    before = canvas_stats(page, f"{card('gradcam')} canvas.heat")
    page.select_option("#colormap-select", "inferno")
    page.fill("#opacity", "0.6")
    page.dispatch_event("#opacity", "input")
    after = canvas_stats(page, f"{card('gradcam')} canvas.heat")
    assert after["mean"] != before["mean"] and after["alpha"] < before["alpha"]
    assert page.text_content("#opacity-value") == "60%"
    assert [url for url in sent if "/v1/" in url] == []
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer.png"), full_page=True)

    # downloads: the overlay PNG at the photo's size, the map as .npy
    with page.expect_download() as download:
        page.click(f"{card('gradcam')} .download-overlay")
    png = Image.open(download.value.path())
    assert png.format == "PNG" and png.size == (451, 300)
    with page.expect_download() as download:
        page.click(f"{card('gradcam')} .download-npy")
    import numpy as np

    heat = np.load(download.value.path(), allow_pickle=False)
    assert heat.shape == (224, 224) and heat.dtype == np.float32 and 0 <= heat.min() <= heat.max() <= 1

    # another class, chosen with the keyboard: every map explains it, and the focus stays on the class
    second = page.locator("#top-k button >> nth=1")
    index = second.get_attribute("data-index")
    second.focus()
    page.keyboard.press("Enter")
    page.wait_for_selector(f"#top-k button[data-index='{index}'][aria-pressed='true']")
    for method in ("gradcam", "integrated-gradients"):
        page.wait_for_function(f"""() => document.querySelector("{card(method)}").dataset.state === 'done'
            && document.querySelector("{card(method)} .card-context").textContent
                .includes('class {index} ')""")
    assert page.evaluate("document.activeElement.dataset.index") == index
    assert page.get_attribute("#top-k button >> nth=0", "aria-pressed") == "false"
    assert f"class {index} " in page.text_content("#run-context")
    assert page.errors == []


@pytest.mark.slow
@pytest.mark.browser
def test_moreaugrad_runs_as_a_job_with_progress_and_cancel(page, chelsea, tmp_path):
    page.set_input_files("#image-input", str(save_jpeg(chelsea, tmp_path / "chelsea.jpg")))
    page.uncheck("#method-gradcam")
    page.check("#method-moreaugrad")
    set_param(page, "moreaugrad", "iterations", "4")
    set_param(page, "moreaugrad", "n_samples", "2")
    assert "8 passes (4 iterations × 2 n_samples)" in page.text_content("#method-moreaugrad-cost")
    page.click("#run-button")
    wait_state(page, "moreaugrad", "done")
    bar = f"{card('moreaugrad')} .job-progress"
    assert page.is_visible(bar)
    assert page.eval_on_selector(bar, "p => [p.value, p.max]") == [4, 4]
    assert page.text_content(f"{card('moreaugrad')} .job-count") == "4 / 4 steps"
    assert canvas_stats(page, f"{card('moreaugrad')} canvas.heat")["std"] > 10
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer-moreaugrad.png"), full_page=True)

    # a long one, cancelled from the page
    set_param(page, "moreaugrad", "iterations", "2000")
    set_param(page, "moreaugrad", "n_samples", "1")
    page.click("#run-button")
    page.wait_for_selector(f"{card('moreaugrad')} .cancel:not([disabled])")
    page.wait_for_function(f"() => document.querySelector(\"{card('moreaugrad')} .job-progress\").value > 0")
    page.click(f"{card('moreaugrad')} .cancel")
    wait_state(page, "moreaugrad", "cancelled")
    assert page.errors == []


@pytest.mark.slow
@pytest.mark.browser
def test_server_errors_are_shown_in_plain_words(page, chelsea, tmp_path):
    junk = tmp_path / "notes.png"
    junk.write_bytes(b"these are not pixels")
    page.set_input_files("#image-input", str(junk))
    page.click("#run-button")
    wait_state(page, "gradcam", "error")
    message = page.text_content(f"{card('gradcam')} .card-error")
    assert message.startswith("The server could not use this request.")
    assert "not a recognised image format" in message
    assert page.is_visible(f"{card('gradcam')} .retry")

    # a parameter out of its bounds is caught before anything is sent
    page.set_input_files("#image-input", str(save_jpeg(chelsea, tmp_path / "chelsea.jpg")))
    page.check("#method-smoothgrad")
    set_param(page, "smoothgrad", "n_samples", "5000")
    page.click("#run-button")
    expected = "n_samples must be a whole number (default 25; range 1 to 1024)"
    assert expected in page.text_content("#form-error")


@pytest.mark.slow
@pytest.mark.browser
def test_a_2000_by_1500_photo_is_drawn_downscaled_and_quickly(page, chelsea, tmp_path):
    big = save_jpeg(chelsea.resize((2000, 1500), Image.Resampling.BICUBIC), tmp_path / "big.jpg")
    started = time.monotonic()
    page.set_input_files("#image-input", str(big))
    page.wait_for_selector("#preview:not([hidden])")
    shown_s = time.monotonic() - started
    page.click("#run-button")
    wait_state(page, "gradcam", "done")
    total_s = time.monotonic() - started
    stats = canvas_stats(page, f"{card('gradcam')} canvas.heat")
    assert (stats["width"], stats["height"]) == (960, 720)
    recolour_ms = page.evaluate("""() => {
        const s = document.querySelector('#colormap-select');
        const t0 = performance.now();
        s.value = 'inferno'; s.dispatchEvent(new Event('change'));
        return performance.now() - t0; }""")
    timings = {"image_shown_s": round(shown_s, 3), "gradcam_done_s": round(total_s, 3),
               "recolour_ms": round(recolour_ms, 1),
               "timing": page.text_content(f"{card('gradcam')} .timing")}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "viewer-2000x1500.json").write_text(json.dumps(timings, indent=1))
    print(timings)
    assert shown_s < 5 and recolour_ms < 200, timings
    with page.expect_download() as download:
        page.click(f"{card('gradcam')} .download-overlay")
    assert Image.open(io.BytesIO(Path(download.value.path()).read_bytes())).size == (2000, 1500)
    assert page.errors == []


@pytest.mark.slow
@pytest.mark.browser
def test_the_page_asks_for_an_api_key_when_the_server_needs_one(browser, registry):
    key = "s" * 24
    with running_server(Settings(api_key=key), registry) as (base, _):
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(base + "/")
        page.wait_for_function(f"() => {STATUS}.includes('API key')")
        page.click("#api-key-details summary")
        page.fill("#api-key", key)
        page.press("#api-key", "Tab")  # change event
        page.wait_for_function(f"() => {STATUS}.startsWith('Ready')")
        assert page.is_checked("#method-gradcam")
        context.close()



