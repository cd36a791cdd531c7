"""/docs and /redoc work offline: their scripts, styles and favicon come from this server
(service/api/docs.py), not from a CDN. The browser tests open them in Debian's chromium with every request off
loopback refused, and skip, saying why, without chromium or playwright (as tests/test_viewer.py does).
Screenshot: artifacts/docs.png.
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit

import httpx
import pytest
import torch

from service.settings import Settings
from tests.conftest import MODELS, ROOT
from tests.server import running_server

ARTIFACTS = ROOT / "artifacts"
PAGES = ("/docs", "/redoc")
TIMEOUT_MS = 60_000
KEY = "k" * 24


@pytest.fixture(scope="module")
def small_registry():
    from service.zoo import ModelRegistry

    return ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})


@pytest.fixture(scope="module")
def server(small_registry):
    with running_server(Settings(default_model="tiny_cnn"), small_registry) as (base, _):
        yield base


def test_docs_pages_reference_only_this_server(server):
    for path in PAGES:
        page = httpx.get(f"{server}{path}")
        assert page.status_code == 200, path
        assert page.headers["content-type"].startswith("text/html")
        html = page.text
        # no CDN, no web fonts: the only absolute URLs a page may hold are this server's own
        foreign = [url for url in re.findall(r"https?://[^\s\"'<>)]+", html) if not url.startswith(server)]
        assert not foreign, f"{path} loads from outside this server: {foreign}"
        # every script, style and icon it names is served here, with its type
        refs = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert any(ref.endswith(".js") for ref in refs), path
        for ref in refs:
            r = httpx.get(f"{server}{ref}")
            assert r.status_code == 200, ref
            assert r.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript",
                                                                "text/css", "image/png"), ref
    # ReDoc takes its logo from beside its page
    r = httpx.get(f"{server}/redoc/logo-mini.svg")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")


def test_docs_are_public_when_an_api_key_guards_v1(small_registry):
    with running_server(Settings(default_model="tiny_cnn", api_key=KEY), small_registry) as (base, _):
        for path in (*PAGES, "/docs-assets/swagger/swagger-ui-bundle.js", "/openapi.json"):
            assert httpx.get(f"{base}{path}").status_code == 200, path
        assert httpx.get(f"{base}/v1/methods").status_code == 401
        # the assets mount serves the package's files and nothing above them
        for path in ("/docs-assets/nope.js", "/docs-assets/..%2F__init__.py",
                     "/docs-assets/%2e%2e/standalone_docs.py"):
            assert httpx.get(f"{base}{path}").status_code == 404, path


# ------------------------------------------------------------------------------------------ in a browser


@pytest.fixture
def offline_page(browser):
    """A page whose requests to anything but 127.0.0.1 are refused (and recorded in page.refused)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.requested, page.refused = [], []

    def only_loopback(route):
        url = route.request.url
        page.requested.append(url)
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob") or parts.hostname == "127.0.0.1":
            route.continue_()
        else:
            page.refused.append(url)
            route.abort("internetdisconnected")

    context.route("**/*", only_loopback)
    yield page
    context.close()


def rendered_paths(page) -> list[str]:
    # Swagger UI writes a zero-width space before each "/" of a path
    return page.eval_on_selector_all(".opblock-summary-path",
                                     "els => els.map(e => e.textContent.replace(/\\u200b/g, ''))")


@pytest.mark.slow
@pytest.mark.browser
def test_swagger_ui_renders_offline(offline_page, server):
    page = offline_page
    page.goto(f"{server}/docs", wait_until="load")
    assert not page.refused, f"/docs asked for something off this machine: {page.refused}"
    page.wait_for_selector(".swagger-ui .opblock-summary-path")
    paths = rendered_paths(page)
    assert "/v1/explain/{method}" in paths, paths
    assert page.inner_text(".swagger-ui .info .title").startswith("Saliency service")
    assert f"{server}/docs-assets/swagger/swagger-ui-bundle.js" in page.requested
    assert f"{server}/openapi.json" in page.requested
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "docs.png"))
    assert not page.refused, page.refused


@pytest.mark.slow
@pytest.mark.browser
def test_redoc_renders_offline(offline_page, server):
    page = offline_page
    page.goto(f"{server}/redoc", wait_until="load")
    assert not page.refused, f"/redoc asked for something off this machine: {page.refused}"
    page.wait_for_function("() => document.body.innerText.includes('/v1/explain/')")
    assert "Saliency service" in page.inner_text("h1")
    assert f"{server}/docs-assets/redoc/redoc.standalone.js" in page.requested
    assert not page.refused, page.refused
