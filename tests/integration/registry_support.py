"""Helpers of the registry tests: schema texts and topic clean-up.

The registry itself runs in-process through
:class:`streams.devtools.registry_runner.RegistryThread`, the one runner the
tests and ``paystream bench`` share; it and :func:`registry_settings` are
re-exported here for the tests that import them from this module.
"""

from __future__ import annotations

from streams.admin import delete_topics
from streams.devtools.registry_runner import RegistryThread, registry_settings

__all__ = ["RegistryThread", "drop_topic", "record_schema", "registry_settings"]


def record_schema(name: str, *fields: tuple[str, object] | tuple[str, object, object]) -> str:
    """An Avro record schema text; a 3-tuple field carries a default."""
    import json

    out = []
    for spec in fields:
        field: dict[str, object] = {"name": spec[0], "type": spec[1]}
        if len(spec) == 3:
            field["default"] = spec[2]
        out.append(field)
    return json.dumps({"type": "record", "name": name, "namespace": "paystream.test", "fields": out})


def drop_topic(bootstrap_servers: str, topic: str) -> None:
    """Delete a test's registry topic."""
    delete_topics(bootstrap_servers, [topic])
