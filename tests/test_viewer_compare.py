"""The viewer's comparison view, driven in Chromium (issue 28): the methods side by side over one photo with
one class picker, one colour bar and one zoom; the rendering (heat with opacity following the value, top x %,
signed); results in view and a busy Explain; a busy server (a 429 and a 504 for one method each, the others
shown, retry per card, Explain again keeps what succeeded); the cost before running; the history; the link;
the phone; the health line; a detector's boxes. Screenshots: artifacts/viewer-compare-*.png;
with SALIENCY_UPDATE_SCREENSHOTS=1, docs/viewer/compare-1280.png, compare-1280-signed.png and
compare-phone.png (look at them, then commit them: each under 400 kB)."""
from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from service.settings import Settings
from tests.server import running_server
from tests.viewer_page import (
    ARTIFACTS,
    STATUS,
    canvas_stats,
    card,
    docs_screenshot,
    open_viewer,
    save_jpeg,
    save_screenshot,
    set_param,
    wait_state,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def server(registry):
    with running_server(Settings(max_wait_ms=5), registry) as (base, app):
        yield base, app


@pytest.fixture
def page(browser, server):
    context, page = open_viewer(browser, server[0])
    yield page
    context.close()


@pytest.fixture(scope="module")
def photo(chelsea, tmp_path_factory):
    return save_jpeg(chelsea, tmp_path_factory.mktemp("photos") / "chelsea.jpg")


def explain(page, photo, methods: dict[str, dict[str, str]]):
    """Choose the photo, tick exactly `methods` (name -> parameters to set) and press Explain."""
    page.set_input_files("#image-input", str(photo))
    page.wait_for_selector("#preview:not([hidden])")
    ticked = page.eval_on_selector_all("#method-list input[name='method']:checked", "cs => cs.map(c => c.id)")
    for id_ in ticked:
        page.uncheck(f"#{id_}")
    for method, params in methods.items():
        page.check(f"#method-{method}")
        for name, value in params.items():
            set_param(page, method, name, value)
    page.click("#run-button")


def in_view(page, selector: str) -> bool:
    return page.eval_on_selector(selector, """e => { const r = e.getBoundingClientRect();
        return r.top >= 0 && r.top < window.innerHeight; }""")


def settle_scroll(page):
    """Wait for a smooth scroll (the page's own, to the results) to end: a screenshot taken during one comes
    out half painted."""
    page.wait_for_function("""() => new Promise(done => { const y = scrollY;
        setTimeout(() => done(scrollY === y), 300); })""")


def transforms(page) -> list[str]:
    return page.eval_on_selector_all(".card .stack", "ss => ss.map(s => s.style.transform)")


# ------------------------------------------------------------------------------------------ comparison


def test_methods_side_by_side_cheap_first_with_one_class_picker_colour_bar_and_zoom(page, photo):
    sent = []
    page.on("request", lambda r: "/v1/explain/" in r.url and sent.append(r.url.rsplit("/", 1)[1]))
    explain(page, photo, {"integrated-gradients": {"n_steps": "8"}, "smoothgrad": {"n_samples": "4"},
                          "gradcam": {}})
    # cheap methods first: the cards and the requests both in order of passes (1, 4, 8)
    assert sent == ["gradcam", "smoothgrad", "integrated-gradients"]
    order = page.eval_on_selector_all("#cards .card", "cs => cs.map(c => c.dataset.method || 'photo')")
    assert order == ["photo", "gradcam", "smoothgrad", "integrated-gradients"]
    for method in ("gradcam", "smoothgrad", "integrated-gradients"):
        wait_state(page, method, "done")
    # one top-5 list and one colour bar for every map
    assert page.locator("#top-k button").count() == 5
    assert page.get_attribute("#colorbar", "data-colormap") == "viridis"
    assert page.text_content("#legend-high") == "most important"
    # zoom and pan: every map follows
    page.click("#zoom-in")
    page.click("#zoom-in")
    assert page.text_content("#zoom-value") == "225%"
    zoomed = transforms(page)
    assert len(zoomed) == 4 and len(set(zoomed)) == 1 and "scale(2.25)" in zoomed[0]
    page.focus(f"{card('smoothgrad')} .viewport")
    page.keyboard.press("+")
    assert page.text_content("#zoom-value") == "338%"
    box = page.locator(f"{card('gradcam')} .viewport").bounding_box()
    before = transforms(page)[0]
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 + 40, box["y"] + box["height"] / 2 + 20, steps=4)
    page.mouse.up()
    panned = transforms(page)
    assert len(set(panned)) == 1 and panned[0] != before
    page.keyboard.down("Control")
    page.mouse.wheel(0, 300)  # Ctrl + wheel (and a touchpad's pinch) zooms out
    page.keyboard.up("Control")
    assert page.text_content("#zoom-value") != "338%"
    page.click("#zoom-reset")
    assert set(transforms(page)) == {""} and page.text_content("#zoom-value") == "100%"
    assert page.errors == []


def test_rendering_heat_top_pixels_and_signed(page, photo):
    explain(page, photo, {"gradcam": {}, "gradient": {}})
    for method in ("gradcam", "gradient"):
        wait_state(page, method, "done")
    heat = f"{card('gradient')} canvas.heat"
    # heat: opacity follows the value, so the photo under a fine-grained map stays mostly clear
    stats = canvas_stats(page, heat)
    assert stats["alpha"] < 0.4 * 255 and stats["std"] > 10, stats
    assert canvas_stats(page, f"{card('gradcam')} canvas.heat")["alpha"] > stats["alpha"]

    # top 10 %: about a tenth of each map's pixels left clear, the rest dimmed
    page.select_option("#view-select", "top")
    assert page.is_visible("#top-percent") and page.is_hidden("#colorbar")
    for method in ("gradcam", "gradient"):
        clear = canvas_stats(page, f"{card(method)} canvas.heat")["clear"]
        assert 0.05 < clear < 0.2, (method, clear)
    page.fill("#top-percent", "30")
    page.dispatch_event("#top-percent", "input")
    assert 0.2 < canvas_stats(page, f"{card('gradcam')} canvas.heat")["clear"] < 0.45
    assert "top 30%" in page.text_content("#legend-text")

    # signed: the gradient has a sign (red for the class, blue against); Grad-CAM's layer map here has none
    page.select_option("#view-select", "signed")
    assert page.get_attribute("#colorbar", "data-colormap") == "coolwarm"
    assert page.is_disabled("#colormap-select")
    assert page.get_attribute(heat, "data-view") == "signed"
    assert page.is_hidden(f"{card('gradient')} .card-note")
    reds, blues = page.eval_on_selector(heat, """c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let r = 0, b = 0;
        for (let i = 0; i < d.length; i += 4) {
            if (d[i] > d[i + 2] + 40) r++; else if (d[i + 2] > d[i] + 40) b++; }
        return [r, b]; }""")
    assert reds > 100 and blues > 100, (reds, blues)
    assert "not signed" in page.text_content(f"{card('gradcam')} .card-note")
    assert page.get_attribute(f"{card('gradcam')} canvas.heat", "data-view") == "heat"
    # the overlay download is drawn as shown
    with page.expect_download() as download:
        page.click(f"{card('gradient')} .download-overlay")
    assert Image.open(download.value.path()).size == (451, 300)

    # the map alone, without the photo
    page.uncheck("#photo-toggle")
    page.select_option("#view-select", "heat")
    assert canvas_stats(page, f"{card('gradcam')} canvas.heat")["alpha"] == 255
    base = f"{card('gradcam')} canvas.base"
    assert page.eval_on_selector(base, "c => getComputedStyle(c).visibility") == "hidden"
    assert page.errors == []


# ------------------------------------------------------------------------------------------ results in view


def test_explain_shows_it_is_busy_and_brings_the_results_into_view(browser, server, photo):
    held = []
    hold = {"**/v1/explain/gradcam": lambda route: held.append(route)}  # answered when the test says
    context, page = open_viewer(browser, server[0], hold, viewport=(1280, 800))
    try:
        page.set_input_files("#image-input", str(photo))
        page.wait_for_selector("#preview:not([hidden])")
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.focus("#run-button")
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.querySelector('#run-button').textContent"
                               ".startsWith('Explaining')")
        assert page.text_content("#run-button") == "Explaining… 0 of 1 done"
        assert page.get_attribute("#run-button", "aria-disabled") == "true"
        assert page.get_attribute("#results", "aria-busy") == "true"
        page.wait_for_function("() => { const r = document.querySelector('#results-heading')"
                               ".getBoundingClientRect(); return r.top >= 0 && r.top < innerHeight; }")
        page.keyboard.press("Enter")  # pressed again while busy: nothing new is sent
        page.wait_for_timeout(200)
        assert len(held) == 1
        held[0].continue_()
        wait_state(page, "gradcam", "done")
        assert page.text_content("#run-button") == "Explain"
        assert page.get_attribute("#results", "aria-busy") == "false"
        assert page.evaluate("document.activeElement.id") == "run-button"  # the focus stayed
        assert page.errors == []
    finally:
        context.close()


# ------------------------------------------------------------------------------------------ busy server


def test_a_busy_server_fails_one_card_the_others_show_and_retry_works(browser, server, photo):
    refused = {"smoothgrad": 0, "integrated-gradients": 0}

    def refuse_once(method: str, status: int, body: dict, headers: dict):
        def handle(route):
            if refused[method]:
                return route.fallback()
            refused[method] += 1
            route.fulfill(status=status, json=body, headers=headers)
        return handle

    busy = {"error": {"code": "queue_full", "message": "the interactive queue is full"}}
    late = {"error": {"code": "deadline_exceeded", "message": "work could not start before its deadline"}}
    context, page = open_viewer(browser, server[0], {
        "**/v1/explain/smoothgrad": refuse_once("smoothgrad", 429, busy, {"Retry-After": "3"}),
        "**/v1/explain/integrated-gradients": refuse_once("integrated-gradients", 504, late, {})})
    try:
        sent = []
        page.on("request", lambda r: "/v1/explain/" in r.url and sent.append(r.url.rsplit("/", 1)[1]))
        explain(page, photo, {"gradcam": {}, "smoothgrad": {"n_samples": "4"},
                              "integrated-gradients": {"n_steps": "8"}})
        wait_state(page, "gradcam", "done")
        wait_state(page, "smoothgrad", "error")
        wait_state(page, "integrated-gradients", "error")
        assert page.text_content(f"{card('smoothgrad')} .card-error") == (
            "The server is busy (its queue is full). Try again in 3 seconds.")
        assert page.text_content(f"{card('integrated-gradients')} .card-error").startswith(
            "The server was too busy to start this in time.")
        assert page.is_visible(f"{card('smoothgrad')} .retry") and page.is_hidden(f"{card('gradcam')} .retry")
        assert page.text_content("#run-button") == "Explain"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "viewer-busy.png"), full_page=True)

        # a retry on the card runs that method alone
        page.click(f"{card('smoothgrad')} .retry")
        wait_state(page, "smoothgrad", "done")
        assert page.is_hidden(f"{card('smoothgrad')} .card-problem")
        # Explain again keeps the maps that succeeded and runs the one that failed
        page.click("#run-button")
        wait_state(page, "integrated-gradients", "done")
        assert sorted(sent) == sorted(["gradcam", "smoothgrad", "integrated-gradients", "smoothgrad",
                                       "integrated-gradients"]), sent
        assert page.errors == [] or all("429" in e or "504" in e for e in page.errors), page.errors
    finally:
        context.close()


# ------------------------------------------------------------------------------------------ cost


def timings(rates: list[dict]):
    def handle(route):
        route.fulfill(json={"rates": rates, "queue_s": {"interactive": 0.0, "bulk": None},
                            "bulk_above_passes": 2000})
    return handle


def test_the_cost_shows_passes_and_time_from_the_servers_figures(browser, server, photo):
    rates = [{"model": "efficientnet_lite0", "method": "moreaugrad", "seconds_per_pass": 0.05, "images": 3},
             {"model": "efficientnet_lite0", "method": "gradcam", "seconds_per_pass": 0.02, "images": 5}]
    context, page = open_viewer(browser, server[0], {"**/v1/timings": timings(rates)})
    try:
        # the cost lines are drawn before GET /v1/timings answers, then again with its figures
        page.wait_for_function("document.querySelector('#method-moreaugrad-cost').textContent.includes('about')")
        assert page.text_content("#method-moreaugrad-cost") == (
            "6,400 passes (200 iterations × 32 n_samples); about 5 min; runs as a job (progress, Cancel).")
        assert page.text_content("#method-gradcam-cost") == "1 pass; about under a second."
        # no figure of its own: the model's other methods' (median), said to be rough
        assert page.text_content("#method-integrated-gradients-cost") == (
            "50 passes; about 2.5 s (from its other methods).")
        assert page.text_content("#run-cost") == "1 method: 1 pass, about under a second."
        page.check("#method-moreaugrad")
        assert page.text_content("#run-cost") == "2 methods: 6,401 passes, about 5 min."
        set_param(page, "moreaugrad", "iterations", "10")
        assert page.text_content("#method-moreaugrad-cost").startswith(
            "320 passes (10 iterations × 32 n_samples); about 16 s; runs as a job")
        page.check("#metrics")
        assert "1 pass + 77 for the metrics; about" in page.text_content("#method-gradcam-cost")
    finally:
        context.close()

    # a server that has answered nothing for this model yet: passes only
    context, page = open_viewer(browser, server[0], {"**/v1/timings": timings([])})
    try:
        assert page.text_content("#method-gradcam-cost") == "1 pass; time not measured on this server yet."
        # after a run, the server's own figure (GET /v1/timings, not routed now)
        page.unroute("**/v1/timings")
        explain(page, photo, {"gradcam": {}})
        wait_state(page, "gradcam", "done")
        page.wait_for_function("() => document.querySelector('#method-gradcam-cost').textContent"
                               ".includes('about')")
    finally:
        context.close()


# ------------------------------------------------------------------------------------------ history, link


def test_a_new_image_moves_the_maps_to_the_history(page, photo, chelsea, tmp_path):
    explain(page, photo, {"gradcam": {}})
    wait_state(page, "gradcam", "done")
    other = save_jpeg(chelsea.transpose(Image.Transpose.FLIP_LEFT_RIGHT), tmp_path / "mirrored.jpg")
    page.set_input_files("#image-input", str(other))
    page.wait_for_selector("#history:not([hidden])")
    assert page.locator("#cards .card").count() == 0 and page.is_hidden("#classes")
    assert "New image mirrored.jpg" in page.text_content("#results-empty")
    entry = page.text_content("#history-list li")
    assert entry.startswith("chelsea.jpg · efficientnet_lite0 · class 285") and "Grad-CAM" in entry
    assert canvas_stats(page, "#history-list canvas")["std"] > 10
    page.click("#run-button")
    wait_state(page, "gradcam", "done")
    context = page.text_content(f"{card('gradcam')} .card-context")
    assert context.startswith("mirrored.jpg · efficientnet_lite0"), context
    assert page.errors == []


def test_the_link_restores_the_settings_but_not_the_image(browser, server, page, photo):
    page.check("#method-integrated-gradients")
    set_param(page, "integrated-gradients", "n_steps", "8")
    page.select_option("#view-select", "top")
    page.select_option("#colormap-select", "inferno")
    explain(page, photo, {"gradcam": {}, "integrated-gradients": {"n_steps": "8"}})
    wait_state(page, "gradcam", "done")
    third = page.locator("#top-k button >> nth=2")
    index = third.get_attribute("data-index")
    third.click()
    wait_state(page, "gradcam", "done")
    link = page.url
    assert f"class={index}" in link and "p.integrated-gradients.n_steps=8" in link and "key" not in link
    page.click("#copy-link")
    assert "restores these settings, not the image" in page.text_content("#link-status")

    context, again = open_viewer(browser, server[0], path="/" + link.split("/", 3)[3])
    try:
        assert again.is_checked("#method-gradcam") and again.is_checked("#method-integrated-gradients")
        assert not again.is_checked("#method-smoothgrad")
        assert again.input_value("#param-integrated-gradients-n_steps") == "8"
        assert again.input_value("#view-select") == "top"
        assert again.input_value("#colormap-select") == "inferno"
        assert again.input_value("#model-select") == "efficientnet_lite0"
        assert again.is_hidden("#preview")  # not the image
        again.set_input_files("#image-input", str(photo))
        again.wait_for_selector("#preview:not([hidden])")
        again.uncheck("#method-integrated-gradients")
        again.click("#run-button")
        wait_state(again, "gradcam", "done")
        assert f"class {index} " in again.text_content(f"{card('gradcam')} .card-context")
        assert again.errors == []
    finally:
        context.close()


# ------------------------------------------------------------------------------------------ health


def test_the_header_follows_the_server(browser, server):
    context, page = open_viewer(browser, server[0], init_script="window.SALIENCY_HEALTH_MS = 200")
    try:
        page.route("**/readyz", lambda route: route.abort())
        page.wait_for_function(f"() => {STATUS}.startsWith('Cannot reach the server')")
        assert page.get_attribute("#server-status", "data-ok") == "false"
        page.unroute("**/readyz")
        page.wait_for_function(f"() => {STATUS}.startsWith('Ready')")
        assert page.get_attribute("#server-status", "data-ok") == "true"
    finally:
        context.close()


# ------------------------------------------------------------------------------------------ screens


def test_desktop_1280_by_800_screenshot(browser, server, photo):
    context, page = open_viewer(browser, server[0], viewport=(1280, 800))
    try:
        methods = {"gradcam": {}, "gradient": {}, "smoothgrad": {"n_samples": "8"},
                   "integrated-gradients": {"n_steps": "16"}}
        explain(page, photo, methods)
        for method in methods:
            wait_state(page, method, "done")
        assert in_view(page, "#results-heading")
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280
        # three maps across beside the form
        tops = page.eval_on_selector_all("#cards .card",
                                         "cs => cs.map(c => Math.round(c.getBoundingClientRect().top))")
        assert tops[0] == tops[1] == tops[2], tops
        settle_scroll(page)
        page.evaluate("window.scrollTo(0, 0)")
        path = save_screenshot(page, docs_screenshot("compare-1280.png"))
        assert Image.open(path).size == (1280, 800)
        # the fine-grained maps' row, signed
        page.select_option("#view-select", "signed")
        page.eval_on_selector(card("smoothgrad"), "c => window.scrollTo(0, c.offsetTop - 150)")
        save_screenshot(page, docs_screenshot("compare-1280-signed.png"))
        assert page.errors == []
    finally:
        context.close()


def test_the_phone_layout_is_one_column_with_no_horizontal_scroll(browser, server, photo):
    context, page = open_viewer(browser, server[0], viewport=(390, 844), is_mobile=True, has_touch=True)
    try:
        width = "document.documentElement.scrollWidth"
        assert page.evaluate(width) <= 390
        explain(page, photo, {"gradcam": {}, "gradient": {}})
        page.wait_for_function("() => { const r = document.querySelector('#results-heading')"
                               ".getBoundingClientRect(); return r.top >= 0 && r.top < innerHeight; }")
        for method in ("gradcam", "gradient"):
            wait_state(page, method, "done")
        assert page.evaluate(width) <= 390
        boxes = page.eval_on_selector_all(".card:not(.photo-card)", """cs => cs.map(c => {
            const r = c.getBoundingClientRect(); return [Math.round(r.left), Math.round(r.right)]; })""")
        assert len({left for left, _ in boxes}) == 1 and all(right <= 390 for _, right in boxes), boxes
        assert page.is_hidden(".photo-card")  # the photo is under the maps already
        settle_scroll(page)
        page.evaluate("document.querySelector('#results-heading').scrollIntoView()")
        path = save_screenshot(page, docs_screenshot("compare-phone.png"))
        assert Image.open(path).size == (390, 844)
        save_screenshot(page, ARTIFACTS / "viewer-phone-full.png", full_page=True)
        assert page.errors == []
    finally:
        context.close()


# ------------------------------------------------------------------------------------------ detections


def map_png(width: int, height: int, centre: tuple[float, float]) -> dict:
    """A detection's map as the API sends it: a blob at `centre` (fractions of the image)."""
    y, x = np.mgrid[0:height, 0:width]
    distance = (x / width - centre[0]) ** 2 + (y / height - centre[1]) ** 2
    heat = np.exp(-distance / 0.01).astype(np.float32)
    png = io.BytesIO()
    Image.fromarray((heat * 255).astype(np.uint8)).save(png, "PNG")
    npy = io.BytesIO()
    np.save(npy, heat)
    return {"height": height, "width": width, "png": base64.b64encode(png.getvalue()).decode(),
            "npy": base64.b64encode(npy.getvalue()).decode()}


def test_a_detectors_boxes_are_drawn_and_picking_one_shows_its_map(browser, server, photo):
    """The answer of a detector (docs/detection.md), routed: boxes over the photo, one map per box."""
    detections = [
        {"box": [60, 20, 200, 160], "label": "cat", "label_index": 17, "score": 0.97,
         "map": map_png(451, 300, (0.28, 0.3)), "diagnostics": {}},
        {"box": [300, 150, 440, 290], "label": "remote", "label_index": 75, "score": 0.41,
         "map": map_png(451, 300, (0.82, 0.75)), "diagnostics": {}}]
    body = {"model": "efficientnet_lite0", "method": "gradcam", "task": "detection", "params": {},
            "results": [{"width": 451, "height": 300, "timing_ms": {"compute": 12.0},
                         "detections": detections}]}
    context, page = open_viewer(browser, server[0], {"**/v1/explain/gradcam": lambda r: r.fulfill(json=body)})
    try:
        explain(page, photo, {"gradcam": {}})
        wait_state(page, "gradcam", "done")
        boxes = f"{card('gradcam')} svg.boxes"
        assert page.is_visible(boxes) and page.locator(f"{boxes} g.box").count() == 2
        assert page.get_attribute(boxes, "viewBox") == "0 0 451 300"
        buttons = page.locator(f"{card('gradcam')} .detections button").all_text_contents()
        assert buttons == ["cat 97%", "remote 41%"]

        def brighter_left() -> bool:
            return page.eval_on_selector(f"{card('gradcam')} canvas.heat", """c => {
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let l = 0, r = 0;
                for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++) {
                    const a = d[4 * (y * c.width + x) + 3]; if (x < c.width / 2) l += a; else r += a; }
                return l > r; }""")

        assert brighter_left()  # the first box's map
        assert "box 1 of 2: cat (97.0%)" in page.text_content(f"{card('gradcam')} .card-context")
        page.click(f"{card('gradcam')} .detections button >> nth=1")
        page.wait_for_selector(f"{card('gradcam')} .detections button[data-index='1'][aria-pressed='true']")
        assert not brighter_left()
        assert "box 2 of 2: remote (41.0%)" in page.text_content(f"{card('gradcam')} .card-context")
        assert page.get_attribute(f"{boxes} g.box >> nth=1", "data-selected") == "true"
        page.click(f"{boxes} g.box >> nth=0")  # a box itself picks its map too
        page.wait_for_selector(f"{card('gradcam')} .detections button[data-index='0'][aria-pressed='true']")
        with page.expect_download() as download:
            page.click(f"{card('gradcam')} .download-npy")
        assert re.search(r"-box1-map-300x451\.npy$", download.value.suggested_filename)
        assert page.is_hidden("#classes")  # a detector's answer has no top-5
        assert page.errors == []
    finally:
        context.close()
