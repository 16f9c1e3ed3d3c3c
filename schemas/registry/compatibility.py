"""Compatibility levels and the rule each one applies to a new schema.

Directions, as in Confluent's registry:

* BACKWARD: the new schema (reader) can read data written with the old one.
* FORWARD: the old schema (reader) can read data written with the new one.
* FULL: both.
* ``*_TRANSITIVE``: against every live (not deleted) version of the subject;
  the plain levels only against the latest live version.
* NONE: no check.

The pairwise check is Avro's own reader/writer resolution,
``avro.compatibility.ReaderWriterCompatibilityChecker``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import avro.schema
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from schemas.registry import errors

DEFAULT_LEVEL = "BACKWARD"


class CompatibilityLevel(StrEnum):
    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"
    NONE = "NONE"

    @classmethod
    def parse(cls, value: object) -> CompatibilityLevel:
        """Case-insensitive; anything else raises ``42203``."""
        if isinstance(value, str):
            try:
                return cls(value.upper())
            except ValueError:
                pass
        raise errors.invalid_compatibility_level(value)

    @property
    def transitive(self) -> bool:
        return self.value.endswith("_TRANSITIVE")

    @property
    def checks_backward(self) -> bool:
        return self.value.startswith(("BACKWARD", "FULL"))

    @property
    def checks_forward(self) -> bool:
        return self.value.startswith(("FORWARD", "FULL"))


@dataclass(frozen=True)
class CompatibilityResult:
    is_compatible: bool
    messages: list[str] = field(default_factory=list)


def reader_can_read(reader: avro.schema.Schema, writer: avro.schema.Schema) -> list[str]:
    """Why ``reader`` cannot decode data written with ``writer`` (empty list: it can)."""
    result = ReaderWriterCompatibilityChecker().get_compatibility(reader, writer)
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    locations = ", ".join(sorted(result.locations))
    return [f"{message} (at {locations})" for message in sorted(result.messages)] or [
        f"reader cannot read writer data (at {locations})"
    ]


def check(
    level: CompatibilityLevel,
    new: avro.schema.Schema,
    existing: Sequence[avro.schema.Schema],
) -> CompatibilityResult:
    """Check ``new`` against the live versions ``existing`` (oldest first) under ``level``."""
    if level is CompatibilityLevel.NONE or not existing:
        return CompatibilityResult(True)
    targets = list(existing) if level.transitive else [existing[-1]]
    messages: list[str] = []
    for position, old in enumerate(targets):
        label = "latest version" if not level.transitive else f"live version #{position + 1}"
        if level.checks_backward:
            for reason in reader_can_read(new, old):
                messages.append(f"BACKWARD: new schema cannot read data written by the {label}: {reason}")
        if level.checks_forward:
            for reason in reader_can_read(old, new):
                messages.append(f"FORWARD: the {label} cannot read data written by the new schema: {reason}")
    return CompatibilityResult(not messages, messages)
