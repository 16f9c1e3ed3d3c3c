"""The Avro contracts of paystream, loaded from ``schemas/avro/<topic>.avsc``.

The ``.avsc`` files are the single source of truth for every event: the topic
catalog, the envelope helper, the codecs and the schema registry all derive
from what is loaded here, so a contract is never restated by hand in Python.
A file's name is its topic's name (``order.created.avsc`` is the contract of
topic ``order.created``).

The files are read through :mod:`importlib.resources`, so the loader works the
same from a source checkout and from an installed package (``setup.cfg``
ships them as package data ``schemas = avro/*.avsc``).
"""

from __future__ import annotations

import copy
import difflib
import json
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any

from fastavro import parse_schema

#: Extension of a contract file; the rest of the file name is the topic name.
SUFFIX = ".avsc"

#: Where the contracts live inside the source tree, for humans and generated
#: docs (the loader itself reads them as package resources).
SOURCE_DIR = "schemas/avro"


def _avro_dir() -> Traversable:
    return files("schemas").joinpath("avro")


class UnknownContract(KeyError):
    """Raised for a topic that has no ``.avsc`` file.

    A ``KeyError`` (hence a ``LookupError``) so code that treats the contracts
    as a mapping can catch it as usual; the message names the topic and the
    closest known names, because the usual cause is a typo.
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic
        close = difflib.get_close_matches(str(topic), _names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        self.message = (
            f"no Avro contract for topic {topic!r} (no {SOURCE_DIR}/{topic}{SUFFIX}){hint}"
        )
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


@cache
def _names() -> tuple[str, ...]:
    return tuple(
        sorted(
            entry.name[: -len(SUFFIX)]
            for entry in _avro_dir().iterdir()
            if entry.is_file() and entry.name.endswith(SUFFIX)
        )
    )


def contract_names() -> list[str]:
    """Sorted names of the topics that have a contract.

    The catalog is checked against this list, so a topic cannot exist without
    a schema, nor a schema without a topic.
    """
    return list(_names())


@cache
def _loaded(topic: str) -> dict[str, Any]:
    if topic not in _names():
        raise UnknownContract(topic)
    text = _avro_dir().joinpath(f"{topic}{SUFFIX}").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def schema_dict(topic: str) -> dict[str, Any]:
    """The contract of ``topic`` as a JSON object, exactly as written in its file.

    A fresh deep copy on every call: the cached original backs
    :func:`schema_text` and :func:`parsed_schema`, and a caller that edits its
    copy (a test building an incompatible variant, say) must not change what
    everybody else sees.
    """
    return copy.deepcopy(_loaded(topic))


@cache
def schema_text(topic: str) -> str:
    """The schema string registered for ``topic`` (subject ``<topic>-value``).

    Compact JSON of the file, keys in file order, docs and defaults kept.  It
    is deliberately not Avro's Parsing Canonical Form: that form drops
    defaults and docs, and the registry needs the defaults to judge BACKWARD
    compatibility.  Being derived deterministically from the file, the same
    file always registers the same text, so re-registering is a no-op.
    """
    return json.dumps(_loaded(topic), separators=(",", ":"), ensure_ascii=False)


@cache
def parsed_schema(topic: str) -> dict[str, Any]:
    """The contract of ``topic`` parsed by fastavro, ready for its readers/writers.

    Parsing resolves names and checks defaults, which costs far more than an
    encode, so it happens once per topic and process.  The result is shared:
    treat it as read-only.
    """
    parsed: dict[str, Any] = parse_schema(schema_dict(topic))
    return parsed


def field_names(topic: str) -> list[str]:
    """Names of the top-level fields of ``topic``'s record, in schema order."""
    return [field["name"] for field in _loaded(topic)["fields"]]


def payload_fields(topic: str) -> list[str]:
    """Names of the fields of ``topic`` after the envelope: its business data."""
    return field_names(topic)[len(ENVELOPE_FIELDS) :]


def schema_file(topic: str) -> str:
    """Path of ``topic``'s contract relative to the repository root, for docs."""
    if topic not in _names():
        raise UnknownContract(topic)
    return f"{SOURCE_DIR}/{topic}{SUFFIX}"


def _common_leading_fields() -> tuple[str, ...]:
    """Names of the fields every contract starts with, identically (name, type, doc, default).

    This is how the envelope is known without restating it: it is whatever
    all contracts share at their head.  A file whose envelope drifts shortens
    this prefix, which the contract tests catch.
    """
    names = _names()
    if not names:
        raise RuntimeError(
            f"no {SUFFIX} files found in the schemas package ({SOURCE_DIR}); "
            "is the package data installed?"
        )
    field_lists = [_loaded(name)["fields"] for name in names]
    common: list[str] = []
    for position, field in enumerate(field_lists[0]):
        if all(len(fields) > position and fields[position] == field for fields in field_lists):
            common.append(field["name"])
        else:
            break
    return tuple(common)


#: The envelope: names of the fields that open every contract, in order.
ENVELOPE_FIELDS: tuple[str, ...] = _common_leading_fields()


@cache
def _payload_spec(topic: str) -> tuple[tuple[str, bool, Any], ...]:
    return tuple(
        (spec["name"], "default" in spec, spec.get("default"))
        for spec in _loaded(topic)["fields"][len(ENVELOPE_FIELDS):]
    )


def payload(topic: str, **values: Any) -> dict[str, Any]:
    """Exactly the business fields of ``topic``: the values given, else the contract's defaults.

    How a decision builds the payload of an event without restating its
    contract.  A field the contract lacks, or a required one not given, is a
    bug in the caller (a contract changed under it), not bad input, hence
    RuntimeError: it must fail the tests rather than be dead-lettered as a
    business error.
    """
    spec = _payload_spec(topic)
    unknown = sorted(set(values) - {name for name, _, _ in spec})
    if unknown:
        raise RuntimeError(f"{topic}: contract has no field(s) {', '.join(unknown)}")
    result: dict[str, Any] = {}
    for name, has_default, default in spec:
        if name in values:
            result[name] = values[name]
        elif has_default:
            result[name] = copy.deepcopy(default)
        else:
            raise RuntimeError(f"{topic}: required field {name!r} not given")
    return result


def field_type(topic: str, name: str) -> Any:
    """The Avro type of ``topic``'s top-level field ``name`` (a copy); LookupError if none."""
    for spec in _loaded(topic)["fields"]:
        if spec["name"] == name:
            return copy.deepcopy(spec["type"])
    raise LookupError(f"contract {topic} has no field {name!r}")


def named_type(topic: str, name: str, kind: str) -> dict[str, Any]:
    """The inline Avro ``kind`` (enum, array, record) of field ``name``, also inside a union."""
    type_ = field_type(topic, name)
    for branch in type_ if isinstance(type_, list) else [type_]:
        if isinstance(branch, dict) and branch.get("type") == kind:
            return branch
    raise LookupError(f"{topic}.{name}: expected an inline Avro {kind}, found {type_!r}")


def enum_symbols(topic: str, name: str) -> tuple[str, ...]:
    """The symbols of the enum field ``name`` of ``topic``, in contract order."""
    return tuple(named_type(topic, name, "enum")["symbols"])
