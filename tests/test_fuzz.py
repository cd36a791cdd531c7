"""Property-based API fuzzing from the OpenAPI schema (schemathesis) on a real loopback server: no 5xx,
responses conform to the documented schemas."""
from __future__ import annotations

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server


@pytest.mark.slow
def test_api_conforms_and_never_5xx():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    limits = Settings(default_model="tiny_cnn", max_request_cost=500, sync_wait_s=5)
    with running_server(limits, registry) as (base, _):
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 9
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                # Every check but "schema-valid data must be accepted": an image's validity (real base64, a
                # decodable file) cannot be written in a schema, so well-typed garbage is rightly a 400.
                case.call_and_validate(excluded_checks=[checks.positive_data_acceptance])

            fuzz()
