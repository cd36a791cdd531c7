"""Every bad input answered 4xx with a message naming the problem, over both request forms; valid oddities
(16-bit, palette, CMYK, RGBA, grayscale, EXIF-rotated, animated) explained correctly; the server stays up."""
from __future__ import annotations

import base64
import http.client
import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server
from tests.test_imaging import png_declaring, save

LIMITS = dict(default_model="tiny_cnn", max_image_bytes=300_000, max_images=4, max_request_cost=2_000,
              max_body_bytes=2_000_000, max_request_pixels=20_000)


def photo(size=(80, 60), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def base():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    with running_server(Settings(**LIMITS), registry) as (url, _):
        yield url


def post(base: str, form: str, blobs: list[bytes], method="gradcam", params=None, **fields):
    params = params or {}
    if form == "multipart":
        data = {**{k: str(v) for k, v in params.items()}, **{k: str(v) for k, v in fields.items()}}
        return httpx.post(f"{base}/v1/explain/{method}", data=data, timeout=60,
                          files=[("image", (f"{i}.bin", b, "application/octet-stream"))
                                 for i, b in enumerate(blobs)])
    body = {"images": [base64.b64encode(b).decode() for b in blobs], "params": params, **fields}
    if "target" in body:
        body["targets"] = [body.pop("target")]
    return httpx.post(f"{base}/v1/explain/{method}", json=body, timeout=60)


def truncated(fmt: str) -> bytes:
    data = save(photo(), fmt)
    return data[: len(data) // 2]


BAD_IMAGES = {
    "zero-byte file": (b"", 400, "image 0: empty"),
    "text": (b"hello, I am not an image", 400, "image 0"),
    "html": (b"<!doctype html><html><body>hi</body></html>", 400, "image 0"),
    "truncated jpeg": (truncated("JPEG"), 400, "image 0"),
    "truncated png": (truncated("PNG"), 400, "image 0"),
    "decompression bomb": (png_declaring(50_000, 50_000), 413, "exceeds"),
    "over the byte limit": (save(photo((400, 400)), "BMP"), 413, "exceeds"),
}


@pytest.mark.parametrize("form", ["multipart", "json"])
@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images(base, form, case):
    blob, status, text = BAD_IMAGES[case]
    r = post(base, form, [blob])
    assert r.status_code == status, r.text
    assert text in r.json()["error"]["message"]


def bad_requests(base: str, form: str):
    ok = save(photo(), "PNG")
    yield "too many images", post(base, form, [ok] * 5), 413, "the limit is 4"
    yield "unknown model", post(base, form, [ok], model="nope"), 404, "unknown model 'nope'"
    yield "unknown method", post(base, form, [ok], method="nope"), 404, "unknown method 'nope'"
    yield "unknown layer", post(base, form, [ok], params={"layer": "fc.nope"}), 422, "layer 'fc.nope'"
    yield "target out of range", post(base, form, [ok], target=10), 422, "out of range"
    yield "target negative", post(base, form, [ok], target=-1), 422, "out of range"
    yield "target not an integer", post(base, form, [ok],
                                        target="cat" if form == "multipart" else 1.5), 422, "target"
    yield "n_steps 0", post(base, form, [ok], "integrated-gradients", {"n_steps": 0}), 422, "n_steps"
    yield "n_steps 1e6", post(base, form, [ok], "integrated-gradients", {"n_steps": 10**6}), 422, "n_steps"
    yield "negative noise", post(base, form, [ok], "smoothgrad", {"noise_level": -0.1}), 422, "noise_level"
    yield "bad variant", post(base, form, [ok], "smoothgrad", {"variant": "x"}), 422, "variant"
    yield "group_size not dividing", post(base, form, [ok], "moreaugrad",
                                          {"sparsity": "group", "group_size": 5}), \
        422, "group_size 5 does not divide"
    yield "unknown parameter", post(base, form, [ok], params={"colour": "red"}), 422, "colour"
    yield "over the cost cap", post(base, form, [ok] * 2, "smoothgrad", {"n_samples": 1001}), 422, \
        "limit is 2000"
    big = save(photo((120, 100)), "PNG")  # 12,000 pixels: one fits the request limit of 20,000, two do not
    yield "over the request's pixels", post(base, form, [ok, big, big]), 413, \
        "the 3 images of this request hold 28800 pixels; the limit is 20000 per request"
    yield "unknown output", post(base, form, [ok],
                                 outputs="jpeg" if form == "multipart" else ["jpeg"]), 422, "jpeg"
    yield "reduced precision on a CPU", post(base, form, [ok], params={"precision": "bf16"}), 422, \
        "is for GPUs"
    yield "riemann with one step", post(base, form, [ok], "integrated-gradients",
                                        {"method": "riemann_left", "n_steps": 1}), 422, "at least 2"
    yield "moreaugrad step that diverges", post(base, form, [ok], "moreaugrad",
                                                {"rho": 1e-300, "iterations": 3}), \
        422, "lr must be below 2 * rho"
    yield "blur sigma that underflows", post(base, form, [ok], "integrated-gradients",
                                             {"baseline": "blur", "blur_sigma": 1e-300}), 422, "blur_sigma"


@pytest.mark.parametrize("form", ["multipart", "json"])
def test_bad_requests(base, form):
    for name, r, status, text in bad_requests(base, form):
        assert r.status_code == status, (name, r.text)
        body = r.json()["error"]
        assert text in body["message"], (name, body)
        assert body["code"]


@pytest.mark.parametrize("body, headers, status, text", [
    (b"", {"content-type": "application/json"}, 400, "malformed JSON"),
    (b"{not json", {"content-type": "application/json"}, 400, "malformed JSON"),
    (json.dumps({"images": ["@@@"]}).encode(), {"content-type": "application/json"}, 400, "not valid base64"),
    (json.dumps({"images": "abc"}).encode(), {"content-type": "application/json"}, 422, "images"),
    (json.dumps({"images": ["aGk="], "surprise": 1}).encode(), {"content-type": "application/json"}, 422,
     "surprise"),
    (b"", {"content-type": "multipart/form-data; boundary=xyz"}, 422, "no images"),
    (b"--xyz\r\nbroken", {"content-type": "multipart/form-data; boundary=xyz"}, 4, ""),
    (b"", {}, 415, "content type"),
    (b"{}", {"content-type": "application/jsonish"}, 415, "content type"),
    (b"x" * 3_000_000, {"content-type": "application/json"}, 413, "exceeds the limit"),
    (b"[" * 100_000 + b"]" * 100_000, {"content-type": "application/json"}, 400, "nested too deeply"),
    # an integer past Python's 4,300-digit conversion limit: json raises a plain ValueError (was a 500)
    (b'{"images": ["aGk="], "targets": [' + b"9" * 5000 + b"]}", {"content-type": "application/json"}, 400,
     "malformed JSON"),
    (json.dumps({"images": ["aGk="], "targets": [True]}).encode(), {"content-type": "application/json"}, 422,
     "targets"),
    # the last part is cut off before the close delimiter: its field would be lost in silence
    (b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\nabc\r\n--xyz\r\n'
     b'Content-Disposition: form-data; name="target"\r\n\r\n281',
     {"content-type": "multipart/form-data; boundary=xyz"}, 400, "closing boundary"),
])
def test_malformed_bodies(base, body, headers, status, text):
    r = httpx.post(f"{base}/v1/explain/gradcam", content=body, headers=headers, timeout=30)
    if status == 4:
        assert 400 <= r.status_code < 500, r.text
    else:
        assert r.status_code == status, r.text
    assert text in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def small_png() -> bytes:
    buf = io.BytesIO()
    photo().save(buf, "PNG")
    return buf.getvalue()


def test_media_types_are_case_insensitive_and_mime_wrapped_base64_is_read(base, small_png):
    text = base64.encodebytes(small_png).decode()  # lines of 76 characters, as the `base64` tool writes
    assert "\n" in text
    r = httpx.post(f"{base}/v1/explain/gradcam", content=json.dumps({"images": [text]}),
                   headers={"content-type": "Application/JSON; charset=utf-8"}, timeout=60)
    assert r.status_code == 200 and r.json()["results"][0]["map"]["npy"], r.text


def test_multipart_fields_are_text_and_given_once(base, small_png):
    image = ("image", ("a.png", small_png, "image/png"))
    cases = [([image, ("model", ("m.txt", b"tiny_cnn", "text/plain"))], "'model' field must be text"),
             ([image, ("layer", ("l.txt", b"bn2", "text/plain"))], "'layer' is a file"),
             ([image, ("size", (None, "input")), ("size", (None, "original"))],
              "'size' field is given 2 times"),
             ([image, ("n_steps", (None, "4")), ("n_steps", (None, "8"))],
              "'n_steps' is given more than once")]
    for files, text in cases:
        r = httpx.post(f"{base}/v1/explain/integrated-gradients", files=files, timeout=60)
        assert r.status_code == 422 and text in r.json()["error"]["message"], r.text


def test_png_answers_take_one_image_and_honour_q_values(base, small_png):
    image = ("image", ("a.png", small_png, "image/png"))
    url = f"{base}/v1/explain/gradcam"
    r = httpx.post(url, files=[image, image], headers={"accept": "image/png"}, timeout=60)
    assert r.status_code == 406 and "one image" in r.json()["error"]["message"]
    r = httpx.post(url, files=[image], headers={"accept": "application/json;q=0, image/png"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    r = httpx.post(url, files=[image], headers={"accept": "image/png;q=0.5, application/json"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")


def test_a_map_that_is_not_finite_fails_its_call_with_a_422_and_is_not_cached(monkeypatch, small_png):
    import service.engine_core

    real = service.engine_core.explain

    def overflowing(*args, **kwargs):
        results = real(*args, **kwargs)
        results[0].heatmap[0, 0] = float("nan")  # as a diverging iteration would leave it
        return results

    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    with running_server(Settings(default_model="tiny_cnn"), registry) as (url, _):
        monkeypatch.setattr(service.engine_core, "explain", overflowing)
        files = {"image": ("a.png", small_png, "image/png")}
        r = httpx.post(f"{url}/v1/explain/gradient", files=files, timeout=60)
        assert r.status_code == 422 and "not finite" in r.json()["error"]["message"], r.text
        monkeypatch.setattr(service.engine_core, "explain", real)
        again = httpx.post(f"{url}/v1/explain/gradient", files=files, timeout=60)
        assert again.status_code == 200  # computed afresh, not the failed result from the cache


def test_refusals_before_routing_count_under_their_route(base):
    r = httpx.post(f"{base}/v1/explain/gradcam", content=b"x" * 3_000_000,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    httpx.get(f"{base}/no/such/path")
    metrics = httpx.get(f"{base}/metrics").text
    assert 'saliency_requests_total{route="/v1/explain/{method}",status="413"}' in metrics
    assert 'saliency_requests_total{route="unmatched",status="404"}' in metrics


def test_chunked_body_over_the_limit_is_refused_while_streaming(base):
    def chunks():
        for _ in range(100):
            yield b"x" * 100_000

    r = httpx.post(f"{base}/v1/explain/gradcam", content=chunks(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413


def map_of(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.load(io.BytesIO(base64.b64decode(r.json()["results"][0]["map"]["npy"])))


def rgb_16bit_png(image: Image.Image) -> bytes:
    gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
    return save(Image.fromarray(gray), "PNG")


@pytest.mark.parametrize("form", ["multipart", "json"])
def test_valid_oddities_are_explained(base, form):
    image = photo()
    gray = image.convert("L")
    cases = {
        "16-bit png": (rgb_16bit_png(image), gray.convert("RGB")),
        "palette png": (save(image.quantize(64), "PNG"), image.quantize(64).convert("RGB")),
        "cmyk jpeg": (save(image.convert("CMYK"), "JPEG", quality=95), None),
        "rgba png": (save(image.convert("RGBA"), "PNG"), image),
        "grayscale png": (save(gray, "PNG"), gray.convert("RGB")),
        "animated gif": (save(image.quantize(256), "GIF", save_all=True, loop=0,
                              append_images=[photo(seed=1).quantize(256)]),
                         image.quantize(256).convert("RGB")),
    }
    for name, (blob, equivalent) in cases.items():
        heat = map_of(post(base, form, [blob], size="original"))
        assert heat.shape == (60, 80), name
        if equivalent is not None:
            np.testing.assert_allclose(heat, map_of(post(base, form, [save(equivalent, "PNG")])), atol=1e-5,
                                       err_msg=name)


@pytest.mark.parametrize("form", ["multipart", "json"])
def test_exif_rotated_photo_is_explained_upright(base, form):
    upright = photo((60, 80))  # portrait as displayed
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # landscape as the camera stored it
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    rotated = save(stored, "PNG", exif=exif)
    heat = map_of(post(base, form, [rotated]))
    assert heat.shape == (80, 60)  # the displayed (upright) size
    np.testing.assert_allclose(heat, map_of(post(base, form, [save(upright, "PNG")])), atol=1e-5)


def test_the_server_is_still_up_and_serving(base):
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert httpx.get(f"{base}/readyz").status_code == 200
    assert map_of(post(base, "multipart", [save(photo(), "PNG")])).shape == (60, 80)


def raw_request(base: str, verb: str, path: str, body: dict | None = None) -> httpx.Response:
    """A request whose URL may be longer than httpx allows (64 KiB)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(verb, path, body=None if body is None else json.dumps(body),
                           headers={} if body is None else {"content-type": "application/json"})
        answer = connection.getresponse()
        return httpx.Response(answer.status, content=answer.read())
    finally:
        connection.close()


def test_error_messages_quote_at_most_80_characters_of_the_input(base, small_png):
    """A name of 1 MB (parameter, model, method, job id) answers a small 4xx; one that reaches the service is
    named by its first 80 characters."""
    big = "n" * 2**20
    long = "n" * 200_000  # a field's value: under the part size limit (max_image_bytes)
    in_url = "n" * 60_000  # the longest URL uvicorn's parser passes on is under 100 KB
    image = ("image", ("a.png", small_png, "image/png"))
    images = [base64.b64encode(small_png).decode()]
    url = f"{base}/v1/explain/gradcam"
    named = {
        "parameter name (multipart)": httpx.post(url, files=[image, ("n" * 1000, (None, "1"))], timeout=60),
        "parameter name (JSON)": httpx.post(url, json={"images": images, "params": {big: 1}}, timeout=60),
        "field name (JSON)": httpx.post(url, json={"images": images, big: 1}, timeout=60),
        "parameter value": httpx.post(url, json={"images": images, "params": {"layer": big}}, timeout=60),
        "model name (multipart)": httpx.post(url, files=[image, ("model", (None, long))], timeout=60),
        "model name (JSON)": httpx.post(url, json={"images": images, "model": big}, timeout=60),
        "method name": raw_request(base, "POST", f"/v1/explain/{in_url}", {"images": images}),
        "job id": raw_request(base, "GET", f"/v1/jobs/{in_url}"),
        "job id (DELETE)": raw_request(base, "DELETE", f"/v1/jobs/{in_url}"),
        "outputs": httpx.post(url, files=[image, ("outputs", (None, long))], timeout=60),
        "size": httpx.post(url, files=[image, ("size", (None, long))], timeout=60),
        "target": httpx.post(url, files=[image, ("target", (None, long))], timeout=60),
    }
    for name, r in named.items():
        assert 400 <= r.status_code < 500 and len(r.content) < 2048, (name, r.status_code, r.text[:300])
        message = r.json()["error"]["message"]
        assert "n" * 80 in message and "n" * 81 not in message, (name, message)
    # refused before the service sees them (uvicorn's HTTP parser, the multipart parser): small all the same
    early = {"1 MB method name": raw_request(base, "POST", f"/v1/explain/{big}", {"images": images}),
             "1 MB job id": raw_request(base, "GET", f"/v1/jobs/{big}"),
             "1 MB multipart field name": httpx.post(url, files=[image, (big, (None, "1"))], timeout=60)}
    for name, r in early.items():
        assert 400 <= r.status_code < 500 and len(r.content) < 2048, (name, r.status_code, r.text[:300])
    # many short names: the first 20 refusals are described, then a count
    many = httpx.post(url, json={"images": images, "params": {f"p{i}": 1 for i in range(50_000)}}, timeout=60)
    assert many.status_code == 422 and len(many.content) < 2048, many.text[:300]
    assert many.json()["error"]["message"].endswith("and 49980 more")


# int() reads each of these as 7 (or 285): Arabic-Indic and full-width digits, "_" separators, a "+"
LOOSE_TARGETS = ["0_7", "\u0667", "\uff17", "+7", "2_85", "\u0662\u0668\u0665"]


@pytest.mark.parametrize("form", ["multipart", "json"])
@pytest.mark.parametrize("target", LOOSE_TARGETS)
def test_targets_are_ascii_decimal_digits(base, small_png, form, target):
    r = post(base, form, [small_png], target=target)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_targets" and repr(target) in error["message"], error


@pytest.mark.parametrize("form", ["multipart", "json"])
def test_targets_in_digits_and_top1_are_read(base, small_png, form):
    top1 = "top1" if form == "multipart" else None
    for target, expected in ((7, 7), ("0007" if form == "multipart" else 7, 7), (top1, None)):
        r = post(base, form, [small_png], target=target)
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        assert result["target"] == (expected if expected is not None else result["top_k"][0]["index"])
