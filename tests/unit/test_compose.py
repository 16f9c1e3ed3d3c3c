"""docker-compose.yml must agree with the settings object (no Docker engine runs here)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from streams.devtools.localkafka import KAFKA_VERSION
from streams.settings import ENVIRONMENT, Settings

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
PAYSTREAM_SERVICES = ("worker", "ingress")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _published(service: dict) -> dict[int, int]:
    """container port -> host port for a service's "host:container" mappings."""
    ports = {}
    for mapping in service.get("ports", []):
        host, _, container = str(mapping).rpartition(":")
        ports[int(container)] = int(host)
    return ports


def test_every_paystream_variable_is_a_setting(compose: dict) -> None:
    for name in PAYSTREAM_SERVICES:
        environment = compose["services"][name]["environment"]
        unknown = set(environment) - set(ENVIRONMENT)
        assert not unknown, f"{name} sets variables the settings object does not read: {unknown}"
        assert {"KAFKA_BOOTSTRAP_SERVERS", "SCHEMA_REGISTRY_URL"} <= set(environment)


def test_addresses_point_at_compose_services_on_the_default_ports(compose: dict) -> None:
    defaults = Settings.from_env(env={})
    services = compose["services"]
    for name in PAYSTREAM_SERVICES:
        environment = services[name]["environment"]
        kafka_host, _, kafka_port = environment["KAFKA_BOOTSTRAP_SERVERS"].rpartition(":")
        assert kafka_host in services
        assert int(kafka_port) == int(defaults.kafka_bootstrap_servers.rpartition(":")[2])
        for variable, default in (
            ("SCHEMA_REGISTRY_URL", defaults.schema_registry_url),
            ("STRIPE_API_BASE", defaults.stripe_api_base),
        ):
            url = urlsplit(environment[variable])
            assert url.hostname in services, f"{variable} names no compose service"
            assert url.port == urlsplit(default).port, f"{variable} port differs from the default"
            assert _published(services[url.hostname])[url.port] == url.port


def test_published_ports_match_the_settings(compose: dict) -> None:
    defaults = Settings.from_env(env={})
    services = compose["services"]
    worker_env = services["worker"]["environment"]
    assert int(worker_env["WORKER_WEB_PORT"]) == defaults.worker_web_port
    assert _published(services["worker"])[defaults.worker_web_port] == defaults.worker_web_port
    ingress_env = services["ingress"]["environment"]
    assert int(ingress_env["INGRESS_PORT"]) == defaults.ingress_port
    assert _published(services["ingress"])[defaults.ingress_port] == defaults.ingress_port
    assert _published(services["kafka"])[9092] == 9092


def test_kafka_image_is_the_version_the_local_runner_pins(compose: dict) -> None:
    image = compose["services"]["kafka"]["image"]
    assert image == f"apache/kafka:{KAFKA_VERSION}"
    kafka_env = compose["services"]["kafka"]["environment"]
    assert kafka_env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert kafka_env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == 1


def test_registry_image_keeps_its_state_in_the_schemas_topic(compose: dict) -> None:
    registry_env = compose["services"]["schema-registry"]["environment"]
    assert registry_env["SCHEMA_REGISTRY_KAFKASTORE_TOPIC"] == Settings.from_env(env={}).registry_topic


def test_prometheus_scrapes_the_worker_and_the_ingress_on_their_published_ports(compose: dict) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert _published(prometheus)[9090] == 9090
    config = yaml.safe_load((COMPOSE.parent / "deploy/prometheus/prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    targets = {job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
               for job in config["scrape_configs"]}
    defaults = Settings.from_env(env={})
    assert targets == {"paystream-worker": [f"worker:{defaults.worker_web_port}"],
                       "paystream-ingress": [f"ingress:{defaults.ingress_port}"]}
    for job in targets.values():
        host, _, port = job[0].partition(":")
        assert int(port) in _published(services[host])  # the port the service listens on
        assert host in prometheus["depends_on"]


def test_grafana_is_provisioned_with_the_prometheus_source_and_the_dashboard(compose: dict) -> None:
    grafana = compose["services"]["grafana"]
    volumes = grafana["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
    assert "./deploy/grafana/paystream.json:/var/lib/grafana/dashboards/paystream.json:ro" in volumes
    for volume in volumes:
        assert (COMPOSE.parent / volume.split(":")[0]).exists(), volume
    assert "prometheus" in grafana["depends_on"]
    assert _published(grafana)[3000] == 3000
