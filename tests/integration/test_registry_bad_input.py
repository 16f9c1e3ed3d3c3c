"""Bad requests get Confluent error bodies with the right codes, never a 500."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.registry_support import (
    RegistryThread,
    drop_topic,
    record_schema,
    registry_settings,
)

pytestmark = pytest.mark.integration

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
VALID = record_schema("Thing", ("id", "string"))


@pytest.fixture(scope="module")
def registry(kafka_bootstrap) -> Iterator[RegistryThread]:
    import socket
    import uuid

    from streams.settings import Settings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    topic = f"t-schemas-bad-input-{uuid.uuid4().hex[:8]}"
    base = Settings.from_env(kafka_bootstrap_servers=kafka_bootstrap)
    instance = RegistryThread(registry_settings(base, topic, port)).start()
    yield instance
    instance.stop()
    drop_topic(kafka_bootstrap, topic)


@pytest.fixture
def http(registry) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=registry.url, headers={"Content-Type": CONTENT_TYPE}) as client:
        yield client


def assert_error(answer: httpx.Response, status: int, code: int) -> dict:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(CONTENT_TYPE)
    body = answer.json()
    assert set(body) == {"error_code", "message"}
    assert body["error_code"] == code
    assert body["message"]
    return body


def test_invalid_avro_schema_is_42201_with_the_reason(http, unique_name):
    subject = unique_name("s")
    bad = '{"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]}'
    body = assert_error(http.post(f"/subjects/{subject}/versions", json={"schema": bad}), 422, 42201)
    assert "nope" in body["message"]
    assert_error(http.post(f"/subjects/{subject}/versions", json={"schema": "{not json"}), 422, 42201)
    assert_error(http.post(f"/subjects/{subject}/versions", json={"schema": 12}), 422, 42201)
    wrong_default = record_schema("X", ("a", "int", "one"))
    body = assert_error(http.post(f"/subjects/{subject}/versions", json={"schema": wrong_default}),
                        422, 42201)
    assert "default" in body["message"]


@pytest.mark.parametrize("payload", [b"this is not json", b"", b"[1, 2]", b'"schema"', b"{\xff}"])
def test_non_json_or_wrong_shape_body_is_4xx(http, unique_name, payload):
    subject = unique_name("s")
    for path in (f"/subjects/{subject}/versions", f"/subjects/{subject}",
                 f"/compatibility/subjects/{subject}/versions/latest", "/config", "/mode"):
        method = "PUT" if path in ("/config", "/mode") else "POST"
        answer = http.request(method, path, content=payload)
        assert 400 <= answer.status_code < 500, (path, answer.status_code, answer.text)
        assert "error_code" in answer.json()


def test_body_without_schema_field_is_42201(http, unique_name):
    answer = http.post(f"/subjects/{unique_name('s')}/versions", json={"scheme": VALID})
    assert_error(answer, 422, 42201)


def test_unknown_subject_and_version_codes(http, unique_name):
    subject = unique_name("s")
    assert_error(http.get(f"/subjects/{subject}/versions"), 404, 40401)
    assert_error(http.get(f"/subjects/{subject}/versions/1"), 404, 40401)
    assert_error(http.post(f"/subjects/{subject}", json={"schema": VALID}), 404, 40401)
    assert_error(http.delete(f"/subjects/{subject}"), 404, 40401)
    assert http.post(f"/subjects/{subject}/versions", json={"schema": VALID}).status_code == 200
    assert_error(http.get(f"/subjects/{subject}/versions/9"), 404, 40402)
    assert_error(http.get(f"/subjects/{subject}/versions/two"), 422, 42202)
    assert_error(http.get(f"/subjects/{subject}/versions/0"), 422, 42202)
    assert_error(http.delete(f"/subjects/{subject}/versions/x"), 422, 42202)
    assert_error(http.get("/schemas/ids/99999"), 404, 40403)
    assert_error(http.get("/schemas/ids/abc"), 404, 40403)


def test_bad_compatibility_level_and_mode(http, unique_name):
    assert_error(http.put("/config", json={"compatibility": "SIDEWAYS"}), 422, 42203)
    assert_error(http.put(f"/config/{unique_name('s')}", json={}), 422, 42203)
    assert_error(http.put("/mode", json={"mode": "MAYBE"}), 422, 42204)


def test_bad_query_parameter_is_400(http, unique_name):
    assert_error(http.get("/subjects", params={"deleted": "perhaps"}), 400, 400)


def test_unknown_path_and_method(http):
    assert_error(http.get("/no/such/resource"), 404, 404)
    assert_error(http.patch("/config"), 405, 405)


def test_root_types_and_plain_json_content_type(http, registry, unique_name):
    assert http.get("/").json() == {}
    assert http.get("/schemas/types").json() == ["AVRO"]
    subject = unique_name("s")
    answer = httpx.post(f"{registry.url}/subjects/{subject}/versions", json={"schema": VALID},
                        headers={"Content-Type": "application/json"})
    assert answer.status_code == 200
    fetched = http.get(f"/schemas/ids/{answer.json()['id']}").json()
    assert "schemaType" not in fetched  # AVRO is implied, as in Confluent's answers
    raw = http.get(f"/subjects/{subject}/versions/latest/schema")
    assert raw.json() == json.loads(fetched["schema"])
    assert raw.json()["name"] == "Thing"
