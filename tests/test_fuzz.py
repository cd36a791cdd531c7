"""Property-based API fuzzing from the OpenAPI schema (schemathesis) on a real loopback server: no 5xx,
responses conform to the documented schemas. It prints its summary (operations, examples, checks, failures):
`.venv/bin/python -m pytest -q -s tests/test_fuzz.py`."""
from __future__ import annotations

import base64
import io
from collections import Counter

import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import checks
from schemathesis.transport.serialization import Binary  # what schemathesis draws for format: binary

from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server

# per operation, by HTTP method: bounded, so that make test stays quick
EXAMPLES = {"POST": 100, "DELETE": 25, "GET": 25, "HEAD": 5}
# Every check but "schema-valid data must be accepted": an image's validity (real base64, a decodable file)
# cannot be written in a schema, so well-typed garbage is rightly a 400.
EXCLUDED = [checks.positive_data_acceptance]


def real_png(seed: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def with_real_images(body, seed: int):
    """The generated body with its images replaced by real PNGs (as many), so that half of the examples get
    past decoding and fuzz the parameters, targets, outputs and sizes behind it."""
    if not isinstance(body, dict):
        return body
    if isinstance(body.get("images"), list):  # JSON
        return {**body, "images": [base64.b64encode(real_png(seed + i)).decode()
                                   for i in range(len(body["images"]))]}
    if "image" in body:  # multipart
        count = len(body["image"]) if isinstance(body["image"], list) else 1
        return {**body, "image": [Binary(real_png(seed + i)) for i in range(count)]}
    return body


@pytest.mark.slow
def test_api_conforms_and_never_5xx(capsys):
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    limits = Settings(default_model="tiny_cnn", max_request_cost=500, sync_wait_s=5)
    examples: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    with running_server(limits, registry) as (base, _):
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 9
        for operation in operations:

            @given(case=operation.as_strategy(), real=st.booleans(), seed=st.integers(0, 1000))
            @settings(max_examples=EXAMPLES[operation.method.upper()], deadline=None, database=None,
                      derandomize=True, suppress_health_check=list(HealthCheck))
            def fuzz(case, real, seed):
                excluded = EXCLUDED
                if real and not case.meta.generation.mode.is_negative:
                    case.body = with_real_images(case.body, seed)
                    # drawn valid and made more so, but schemathesis cannot validate a body holding binary
                    # parts and would take it for a schema-violating case that must be refused
                    excluded = [*EXCLUDED, checks.negative_data_rejection]
                response = case.call_and_validate(excluded_checks=excluded)  # raises on a check's failure
                examples[case.operation.label] += 1
                statuses[response.status_code] += 1

            fuzz()
    checks.load_all_checks()
    names = [name for name in checks.CHECKS.get_all_names()
             if name not in {check.__name__ for check in EXCLUDED}]
    with capsys.disabled():
        print(f"\nschemathesis: {len(operations)} operations, {sum(examples.values())} examples "
              f"(at most {EXAMPLES} by HTTP method), 0 failures; statuses {dict(sorted(statuses.items()))}; "
              f"checks: {', '.join(names)}")
        for label, count in sorted(examples.items()):
            print(f"  {count:3d}  {label}")
