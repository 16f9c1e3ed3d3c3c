"""Log lines of every paystream process: ``LOG_FORMAT=text|json`` and the secret filter.

``LOG_FORMAT=json`` makes each log record one JSON object on one line:
``ts`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``msg``, then
``event_id``, ``correlation_id``, ``topic``, ``partition``, ``offset`` when
the line is about a Kafka record (given with ``extra=`` (:func:`record_fields`)
or set for a block with :func:`about_record`), and ``exc`` with the
traceback of an exception.  The worker and the sinks (Faust's logging set-up,
:func:`faust_logging_config`), the ingress and the registry
(:func:`configure`) all use it; Faust's start-up banner and the other
``print`` output are not log records, so a JSON worker runs quiet
(``faust.Worker(quiet=True)``) and stray ``print`` lines are turned into
log records by Faust's stdout redirect.

:class:`SecretFilter` sits on every handler, whatever the format, as the last
line of defence: it rewrites any line holding a Stripe key (``sk_…``,
``rk_…``), a webhook secret (``whsec_…``), a bearer token, a card number
(13-19 digits, an issuer's first digit, Luhn-valid), an e-mail address or
one of the process' own configured secrets (:func:`secrets_of`).  Code
should not log such things in the first place (the log test greps a full
flow for them); the filter makes a slip cost a redaction marker, not a leak.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from streams.settings import Settings

#: The record fields a line may carry, in the order they are written.
RECORD_FIELDS = ("event_id", "correlation_id", "topic", "partition", "offset")
REDACTED = "[redacted]"

_about: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "paystream_log_record", default=None)


# ----------------------------------------------------------------------
# Record context


def record_fields(event: Any = None, *, event_id: Any = None, correlation_id: Any = None,
                  topic: str | None = None, partition: int | None = None,
                  offset: int | None = None) -> dict[str, Any]:
    """The :data:`RECORD_FIELDS` of a Faust event (its message's topic, partition, offset) and ids.

    For ``logger.info(..., extra=record_fields(event, event_id=...))``;
    fields that are None are left out.
    """
    message = getattr(event, "message", None)
    if message is not None:
        topic = topic if topic is not None else getattr(message, "topic", None)
        partition = partition if partition is not None else getattr(message, "partition", None)
        offset = offset if offset is not None else getattr(message, "offset", None)
    values = {"event_id": event_id, "correlation_id": correlation_id, "topic": topic,
              "partition": partition, "offset": offset}
    return {k: v for k, v in values.items() if v is not None}


@contextlib.contextmanager
def about_record(event: Any = None, **fields: Any) -> Iterator[None]:
    """Lines logged in this block (same task) carry the record's fields (:func:`record_fields`)."""
    token = _about.set(record_fields(event, **fields))
    try:
        yield
    finally:
        _about.reset(token)


# ----------------------------------------------------------------------
# Scrubbing

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9\-._~+/=]+"), f"Bearer {REDACTED}"),
    (re.compile(r"\b(?:sk|rk)_[A-Za-z0-9_]{4,}"), REDACTED),
    (re.compile(r"\bwhsec_[A-Za-z0-9_]+"), REDACTED),
    (re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"), REDACTED),
)
#: 13-19 digits (spaces or dashes between them allowed), starting as issuers' numbers do (2-6).
_CARD = re.compile(r"(?<![\d.])[2-6](?:[ -]?\d){12,18}(?![\d.])")


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", match.group(0))
    return REDACTED if _luhn(digits) else match.group(0)


def scrub(text: str, literals: Iterable[str] = ()) -> str:
    """``text`` with secrets, bearer tokens, card numbers and e-mail addresses replaced."""
    for literal in literals:
        if literal and literal in text:
            text = text.replace(literal, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return _CARD.sub(_card, text)


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """The configured secrets of a process: service tokens, the Stripe key, the webhook secrets.

    Only values long enough not to redact ordinary words (8 characters and more).
    """
    values = (*settings.service_token_list, settings.stripe_api_key, *settings.stripe_webhook_secrets)
    return tuple(sorted({v for v in values if len(v) >= 8}, key=len, reverse=True))


class SecretFilter(logging.Filter):
    """Rewrites a record's message (and traceback) with :func:`scrub`; never drops a record."""

    def __init__(self, literals: Iterable[str] = ()) -> None:
        super().__init__()
        self.literals = tuple(literals)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the formatter to report
            return True
        clean = scrub(message, self.literals)
        if clean != message:
            # () rather than None: Faust's colored formatter formats the args again.
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text, self.literals)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info, self.literals)
        return True


# ----------------------------------------------------------------------
# Formats


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        about = _about.get() or {}
        for name in RECORD_FIELDS:
            value = getattr(record, name, None)
            if value is None:
                value = about.get(name)
            if value is not None:
                line[name] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def formatter(settings: Settings) -> logging.Formatter:
    """The formatter ``LOG_FORMAT`` names."""
    return JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure(settings: Settings, level: str | int | None = None) -> None:
    """Log to stderr in ``LOG_FORMAT`` at ``level`` (default ``LOG_LEVEL``), secrets filtered.

    For the processes that are not Faust workers (ingress, registry).  In
    JSON, Python's warnings and an uncaught exception are log records too.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(settings))
    handler.addFilter(SecretFilter(secrets_of(settings)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level is not None else settings.log_level.upper())
    if settings.log_format == "json":
        _route_stray_output()


def _route_stray_output() -> None:
    logging.captureWarnings(True)

    def excepthook(kind: type[BaseException], error: BaseException, tb: Any) -> None:
        logging.getLogger("paystream").critical("uncaught exception", exc_info=(kind, error, tb))

    sys.excepthook = excepthook


def faust_logging_config(settings: Settings, base: Mapping[str, Any]) -> dict[str, Any]:
    """Faust's ``logging_config`` (``base``, merged) with the format and filter of ``settings``.

    Faust's own handler (``default``, on stderr) is replaced by one with
    :class:`JsonFormatter` for ``json``, or Faust's own colored format for
    ``text`` (the lines operators and the tests know: ``[time] [pid]
    [LEVEL]: message``), with :class:`SecretFilter` in both cases.
    """
    config = dict(base)
    config["merge"] = True
    config["formatters"] = {**base.get("formatters", {}),
                            "paystream_json": {"()": f"{__name__}.JsonFormatter"}}
    config["filters"] = {**base.get("filters", {}),
                         "paystream_secrets": {"()": f"{__name__}.SecretFilter",
                                               "literals": list(secrets_of(settings))}}
    if settings.log_format == "json":
        handler = {"class": "logging.StreamHandler", "formatter": "paystream_json"}
    else:
        handler = {"class": "colorlog.StreamHandler", "formatter": "colored"}
    config["handlers"] = {**base.get("handlers", {}),
                          "default": {**handler, "filters": ["paystream_secrets"]}}
    if settings.log_format == "json":
        _route_stray_output()
    return config
