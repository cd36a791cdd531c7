"""Helpers of the viewer's browser tests (tests/test_viewer*.py): open the page, find a method's card, read a
canvas, set a parameter folded under its method."""
from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from tests.conftest import ROOT

ARTIFACTS = ROOT / "artifacts"
DOCS = ROOT / "docs" / "viewer"  # the screenshots docs/viewer.md shows (committed)
TIMEOUT_MS = 120_000  # CPU inference on a shared machine
STATUS = "document.querySelector('#server-status').textContent"
SCREENSHOT_LIMIT = 400_000  # bytes: a committed screenshot stays small


def open_viewer(browser, base: str, routes: dict | None = None, *, viewport=(1500, 1250), path: str = "/",
                init_script: str | None = None, **context_options):
    """A new browser context on the viewer, ready; `routes` (URL glob -> handler) are set before it loads.
    Page errors and console errors are collected in page.errors."""
    size = {"width": viewport[0], "height": viewport[1]}
    context = browser.new_context(viewport=size, accept_downloads=True, **context_options)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("console", lambda msg: msg.type == "error" and page.errors.append(msg.text))
    if init_script:
        page.add_init_script(init_script)
    for pattern, handler in (routes or {}).items():
        page.route(pattern, handler)
    page.goto(base + path)
    page.wait_for_function(f"() => {STATUS}.startsWith('Ready')")
    return context, page


def save_jpeg(image: Image.Image, path: Path) -> Path:
    image.save(path, "JPEG", quality=92)
    return path


def card(method: str) -> str:
    return f".card[data-method='{method}']"


def wait_state(page, method: str, state: str):
    page.wait_for_selector(f"{card(method)}[data-state='{state}']")


def set_param(page, method: str, name: str, value: str):
    """Fill a parameter, unfolding its method's parameters first."""
    page.evaluate(f"document.querySelector('#params-{method}').open = true")
    page.fill(f"#param-{method}-{name}", value)


def canvas_stats(page, selector: str) -> dict:
    """Size, the spread of pixel values and the alpha of a canvas as drawn."""
    return page.eval_on_selector(selector, """c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0, s = 0, s2 = 0, clear = 0, a = 0;
        for (let i = 0; i < d.length; i += 4 * 7) {
            const v = d[i] + d[i + 1] + d[i + 2]; n++; s += v; s2 += v * v;
            a += d[i + 3]; if (d[i + 3] === 0) clear++;
        }
        const mean = s / n;
        return {width: c.width, height: c.height, mean, std: Math.sqrt(Math.max(0, s2 / n - mean * mean)),
                clear: clear / n, alpha: a / n, opacity: getComputedStyle(c).opacity};
    }""")


def docs_screenshot(name: str) -> Path:
    """Where a screenshot of the docs goes: artifacts/ on an ordinary run (a test run leaves the checkout
    clean), docs/viewer/ with SALIENCY_UPDATE_SCREENSHOTS=1 (then look at them and commit them)."""
    if os.environ.get("SALIENCY_UPDATE_SCREENSHOTS") == "1":
        return DOCS / name
    return ARTIFACTS / f"viewer-{name}"


def save_screenshot(page, path: Path, **options) -> Path:
    """A PNG screenshot; re-encoded with a 256-colour palette, dithered (plain quantising bands the colour
    bar), when it would pass SCREENSHOT_LIMIT."""
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), **options)
    if path.stat().st_size > SCREENSHOT_LIMIT:
        image = Image.open(path).convert("RGB")
        palette = image.quantize(256, method=Image.Quantize.MEDIANCUT)
        buffer = io.BytesIO()
        image.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(buffer, "PNG", optimize=True)
        path.write_bytes(buffer.getvalue())
    return path
