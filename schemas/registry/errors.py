"""Confluent Schema Registry errors: HTTP status, ``error_code`` and message.

Clients (``confluent_kafka.schema_registry`` and the Java serdes) branch on
``error_code``, so the codes and the shape of the body,
``{"error_code": N, "message": "..."}``, are those of Confluent's registry.
The core raises :class:`RegistryError`; only the HTTP layer turns it into a
response.
"""

from __future__ import annotations

from typing import Any

SUBJECT_NOT_FOUND = 40401
VERSION_NOT_FOUND = 40402
SCHEMA_NOT_FOUND = 40403
SUBJECT_SOFT_DELETED = 40404
SUBJECT_NOT_SOFT_DELETED = 40405
VERSION_SOFT_DELETED = 40406
VERSION_NOT_SOFT_DELETED = 40407
SUBJECT_COMPATIBILITY_NOT_CONFIGURED = 40408
SUBJECT_MODE_NOT_CONFIGURED = 40409
ASSOCIATION_NOT_FOUND = 40410
INCOMPATIBLE_SCHEMA = 409
INVALID_SCHEMA = 42201
INVALID_VERSION = 42202
INVALID_COMPATIBILITY_LEVEL = 42203
INVALID_MODE = 42204
OPERATION_NOT_PERMITTED = 42205
ID_DOES_NOT_MATCH = 42207
STORE_ERROR = 50001
OPERATION_TIMEOUT = 50002
REQUEST_FORWARDING_FAILED = 50003

# Generic codes for requests that never reach the registry logic (no route,
# unparseable body); Confluent answers those with the HTTP status as the code.
NOT_FOUND = 404
METHOD_NOT_ALLOWED = 405
UNSUPPORTED_MEDIA_TYPE = 415
BAD_REQUEST = 400


class RegistryError(Exception):
    """A failure the client should see as a Confluent error body."""

    def __init__(self, http_status: int, error_code: int, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.error_code = error_code
        self.message = message

    def body(self) -> dict[str, Any]:
        return error_body(self.error_code, self.message)

    def __repr__(self) -> str:
        return f"RegistryError({self.http_status}, {self.error_code}, {self.message!r})"


def error_body(error_code: int, message: str) -> dict[str, Any]:
    """The JSON body of every error answer."""
    return {"error_code": error_code, "message": message}


def subject_not_found(subject: str) -> RegistryError:
    return RegistryError(404, SUBJECT_NOT_FOUND, f"Subject '{subject}' not found.")


def version_not_found(version: int | str) -> RegistryError:
    return RegistryError(404, VERSION_NOT_FOUND, f"Version {version} not found.")


def schema_not_found(schema_id: int | None = None) -> RegistryError:
    message = "Schema not found" if schema_id is None else f"Schema {schema_id} not found"
    return RegistryError(404, SCHEMA_NOT_FOUND, message)


def subject_soft_deleted(subject: str) -> RegistryError:
    return RegistryError(
        404,
        SUBJECT_SOFT_DELETED,
        f"Subject '{subject}' was soft deleted. Set permanent=true to delete permanently",
    )


def subject_not_soft_deleted(subject: str) -> RegistryError:
    return RegistryError(
        404,
        SUBJECT_NOT_SOFT_DELETED,
        f"Subject '{subject}' was not deleted first before being permanently deleted",
    )


def version_soft_deleted(subject: str, version: int) -> RegistryError:
    return RegistryError(
        404,
        VERSION_SOFT_DELETED,
        f"Subject '{subject}' Version {version} was soft deleted. "
        "Set permanent=true to delete permanently",
    )


def version_not_soft_deleted(subject: str, version: int) -> RegistryError:
    return RegistryError(
        404,
        VERSION_NOT_SOFT_DELETED,
        f"Subject '{subject}' Version {version} was not deleted first before being "
        "permanently deleted",
    )


def subject_compatibility_not_configured(subject: str) -> RegistryError:
    return RegistryError(
        404,
        SUBJECT_COMPATIBILITY_NOT_CONFIGURED,
        f"Subject '{subject}' does not have subject-level compatibility configured",
    )


def subject_mode_not_configured(subject: str) -> RegistryError:
    return RegistryError(
        404, SUBJECT_MODE_NOT_CONFIGURED, f"Subject '{subject}' does not have subject-level mode configured"
    )


def association_not_found(resource: str) -> RegistryError:
    return RegistryError(404, ASSOCIATION_NOT_FOUND, f"Association for '{resource}' not found.")


def incompatible_schema(subject: str, messages: list[str]) -> RegistryError:
    detail = "; ".join(messages)
    message = f"Schema being registered is incompatible with an earlier schema for subject '{subject}'"
    if detail:
        message += f", details: {detail}"
    return RegistryError(409, INCOMPATIBLE_SCHEMA, message)


def invalid_schema(message: str) -> RegistryError:
    return RegistryError(422, INVALID_SCHEMA, message)


def invalid_version(version: object) -> RegistryError:
    return RegistryError(
        422,
        INVALID_VERSION,
        f"The specified version '{version}' is not a valid version id. Allowed values are between "
        "[1, 2^31-1] and the string \"latest\"",
    )


def invalid_compatibility_level(level: object) -> RegistryError:
    return RegistryError(
        422,
        INVALID_COMPATIBILITY_LEVEL,
        f"Invalid compatibility level {level!r}. Valid values are none, backward, forward, full, "
        "backward_transitive, forward_transitive, and full_transitive",
    )


def invalid_mode(mode: object) -> RegistryError:
    return RegistryError(
        422,
        INVALID_MODE,
        f"Invalid mode {mode!r}. Valid values are READWRITE, READONLY, READONLY_OVERRIDE and IMPORT",
    )


def operation_not_permitted(message: str) -> RegistryError:
    return RegistryError(422, OPERATION_NOT_PERMITTED, message)


def store_error(message: str) -> RegistryError:
    return RegistryError(500, STORE_ERROR, message)


def operation_timeout(message: str) -> RegistryError:
    return RegistryError(500, OPERATION_TIMEOUT, message)


def not_ready(topic: str) -> RegistryError:
    """State not loaded from Kafka yet (broker unreachable at start, or still reading)."""
    return RegistryError(
        503,
        OPERATION_TIMEOUT,
        f"Schema registry is not ready: its state is still being loaded from Kafka topic "
        f"'{topic}'; retry later",
    )


def bad_request(message: str) -> RegistryError:
    """A body that is not JSON or has the wrong shape (Confluent answers these with 400/422)."""
    return RegistryError(400, BAD_REQUEST, message)
