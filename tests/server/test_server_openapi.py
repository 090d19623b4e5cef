"""Schemathesis fuzzes every route from the served /openapi.json: no 5xx, errors in OpenAI's shape."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from scripted_engine import ScriptedEngine

from adapterhub.server.app import create_app

API_KEY = "fuzz-key"


@pytest.fixture(scope="module")
def app(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer)
    engine.register("lora-a", "lora")
    return create_app(engine, api_key=API_KEY, max_tokens_cap=16)


schema = schemathesis.pytest.from_fixture("openapi")


@pytest.fixture(scope="module")
def openapi(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_get_no_server_error_and_openai_error_bodies(case) -> None:
    # Like OpenAI's, a schema-valid request can still be refused (400) for what only the server knows:
    # the max_tokens cap, the context length, fields it does not implement.
    response = case.call_and_validate(
        headers={"Authorization": f"Bearer {API_KEY}"},
        excluded_checks=[schemathesis.checks.positive_data_acceptance],
    )
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"]
