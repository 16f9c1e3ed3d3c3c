"""Sample records built from the contracts themselves.

Benchmarks and round-trip tests need a filled-in record for every topic;
deriving it from the ``.avsc`` keeps them honest when a contract changes
(nothing here restates a field).
"""

from __future__ import annotations

import uuid
from typing import Any

from schemas import contracts

_LOGICAL = {
    "uuid": lambda: str(uuid.uuid4()),
    "timestamp-millis": lambda: 1_764_000_000_000,
}


def sample_record(topic: str, *, list_length: int = 5) -> dict[str, Any]:
    """A valid record of ``topic`` with every optional field set and lists filled."""
    schema = contracts.schema_dict(topic)
    named: dict[str, Any] = {}
    return _value(schema, named, list_length)


def _value(schema: Any, named: dict[str, Any], n: int) -> Any:
    if isinstance(schema, list):  # union: the first non-null branch
        branch = next((s for s in schema if s != "null"), "null")
        return _value(branch, named, n)
    if isinstance(schema, str):
        if schema in named:
            return _value(named[schema], named, n)
        return _primitive(schema, None)
    kind = schema["type"]
    if isinstance(kind, (dict, list)):
        return _value(kind, named, n)
    if "name" in schema and kind in ("record", "enum", "fixed"):
        named[schema["name"]] = schema
        if "namespace" in schema:
            named[f"{schema['namespace']}.{schema['name']}"] = schema
    if kind == "record":
        return {f["name"]: _value(f["type"], named, n) for f in schema["fields"]}
    if kind == "enum":
        return schema["symbols"][0]
    if kind == "array":
        return [_value(schema["items"], named, n) for _ in range(n)]
    if kind == "map":
        return {f"key{i}": _value(schema["values"], named, n) for i in range(n)}
    if kind == "fixed":
        return b"\x00" * schema["size"]
    return _primitive(kind, schema.get("logicalType"))


def _primitive(kind: str, logical: str | None) -> Any:
    if logical in _LOGICAL:
        return _LOGICAL[logical]()
    return {
        "string": "sample-value-0123",
        "int": 42,
        "long": 123_456,
        "float": 1.5,
        "double": 2.5,
        "boolean": True,
        "bytes": b"sample",
        "null": None,
    }[kind]
