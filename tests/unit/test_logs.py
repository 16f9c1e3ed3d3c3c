"""streams.logs: the JSON line format, record fields, and the secret filter (no broker)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from streams import logs
from streams.devtools.worker_process import ROOT
from streams.settings import Settings


def _record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("card 4242 4242 4242 4242 declined for sk_test_abc123")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("paystream.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra)
    return record


def test_a_json_line_has_the_fixed_keys_and_the_record_fields_given() -> None:
    event = SimpleNamespace(message=SimpleNamespace(topic="t.order.created", partition=3, offset=41))
    record = _record("dead-lettered %s", "x", **logs.record_fields(event, event_id="e-1",
                                                                    correlation_id="c-1"))
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["level"] == "WARNING" and parsed["logger"] == "paystream.test"
    assert parsed["msg"] == "dead-lettered x"
    assert parsed["ts"].endswith("Z") and parsed["ts"][10] == "T"
    assert {k: parsed[k] for k in logs.RECORD_FIELDS} == {
        "event_id": "e-1", "correlation_id": "c-1", "topic": "t.order.created", "partition": 3,
        "offset": 41}


def test_fields_come_from_the_block_about_a_record_and_only_inside_it() -> None:
    event = SimpleNamespace(message=SimpleNamespace(topic="t.payment.completed", partition=0, offset=7))
    formatter = logs.JsonFormatter()
    with logs.about_record(event):
        inside = json.loads(formatter.format(_record("inside")))
    outside = json.loads(formatter.format(_record("outside")))
    assert (inside["topic"], inside["partition"], inside["offset"]) == ("t.payment.completed", 0, 7)
    assert "event_id" not in inside
    assert not set(logs.RECORD_FIELDS) & set(outside)


def test_a_traceback_stays_on_the_line_and_is_scrubbed() -> None:
    record = _record("call failed", exc=True)
    assert logs.SecretFilter().filter(record)
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert "ValueError" in parsed["exc"] and "Traceback" in parsed["exc"]
    assert "4242 4242 4242 4242" not in line and "sk_test_abc123" not in line


@pytest.mark.parametrize("secret", [
    "sk_test_51H8xYzAbCdEf", "sk_live_9fA0", "rk_test_abcdef0123", "rk_live_Z9", "sk_local_value",
    "whsec_paystream_payment_tests", "whsec_local",
    "4242424242424242", "4242 4242 4242 4242", "4000-0000-0000-0002", "5555555555554444",
    "378282246310005", "6011111111111117",
    "user-7@example.test", "Jane.Doe+promo@mail.example.com",
])
def test_secrets_cards_and_addresses_are_redacted(secret: str) -> None:
    for template in ("{}", "key={} then", "'{}'", "({})", '"card": "{}"'):
        text = template.format(secret)
        clean = logs.scrub(text)
        assert secret not in clean and logs.REDACTED in clean, clean


def test_bearer_tokens_are_redacted_whatever_they_look_like() -> None:
    clean = logs.scrub("headers {'Authorization': 'Bearer q8-Z_x.y~1+/='} sent; bearer abc")
    assert "q8-Z_x" not in clean and " abc" not in clean
    assert clean.count(f"Bearer {logs.REDACTED}") == 2


@pytest.mark.parametrize("harmless", [
    "1764240000000", "offset 4242424242424241", "order 0f3c9a1e-5b7d-4c2a-9e8f-1a2b3c4d5e6f",
    "partition 3 offset 123456", "amount 4999 EUR", "task_test_value", "disk_usage", "1.4242424242424242",
    "v=4242424242424242.5",
])
def test_ordinary_values_are_left_alone(harmless: str) -> None:
    assert logs.scrub(harmless) == harmless


def test_the_filter_redacts_configured_secrets_in_arguments() -> None:
    settings = Settings.from_env(env={"PAYSTREAM_SERVICE_TOKENS": "opaque-token-1234,old-opaque-9876",
                                      "STRIPE_API_KEY": "pk-custom-secret-key"})
    literals = logs.secrets_of(settings)
    assert {"opaque-token-1234", "old-opaque-9876", "pk-custom-secret-key"} <= set(literals)
    record = _record("token %s key %r", "old-opaque-9876", "pk-custom-secret-key")
    logs.SecretFilter(literals).filter(record)
    assert record.getMessage() == f"token {logs.REDACTED} key '{logs.REDACTED}'"
    untouched = _record("nothing %d here", 5)
    logs.SecretFilter(literals).filter(untouched)
    assert (untouched.msg, untouched.args) == ("nothing %d here", (5,))


def test_settings_refuse_an_unknown_format_or_level() -> None:
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        Settings.from_env(env={"LOG_FORMAT": "xml"})
    with pytest.raises(ValueError, match="LOG_LEVEL"):
        Settings.from_env(env={"LOG_LEVEL": "chatty"})


_SCRIPT = textwrap.dedent("""
    import logging, os, sys, threading, warnings
    from mode.utils.logging import setup_logging
    from streams import logs
    from streams.app import QUIET_LOGGING
    from streams.settings import Settings

    settings = Settings.from_env()
    if sys.argv[1] == "faust":
        setup_logging(loglevel="debug", logging_config=logs.faust_logging_config(settings, QUIET_LOGGING))
    else:
        logs.configure(settings, "DEBUG")
    logging.getLogger("paystream.x").info("plain %s", "line")
    logging.getLogger("paystream.x").warning("sent Bearer %s with %s", "tok-in-flight", "sk_test_zz9")
    logging.getLogger("faust.noise").info("quieted at INFO")
    try:
        raise RuntimeError("multi\\nline")
    except RuntimeError:
        logging.getLogger("paystream.x").exception("failed")
    warnings.warn("old api", DeprecationWarning, stacklevel=1)
    os.write(2, b"%3|1795776764.746|FAIL|rdkafka#producer-1| [thrd:x]: Connect to 127.0.0.1:1 failed\\n")
    os.write(1, b"a C library's line on stdout\\n")
    print("a stray print to stderr", file=sys.stderr, flush=True)
    if sys.argv[2] == "kafka":  # a real librdkafka client whose broker is not there
        from confluent_kafka import Producer
        Producer({"bootstrap.servers": "127.0.0.1:1"}).flush(1.5)
    thread = threading.Thread(target=lambda: 1 / 0, name="doomed")
    thread.start()
    thread.join()
    raise RuntimeError("the end")
""")


@pytest.mark.parametrize(("setup", "kafka"), [("faust", "kafka"), ("plain", "kafka"), ("plain", "-")])
def test_a_process_set_up_for_json_writes_only_json_lines(setup: str, kafka: str) -> None:
    """Both set-ups (the Faust worker's and the ingress'/registry's), in a process of its own.

    Its log records, Python's warnings, exceptions nobody caught (in the main
    thread and another), stray output on both descriptors and librdkafka's
    own lines (a real client with no broker) all end as JSON lines on stderr.
    """
    env = {"LOG_FORMAT": "json", "PAYSTREAM_SERVICE_TOKENS": "tok-in-flight", "PATH": "/usr/bin:/bin",
           "PYTHONWARNINGS": "always"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, setup, kafka], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr  # the uncaught RuntimeError
    assert done.stdout == ""
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    messages = [line["msg"] for line in lines]
    assert "plain line" in messages and "failed" in messages
    assert f"sent Bearer {logs.REDACTED} with {logs.REDACTED}" in messages
    assert any("old api" in m for m in messages)  # warnings are records too
    assert ("quieted at INFO" in messages) == (setup == "plain")
    failed = next(line for line in lines if line["msg"] == "failed")
    assert "RuntimeError: multi" in failed["exc"]
    by_logger = {(line["logger"], line["level"], line["msg"]) for line in lines}
    assert ("librdkafka", "ERROR", "rdkafka#producer-1 FAIL: [thrd:x]: Connect to 127.0.0.1:1 failed") \
        in by_logger
    assert ("paystream.output", "WARNING", "a C library's line on stdout") in by_logger
    assert ("paystream.output", "WARNING", "a stray print to stderr") in by_logger
    assert any(m == "uncaught exception in thread doomed" for m in messages)
    [last] = [line for line in lines if line["msg"] == "uncaught exception"]
    assert "RuntimeError: the end" in last["exc"]
    if kafka == "kafka":  # librdkafka's C threads wrote these themselves
        assert any(line["logger"] == "librdkafka" and "Connection refused" in line["msg"]
                   for line in lines), messages
    assert "tok-in-flight" not in done.stderr and "sk_test_zz9" not in done.stderr


def test_text_format_keeps_faust_s_line_and_still_filters() -> None:
    env = {"PAYSTREAM_SERVICE_TOKENS": "tok-in-flight", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, "faust", "-"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "[WARNING]" in done.stderr and "sent Bearer" in done.stderr
    assert "tok-in-flight" not in done.stderr and "sk_test_zz9" not in done.stderr
