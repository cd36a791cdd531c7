"""The viewer's evidence of how far to trust a map, driven in Chromium: the per-map faithfulness metrics in
words with a verdict and the deletion curve, and each method's sanity verdict for the model (beside the
methods and on the cards). The sanity badges are tested against /v1/models and the sanity job as routed by
Playwright (`page.route`), so they do not depend on the server's sanity report."""
from __future__ import annotations

import re

import pytest

from service.settings import Settings
from tests.server import running_server
from tests.viewer_page import ARTIFACTS, card, open_viewer, save_jpeg, set_param, wait_state


@pytest.fixture(scope="module")
def server(registry):
    with running_server(Settings(max_wait_ms=5), registry) as (base, app):
        yield base, app


@pytest.fixture
def page(browser, server):
    context, page = open_viewer(browser, server[0])
    yield page
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
    set_param(page, "smoothgrad", "n_samples", "4")
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
    # one verdict in words against the random order
    verdict = page.text_content(f"{box} .verdict")
    assert re.match(r"(good|fair|poor) (Removing the pixels|No better|Better than)", verdict), verdict
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
    halves = r"\(rank correlation of two halves of the samples\): two halves .+"
    assert re.fullmatch(rf"Stability -?\d\.\d\d {halves}", stability), stability
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
