"""The registry serves the AsyncAPI document at ``GET /asyncapi.json``: valid AsyncAPI 3.0."""

from __future__ import annotations

import httpx
import jsonschema
import pytest

from schemas import asyncapi
from streams.devtools import asyncapi_spec
from streams.settings import Settings

pytestmark = pytest.mark.integration


def test_the_registry_serves_the_document(registry_url: str, kafka_bootstrap: str) -> None:
    response = httpx.get(f"{registry_url}/asyncapi.json", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    served = response.json()
    settings = Settings.from_env(kafka_bootstrap_servers=kafka_bootstrap, schema_registry_url=registry_url)
    assert served == asyncapi.document_for(settings)
    schema = asyncapi_spec.load_schema()
    errors = [e.message for e in jsonschema.validators.validator_for(schema)(schema).iter_errors(served)]
    assert errors == []
    # Stable: the same bytes on every request.
    assert httpx.get(f"{registry_url}/asyncapi.json", timeout=30).text == response.text
