"""The topics a worker creates before its consumer joins: every one Faust would create itself.

A topic the broker's metadata does not list when the group's first
assignment is computed is left out of it (Faust's assignor: "Ignoring missing
topic"); a deadline table whose changelog is left out fires nothing until a
later rebalance.  So ``PaystreamApp.faust_topic_settings`` declares every
table's changelog (and the leader topic) the way Faust would, and the worker
creates them with the event topics.  Checked here on an app with every domain,
without a broker; the start itself in
``tests/integration/test_worker_first_start.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from faust.transport.drivers.aiokafka import Transport

from agents import DOMAINS
from agents.console import kernel_agents
from streams import catalog
from streams.app import PaystreamApp, create_app
from streams.settings import Settings
from tables.deadlines import CHANGELOG_TOPIC_CONFIGS

PREFIX = "t-unit-topics."


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> PaystreamApp:
    settings = Settings.from_env(
        topic_prefix=PREFIX, app_id=f"{PREFIX}paystream", domains=",".join(DOMAINS),
        state_dir=Path(tmp_path_factory.mktemp("state")),
    )
    return create_app(settings)


def _partitions_of(topic: str) -> int:
    """Partition count the catalog creates ``topic`` (a prefixed catalog or internal topic) with."""
    assert topic.startswith(PREFIX), topic
    name = topic[len(PREFIX):]
    spec = catalog.CATALOG.get(name) or catalog.INTERNAL_TOPICS.get(name)
    assert spec is not None, f"{topic} is read by an agent but not declared in the catalog"
    return spec.partitions


def test_every_domain_has_tables(app: PaystreamApp) -> None:
    # The checks below mean something only if the app has the domains' tables.
    names = set(app.tables)
    assert {"orders", "payments", "subscriptions", "invoices", "order-deadlines",
            "subscription-deadlines", "invoice-deadlines"} <= names


def test_every_changelog_is_declared_compacted_with_the_sources_partitions(app: PaystreamApp) -> None:
    declared = {t.name: t for t in app.faust_topic_settings()}
    sources = {topic for agent in app.agents.values() for topic in agent.channel.topics}
    source_partitions = {_partitions_of(topic) for topic in sources}
    assert len(source_partitions) == 1, f"agents read topics of several partition counts: {sources}"
    (partitions,) = source_partitions
    for table in app.tables.values():
        name = table.changelog_topic.get_topic_name()
        assert name == f"{app.conf.id}-{table.name}-changelog"
        assert name in declared, f"changelog of table {table.name} not declared"
        settings = declared[name]
        assert settings.config.get("cleanup.policy") == "compact", (name, settings.config)
        assert settings.partitions == partitions == table.partitions, (name, settings.partitions)
        assert settings.replication_factor == app.conf.topic_replication_factor


def test_kernel_tables_match_their_own_inputs(app: PaystreamApp) -> None:
    declared = {t.name: t for t in app.faust_topic_settings()}
    aggregates = kernel_agents(app)
    assert aggregates
    for agent_name, aggregate in aggregates:
        inputs = {_partitions_of(topic) for topic in aggregate.names}
        tables = [aggregate.table] + ([aggregate.deadlines.table] if aggregate.deadlines else [])
        for table in tables:
            changelog = declared[table.changelog_topic.get_topic_name()]
            assert inputs == {changelog.partitions}, (agent_name, table.name, inputs)


def test_deadline_changelogs_carry_the_deadline_configs(app: PaystreamApp) -> None:
    declared = {t.name: t for t in app.faust_topic_settings()}
    deadline_tables = [name for name in app.tables if name.endswith("-deadlines")]
    assert len(deadline_tables) == 3
    for name in deadline_tables:
        config = declared[f"{app.conf.id}-{name}-changelog"].config
        for key, value in CHANGELOG_TOPIC_CONFIGS.items():
            assert config[key] == value, (name, key, config)


def test_settings_are_what_faust_would_create(app: PaystreamApp) -> None:
    """Same configs as faust-streaming's own CreateTopics request (``_really_create_topic``)."""
    declared = {t.name: t for t in app.faust_topic_settings()}
    for table in app.tables.values():
        topic = table.changelog_topic
        retention = int(topic.retention * 1000) if topic.retention else None
        faust_config = Transport._topic_config(None, retention, topic.compacting, topic.deleting)  # type: ignore[arg-type]
        faust_config.update(topic.config or {})
        expected = {key: str(value) for key, value in faust_config.items()}
        assert declared[topic.get_topic_name()].config == expected


def test_the_leader_topic_is_declared(app: PaystreamApp) -> None:
    declared = {t.name: t for t in app.faust_topic_settings()}
    leader = declared[f"{app.conf.id}-__assignor-__leader"]
    assert leader.partitions == 1
    assert leader.config == {}
    assert len(declared) == len(app.tables) + 1
