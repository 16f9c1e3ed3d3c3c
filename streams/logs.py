"""Log lines of every paystream process: ``LOG_FORMAT=text|json`` and the secret filter.

``LOG_FORMAT=json`` makes each log record one JSON object on one line:
``ts`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``msg``, then
``event_id``, ``correlation_id``, ``topic``, ``partition``, ``offset`` when
the line is about a Kafka record (given with ``extra=`` (:func:`record_fields`)
or set for a block with :func:`about_record`), and ``exc`` with the
traceback of an exception.  The worker and the sinks (Faust's logging set-up,
:func:`faust_logging_config`), the ingress and the registry
(:func:`configure`) all use it.  Faust's start-up banner is not a log
record, so a JSON worker runs quiet (``faust.Worker(quiet=True)``); any
other output of a JSON process (librdkafka's own lines, a stray ``print``,
an uncaught exception) is turned into a record too
(:func:`capture_process_output`).

:class:`SecretFilter` sits on every handler, whatever the format, as the last
line of defence: it rewrites any line holding a Stripe key (``sk_…``,
``rk_…``), a webhook secret (``whsec_…``), a bearer token, a card number
(13-19 digits, an issuer's first digit, Luhn-valid), an e-mail address or
one of the process' own configured secrets (:func:`secrets_of`).  Code
should not log such things in the first place (the log test greps a full
flow for them); the filter makes a slip cost a redaction marker, not a leak.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import fcntl
import json
import logging
import os
import re
import struct
import sys
import termios
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO

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
    JSON, the process' other output becomes log records too
    (:func:`capture_process_output`).
    """
    stream = capture_process_output() if settings.log_format == "json" else None
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(settings))
    handler.addFilter(SecretFilter(secrets_of(settings)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level is not None else settings.log_level.upper())


#: The process' real standard error once :func:`capture_process_output` ran: log handlers write here.
REAL_STDERR: TextIO | None = None
#: librdkafka's own lines: ``%<syslog level>|<time>|<facility>|<client>| <text>``.
_LIBRDKAFKA = re.compile(r"^%(\d)\|[\d.]+\|([^|]*)\|([^|]*)\|\s?(.*)$")
_SYSLOG_LEVELS = {0: logging.CRITICAL, 1: logging.CRITICAL, 2: logging.CRITICAL, 3: logging.ERROR,
                  4: logging.WARNING, 5: logging.INFO, 6: logging.INFO, 7: logging.DEBUG}


def capture_process_output() -> TextIO:
    """Make everything the process writes a log record; answer the stream handlers must write to.

    For ``LOG_FORMAT=json``, where a line that is not JSON breaks the log
    collector: file descriptors 1 and 2 become pipes read by a thread each,
    which turns every line into a record (librdkafka's own lines, written by
    its C threads when a broker is unreachable, get their syslog level and
    the ``librdkafka`` logger; anything else the ``paystream.output`` logger
    at WARNING) and hands it to the handler writing to the real standard
    error (the one returned).  Python's warnings, uncaught exceptions (main
    thread and others) and unraisable ones are logged the same way.  At exit
    (``atexit``) it waits up to a second for the pipes to be drained; what is
    written after that, while the interpreter finalizes (a librdkafka client
    destroyed last), is dropped rather than written as a non-JSON line.
    Idempotent: a second call answers the same stream.
    """
    global REAL_STDERR
    if REAL_STDERR is not None:
        return REAL_STDERR
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    REAL_STDERR = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    reads = []
    for fd in (1, 2):
        read, write = os.pipe()
        os.dup2(write, fd)
        os.close(write)
        threading.Thread(target=_pump, args=(read,), name=f"paystream-log-fd{fd}", daemon=True).start()
        reads.append(read)
    atexit.register(_drain, reads)
    _route_python_output()
    return REAL_STDERR


#: Held while a pump turns what it read into records (:func:`_drain` waits for it).
_PUMPING = threading.Lock()


def _pump(read: int) -> None:
    pending = b""
    while chunk := os.read(read, 65536):
        with _PUMPING:
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                if line.strip():
                    _emit_output(line)


def _emit_output(line: str) -> None:
    """One line of native output as a record, to the real standard error (never back into a pipe)."""
    real = REAL_STDERR
    if real is None:
        return
    if line.startswith("{"):
        with contextlib.suppress(ValueError):
            if isinstance(json.loads(line), dict):  # already a JSON object: keep it as written
                real.write(line + "\n")
                return
    native = _LIBRDKAFKA.match(line)
    if native:
        level, facility, client, text = native.groups()
        record = logging.LogRecord("librdkafka", _SYSLOG_LEVELS.get(int(level), logging.WARNING),
                                   "", 0, "%s %s: %s", (client, facility, text), None)
    else:
        record = logging.LogRecord("paystream.output", logging.WARNING, "", 0, "%s", (line,), None)
    for handler in logging.getLogger().handlers:
        if getattr(handler, "stream", None) is real:
            handler.handle(record)
            return
    SecretFilter().filter(record)
    real.write(JsonFormatter().format(record) + "\n")


def _drain(reads: list[int], timeout: float = 1.0) -> None:
    """Wait until the pipes are empty and the pumps idle (bounded by ``timeout``)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_unread(read) for read in reads):
            break
        time.sleep(0.01)
    time.sleep(0.01)  # a chunk just read: let its pump take the lock first
    if _PUMPING.acquire(timeout=max(deadline - time.monotonic(), 0.05)):
        _PUMPING.release()


def _unread(fd: int) -> int:
    """Bytes waiting in pipe ``fd`` (0 when that cannot be known)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _route_python_output() -> None:
    logging.captureWarnings(True)
    log = logging.getLogger("paystream")

    def excepthook(kind: type[BaseException], error: BaseException, tb: Any) -> None:
        log.critical("uncaught exception", exc_info=(kind, error, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        log.error("uncaught exception in thread %s", name,
                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback))  # type: ignore[arg-type]

    def unraisablehook(unraisable: Any) -> None:
        log.warning("exception ignored in %r", unraisable.object,
                    exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    sys.unraisablehook = unraisablehook


def faust_logging_config(settings: Settings, base: Mapping[str, Any]) -> dict[str, Any]:
    """Faust's ``logging_config`` (``base``, merged) with the format and filter of ``settings``.

    Faust's own handler (``default``, on stderr) is replaced by one with
    :class:`JsonFormatter` for ``json``, or Faust's own colored format for
    ``text`` (the lines operators and the tests know: ``[time] [pid]
    [LEVEL]: message``), with :class:`SecretFilter` in both cases.  For
    ``json`` it also captures the process' output
    (:func:`capture_process_output`): call it in the worker process only.
    """
    config = dict(base)
    config["merge"] = True
    config["formatters"] = {**base.get("formatters", {}),
                            "paystream_json": {"()": f"{__name__}.JsonFormatter"}}
    config["filters"] = {**base.get("filters", {}),
                         "paystream_secrets": {"()": f"{__name__}.SecretFilter",
                                               "literals": list(secrets_of(settings))}}
    if settings.log_format == "json":
        capture_process_output()
        handler = {"class": "logging.StreamHandler", "formatter": "paystream_json",
                   "stream": f"ext://{__name__}.REAL_STDERR"}
    else:
        handler = {"class": "colorlog.StreamHandler", "formatter": "colored"}
    config["handlers"] = {**base.get("handlers", {}),
                          "default": {**handler, "filters": ["paystream_secrets"]}}
    return config
