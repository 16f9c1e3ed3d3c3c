"""Avro schema texts as the registry stores, compares and checks them.

A registered schema keeps its text as the client sent it, minus insignificant
whitespace (``text``).  Two texts are "the same schema" (same id) when their
parsed forms are equal: ``fingerprint`` is the parsed schema written out with
sorted keys, so key order and whitespace do not matter while defaults, docs,
aliases and logical types still do (Confluent compares Avro's full
``Schema.toString()`` the same way, not the Parsing Canonical Form that drops
defaults).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import avro.errors
import avro.schema

from schemas.registry import errors

AVRO = "AVRO"
SUPPORTED_TYPES = (AVRO,)


@dataclass(frozen=True)
class AvroSchema:
    """A parsed, valid Avro schema."""

    text: str
    fingerprint: str
    parsed: avro.schema.Schema = field(compare=False, repr=False)


def parse_avro(text: object) -> AvroSchema:
    """Parse a schema text; an invalid one raises ``42201`` with the parser's reason."""
    if not isinstance(text, str) or not text.strip():
        raise errors.invalid_schema("Invalid schema: the schema must be a non-empty string")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise errors.invalid_schema(f"Invalid schema {text!r}: not valid JSON: {exc}") from exc
    try:
        parsed = avro.schema.make_avsc_object(document, avro.schema.Names(), validate_enum_symbols=True)
    except (avro.errors.AvroException, TypeError, ValueError, AttributeError, KeyError) as exc:
        raise errors.invalid_schema(f"Invalid schema {text!r}: {exc}") from exc
    _check_defaults(parsed, set())
    compact = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    fingerprint = json.dumps(_to_json(parsed), sort_keys=True, separators=(",", ":"))
    return AvroSchema(text=compact, fingerprint=fingerprint, parsed=parsed)


def check_schema_type(schema_type: object) -> str:
    """Only AVRO is served here; anything else is refused with a clear ``42201``."""
    if schema_type is None:
        return AVRO
    if not isinstance(schema_type, str) or schema_type.upper() not in SUPPORTED_TYPES:
        raise errors.invalid_schema(
            f"Invalid schemaType {schema_type!r}: this registry supports only AVRO schemas"
        )
    return AVRO


def check_references(references: object) -> None:
    """Schema references are not implemented: accept only an absent or empty list."""
    if references is None or references == []:
        return
    if not isinstance(references, list):
        raise errors.invalid_schema("Invalid schema: 'references' must be a list")
    raise errors.invalid_schema(
        "Invalid schema: schema references are not supported by this registry; "
        "register a self-contained schema with an empty 'references' list"
    )


def _check_defaults(schema: avro.schema.Schema, seen: set[str]) -> None:
    """Reject a field default that its type cannot hold (the parser lets it through)."""
    if isinstance(schema, avro.schema.RecordSchema):
        if schema.fullname in seen:
            return
        seen.add(schema.fullname)
        for fld in schema.fields:
            _check_defaults(fld.type, seen)
            if fld.has_default and not _default_fits(fld.type, fld.default):
                raise errors.invalid_schema(
                    f"Invalid schema: default {fld.default!r} of field '{fld.name}' in "
                    f"'{schema.fullname}' does not match its type"
                )
    elif isinstance(schema, avro.schema.ArraySchema):
        _check_defaults(schema.items, seen)
    elif isinstance(schema, avro.schema.MapSchema):
        _check_defaults(schema.values, seen)
    elif isinstance(schema, avro.schema.UnionSchema):
        for branch in schema.schemas:
            _check_defaults(branch, seen)


def _default_fits(schema: avro.schema.Schema, value: Any) -> bool:
    """Does a JSON-encoded default ``value`` fit ``schema`` (Avro spec, "default values")?"""
    kind = schema.type
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind in ("int", "long"):
        limit = 2**31 if kind == "int" else 2**63
        return isinstance(value, int) and not isinstance(value, bool) and -limit <= value < limit
    if kind in ("float", "double"):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind in ("string", "bytes"):
        return isinstance(value, str)
    if kind == "fixed":
        return isinstance(value, str) and len(value) == schema.size
    if kind == "enum":
        return isinstance(value, str) and value in schema.symbols
    if kind == "array":
        return isinstance(value, list) and all(_default_fits(schema.items, v) for v in value)
    if kind == "map":
        return isinstance(value, dict) and all(_default_fits(schema.values, v) for v in value.values())
    if kind in ("record", "error"):
        if not isinstance(value, dict):
            return False
        return all(
            _default_fits(f.type, value[f.name]) if f.name in value else f.has_default
            for f in schema.fields
        )
    if kind == "union":
        return any(_default_fits(branch, value) for branch in schema.schemas)
    return True


def _to_json(parsed: avro.schema.Schema) -> Any:
    return parsed.to_json(avro.schema.Names())
