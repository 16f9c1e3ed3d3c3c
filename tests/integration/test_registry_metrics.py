"""GET /metrics on a real schema registry (its own ``_schemas`` topic on the real broker).

Requests are counted under their route pattern (never a subject name), with
method and status, refusals included; the page is Prometheus' text format.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.registry_support import RegistryThread, record_schema

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read(), answer.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def post(url: str, body: dict) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body, content_type = get(f"{url}/metrics")
    assert status == 200 and content_type.startswith("text/plain"), (status, content_type)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_registry_requests_are_counted_by_route_pattern_and_status(registry: RegistryThread) -> None:
    subject = "t-metrics-subject-value"
    assert post(f"{registry.url}/subjects/{subject}/versions",
                {"schema": record_schema("M", ("a", "string"))}) == 200
    assert get(f"{registry.url}/subjects/{subject}/versions/latest")[0] == 200
    assert get(f"{registry.url}/subjects/t-metrics-missing-value/versions/latest")[0] == 404
    values = samples(registry.url)

    def count(route: str, method: str, status: str) -> float:
        labels = (("method", method), ("route", route), ("status", status))
        return values.get(("paystream_registry_requests_total", labels), 0.0)

    assert count("/subjects/{subject}/versions", "POST", "200") == 1
    assert count("/subjects/{subject}/versions/{version}", "GET", "200") == 1
    assert count("/subjects/{subject}/versions/{version}", "GET", "404") == 1
    assert not any(subject in str(labels) for _name, labels in values)  # no subject names in labels
    durations = [v for (name, labels), v in values.items()
                 if name == "paystream_registry_request_seconds_count"]
    assert sum(durations) >= 3
