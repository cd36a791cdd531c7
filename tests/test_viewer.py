"""The web viewer at /: its files as served, and the page driven in a real browser (Debian's chromium).

The browser tests skip, saying why, when chromium or the playwright package is absent; `make test` installs
playwright, and chromium through apt when CI=true. The screenshots land in artifacts/viewer*.png.
The sanity badges are tested against /v1/models and the sanity job as routed by Playwright (`page.route`), so
they do not depend on the server's sanity report.
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
from tests.conftest import ROOT
from tests.server import running_server

ARTIFACTS = ROOT / "artifacts"
TIMEOUT_MS = 120_000  # CPU inference on a shared machine
STATUS = "document.querySelector('#server-status').textContent"


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
                   'id="opacity"', 'id="run-button"', 'role="alert"'):
        assert needle in html
    # every asset the page references is served with its type
    refs = re.findall(r'(?:src|href)="/static/([^"]+)"', html)
    assert {"viewer.js", "viewer.css"} <= set(refs)
    for name in refs:
        r = httpx.get(f"{base}/static/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"].split(";")[0] in ("text/javascript", "text/css")
    # and the modules viewer.js imports
    for name in re.findall(r'from "\./([^"]+)"', httpx.get(f"{base}/static/viewer.js").text):
        assert name in FILES
        assert httpx.get(f"{base}/static/{name}").status_code == 200


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


def open_viewer(browser, base: str, routes: dict | None = None):
    """A new browser context on the viewer, ready; `routes` (URL glob -> handler) are set before it loads.
    Page errors and console errors are collected in page.errors."""
    context = browser.new_context(viewport={"width": 1500, "height": 1250}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("console", lambda msg: msg.type == "error" and page.errors.append(msg.text))
    for pattern, handler in (routes or {}).items():
        page.route(pattern, handler)
    page.goto(base + "/")
    page.wait_for_function(f"() => {STATUS}.startsWith('Ready')")
    return context, page


@pytest.fixture
def page(browser, server):
    context, page = open_viewer(browser, server[0])
    yield page
    context.close()


def save_jpeg(image: Image.Image, path: Path) -> Path:
    image.save(path, "JPEG", quality=92)
    return path


def card(method: str) -> str:
    return f".card[data-method='{method}']"


def wait_state(page, method: str, state: str):
    page.wait_for_selector(f"{card(method)}[data-state='{state}']")


def canvas_stats(page, selector: str) -> dict:
    """Size, and the spread of pixel values, of a canvas as drawn."""
    return page.eval_on_selector(selector, """c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0, s = 0, s2 = 0;
        for (let i = 0; i < d.length; i += 4 * 7) {
            const v = d[i] + d[i + 1] + d[i + 2]; n++; s += v; s2 += v * v;
        }
        const mean = s / n;
        return {width: c.width, height: c.height, mean, std: Math.sqrt(Math.max(0, s2 / n - mean * mean)),
                opacity: getComputedStyle(c).opacity};
    }""")


@pytest.mark.slow
@pytest.mark.browser
def test_gradcam_and_ig_on_chelsea_render_overlays_and_predict_a_cat(page, chelsea, tmp_path):
    photo = save_jpeg(chelsea, tmp_path / "chelsea.jpg")
    page.set_input_files("#image-input", str(photo))
    page.wait_for_selector("#preview:not([hidden])")
    assert "451 × 300" in page.text_content("#image-info")
    page.check("#method-integrated-gradients")
    # defaults and bounds from GET /v1/methods are shown
    assert page.input_value("#param-integrated-gradients-n_steps") == "50"
    assert "Default 50; range 1 to 1024" in page.text_content("#param-integrated-gradients-n_steps-hint")
    page.fill("#param-integrated-gradients-n_steps", "8")
    page.focus("#run-button")
    page.keyboard.press("Enter")  # keyboard only
    for method in ("gradcam", "integrated-gradients"):
        wait_state(page, method, "done")
        overlay = canvas_stats(page, f"{card(method)} canvas.heat")
        base = canvas_stats(page, f"{card(method)} canvas.base")
        assert (overlay["width"], overlay["height"]) == (451, 300)  # drawn at the photo's aspect
        assert base["std"] > 10 and overlay["std"] > 10, (method, base, overlay)
        labels = page.locator(f"{card(method)} .top-k .label").all_text_contents()
        assert len(labels) == 5 and "cat" in labels[0], labels
        assert page.get_attribute(f"{card(method)} .top-k button >> nth=0", "aria-pressed") == "true"
    ig_diagnostics = page.text_content(f"{card('integrated-gradients')} .diagnostics")
    assert "convergence_delta" in ig_diagnostics
    assert "compute" in page.text_content(f"{card('gradcam')} .timing")
    assert page.is_hidden(f"{card('gradcam')} .faithfulness")  # metrics were not asked for

    # colour map and opacity are applied in the page: no request is sent
    sent = []
    page.on("request", lambda r: sent.append(r.url))
    before = canvas_stats(page, f"{card('gradcam')} canvas.heat")
    page.select_option("#colormap-select", "viridis")
    page.fill("#opacity", "0.6")
    page.dispatch_event("#opacity", "input")
    after = canvas_stats(page, f"{card('gradcam')} canvas.heat")
    assert after["mean"] != before["mean"] and after["opacity"] == "0.6"
    assert page.text_content("#opacity-value") == "60%"
    assert sent == []
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

    # another class, by pressing it
    second = page.locator(f"{card('gradcam')} .top-k button >> nth=1")
    index = second.get_attribute("data-index")
    second.click()
    pressed = f"{card('gradcam')} .top-k button[data-index='{index}']"
    page.wait_for_selector(f"{pressed}[aria-pressed='true']")
    wait_state(page, "gradcam", "done")
    assert f"class {index}" in page.text_content(f"{card('gradcam')} .explained")
    assert page.errors == []


@pytest.mark.slow
@pytest.mark.browser
def test_moreaugrad_runs_as_a_job_with_progress_and_cancel(page, chelsea, tmp_path):
    page.set_input_files("#image-input", str(save_jpeg(chelsea, tmp_path / "chelsea.jpg")))
    page.uncheck("#method-gradcam")
    page.check("#method-moreaugrad")
    page.fill("#param-moreaugrad-iterations", "4")
    page.fill("#param-moreaugrad-n_samples", "2")
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
    page.fill("#param-moreaugrad-iterations", "2000")
    page.fill("#param-moreaugrad-n_samples", "1")
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

    # a parameter out of its bounds is caught before anything is sent
    page.set_input_files("#image-input", str(save_jpeg(chelsea, tmp_path / "chelsea.jpg")))
    page.check("#method-smoothgrad")
    page.fill("#param-smoothgrad-n_samples", "5000")
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
        page.click("summary")
        page.fill("#api-key", key)
        page.press("#api-key", "Tab")  # change event
        page.wait_for_function(f"() => {STATUS}.startsWith('Ready')")
        assert page.is_checked("#method-gradcam")
        context.close()



# ------------------------------------------------------------------------------------------ per-map metrics


@pytest.mark.slow
@pytest.mark.browser
def test_faithfulness_metrics_show_in_words_and_as_a_deletion_plot(page, chelsea, tmp_path):
    page.set_input_files("#image-input", str(save_jpeg(chelsea, tmp_path / "chelsea.jpg")))
    assert not page.is_checked("#metrics")  # off by default: it costs forward passes
    assert "77 extra forward passes" in page.inner_text("#metrics-hint")
    page.check("#metrics")
    page.check("#method-smoothgrad")
    page.fill("#param-smoothgrad-n_samples", "4")
    page.click("#run-button")  # the server answers `metrics` only when outputs names it
    for method in ("gradcam", "smoothgrad"):
        wait_state(page, method, "done")

    box = f"{card('gradcam')} .faithfulness"
    assert page.is_visible(box)
    text = page.text_content(box)
    area = r"class probability area \d+\.\d\d vs \d+\.\d\d for a random order"
    assert re.search(rf"Deleting the top pixels first: {area} \(lower = more faithful\)", text), text
    assert re.search(rf"Inserting the top pixels first: {area} \(higher = more faithful\)", text), text
    assert "20 steps; deleted pixels replaced by blur" in text
    assert not page.is_visible(f"{box} .stability")  # Grad-CAM is deterministic: no stability
    plot = f"{box} svg.curve-plot"
    assert page.get_attribute(plot, "role") == "img"
    title_id = page.get_attribute(plot, "aria-labelledby")
    assert page.text_content(f"#{title_id}").startswith("Deletion curve of Grad-CAM")
    # the map's curve and the random order's, K + 1 = 21 points each
    curves = page.eval_on_selector_all(
        f"{plot} polyline", "ps => ps.map(p => ({cls: p.getAttribute('class'), n: p.points.numberOfItems}))")
    assert sorted(c["cls"] for c in curves) == ["curve-map", "curve-random"]
    assert all(c["n"] == 21 for c in curves), curves
    assert "top first" in page.text_content(plot) and "random" in page.text_content(plot)

    stability = page.text_content(f"{card('smoothgrad')} .faithfulness .stability")
    assert re.fullmatch(r"Stability -?\d\.\d\d \(rank correlation of two halves of the samples\)", stability)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer-metrics.png"), full_page=True)
    assert page.errors == []


# ------------------------------------------------------------------------------------------ sanity badges

PASS_REASON = "the map decorrelates once every layer is random (Spearman 0.00 < 0.5)"
FAIL_REASON = "the map keeps its ranks once every layer is random (Spearman 0.67 >= 0.5)"
MISSING = object()  # models_with_sanity: no `sanity` key at all (a server from before the report)
SANITY_DONE = {"status": "done", "job_id": "sanity-0",
               "methods": {"gradcam": {"verdict": "pass", "reason": PASS_REASON},
                           "fullgrad": {"verdict": "fail", "reason": FAIL_REASON}}}


def models_with_sanity(sanity):
    """A /v1/models route: the server's answer, each model's `sanity` set to sanity() (MISSING: removed)."""
    def handle(route):
        response = route.fetch()
        models = response.json()
        for model in models:
            value = sanity()
            if value is MISSING:
                model.pop("sanity", None)
            else:
                model["sanity"] = value
        route.fulfill(response=response, json=models)
    return handle


def job(status: str, done: int, total: int = 4, **more) -> dict:
    return {"id": "sanity-job-1", "method": "sanity", "model": "efficientnet_lite0", "status": status,
            "progress": {"done": done, "total": total}, "created": 0.0, **more}


@pytest.mark.slow
@pytest.mark.browser
def test_sanity_verdicts_are_shown_beside_the_methods_and_on_the_cards(browser, server, chelsea, tmp_path):
    context, page = open_viewer(browser, server[0], {"**/v1/models": models_with_sanity(lambda: SANITY_DONE)})
    try:
        assert page.text_content("#method-gradcam-sanity") == "sanity: pass"
        assert page.get_attribute("#method-gradcam-sanity", "title") == PASS_REASON
        assert not page.is_visible("#method-gradcam-sanity-reason")
        assert page.text_content("#method-fullgrad-sanity") == "sanity: fail"
        assert page.get_attribute("#method-fullgrad-sanity", "title") == FAIL_REASON
        assert page.text_content("#method-fullgrad-sanity-reason") == f"Sanity check failed: {FAIL_REASON}"
        assert page.is_visible("#method-fullgrad-sanity-reason")
        assert not page.is_visible("#method-integrated-gradients-sanity")  # not in the report
        assert "method-fullgrad-sanity-reason" in page.get_attribute("#method-fullgrad", "aria-describedby")
        assert "1 method passes, 1 fails" in page.text_content("#sanity-status")
        assert page.is_hidden("#sanity-run")  # the report stands for these weights

        page.set_input_files("#image-input", str(save_jpeg(chelsea, tmp_path / "chelsea.jpg")))
        page.check("#method-fullgrad")
        page.click("#run-button")
        assert page.text_content(f"{card('gradcam')} .card-sanity") == "sanity: pass"
        line = page.text_content(f"{card('fullgrad')} .card-sanity")
        assert line.startswith("sanity: fail") and FAIL_REASON in line
        for method in ("gradcam", "fullgrad"):
            wait_state(page, method, "done")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "viewer-sanity.png"), full_page=True)
        assert page.errors == []
    finally:
        context.close()


@pytest.mark.slow
@pytest.mark.browser
def test_run_sanity_check_posts_follows_the_job_and_refreshes_the_badges(browser, server):
    flags = {"finish": False, "sanity": None, "posts": [], "polls": 0}
    report = {"model": "efficientnet_lite0", "images": 4, "seed": 0,
              "methods": {name: {"levels": [], "random_target": {"spearman": 0.1}, **verdict}
                          for name, verdict in SANITY_DONE["methods"].items()}}

    def post(route):
        if route.request.method != "POST":
            return route.fallback()
        flags["posts"].append((route.request.url, route.request.post_data_json))
        route.fulfill(status=202, json=job("queued", 0))

    def poll(route):
        flags["polls"] += 1
        if not flags["finish"]:
            return route.fulfill(json=job("running", 2))
        flags["sanity"] = SANITY_DONE  # what GET /v1/models says once the report is done
        route.fulfill(json=job("succeeded", 4, result=report))

    context, page = open_viewer(browser, server[0], {
        "**/v1/models": models_with_sanity(lambda: flags["sanity"]),
        "**/v1/models/*/sanity": post,
        "**/v1/jobs/sanity-job-1": poll})
    try:
        model = page.input_value("#model-select")
        assert page.text_content("#sanity-status") == f"No sanity report yet for {model}."
        assert not page.is_visible("#method-gradcam-sanity")
        page.click("#sanity-run")
        page.wait_for_function("() => document.querySelector('#sanity-status').textContent"
                               ".endsWith('2 / 4 steps')")
        assert page.is_hidden("#sanity-run")
        assert page.eval_on_selector("#sanity-progress", "p => [p.hidden, p.value, p.max]") == [False, 2, 4]
        assert flags["posts"] == [(f"{server[0]}/v1/models/{model}/sanity", {})]
        flags["finish"] = True
        page.wait_for_selector("#method-gradcam-sanity:not([hidden])")
        assert page.text_content("#method-gradcam-sanity") == "sanity: pass"
        assert page.text_content("#method-fullgrad-sanity-reason") == f"Sanity check failed: {FAIL_REASON}"
        assert "1 method passes, 1 fails" in page.text_content("#sanity-status")
        assert page.is_hidden("#sanity-progress") and page.is_hidden("#sanity-run")
        assert page.errors == []
    finally:
        context.close()


@pytest.mark.slow
@pytest.mark.browser
def test_sanity_errors_are_shown_and_an_older_server_shows_no_sanity(browser, server):
    def refuse(route):
        if route.request.method != "POST":
            return route.fallback()
        message = "a sanity check of this model is already running"
        route.fulfill(status=409, json={"error": {"code": "conflict", "message": message}})

    context, page = open_viewer(browser, server[0], {"**/v1/models": models_with_sanity(lambda: None),
                                                      "**/v1/models/*/sanity": refuse})
    try:
        page.click("#sanity-run")
        page.wait_for_selector("#sanity-error:not([hidden])")
        assert page.text_content("#sanity-error") == ("Unexpected answer from the server (HTTP 409). "
                                                      "A sanity check of this model is already running.")
        assert page.is_visible("#sanity-run") and page.is_enabled("#run-button") is False  # no image yet
        assert [e for e in page.errors if "409" not in e] == []  # the browser logs the refused request
    finally:
        context.close()

    # a server from before the sanity report: no `sanity` in /v1/models, so no badges and no button
    context, page = open_viewer(browser, server[0], {"**/v1/models": models_with_sanity(lambda: MISSING)})
    try:
        assert page.is_hidden("#sanity")
        assert page.locator("#methods .badge:visible").count() == 0
        assert page.is_checked("#method-gradcam")
        assert page.errors == []
    finally:
        context.close()
