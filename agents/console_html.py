"""The operator console's pages as HTML: pure functions from plain values to markup.

No Faust, no aiohttp, no I/O: :mod:`agents.console` gathers the values and
serves what these functions return.  Everything shown comes from records
an attacker may have written (a dead letter is whatever bytes reached a
topic), so every value is escaped on its way in: the templates are
:class:`string.Template` strings whose placeholders are filled only through
:func:`render`, which escapes every value that is not already
:class:`Html` (markup built here, from escaped parts).  Nothing here emits a
``<script>``, an inline event handler or a ``style`` attribute: the
console's Content-Security-Policy forbids them, and the page works without
them (plain links and forms).

Values whose name says they are secret (:data:`SECRET_NAMES`: a
``client_secret``, a token, a password, an ``Authorization`` header...) are
shown as ``[redacted]`` wherever a mapping of them is rendered: the views
the APIs answer do not carry such fields, and a record on a topic should
not either, but a page an operator may screenshot is no place to find out.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from string import Template
from typing import Any
from urllib.parse import urlencode

#: Where the console lives on the worker's web server.
ROOT = "/console"
STYLESHEET = f"{ROOT}/static/console.css"
#: The form field that carries the CSRF token of a replay.
CSRF_FIELD = "csrf_token"
#: The form field an operator ticks to confirm a replay.
CONFIRM_FIELD = "confirm"
CONFIRM_VALUE = "replay"

#: Mapping keys (case-insensitive) whose values are never shown.
SECRET_NAMES = re.compile(
    r"secret|token|password|passwd|authorization|api[_-]?key|card[_-]?number|cvc|cvv",
    re.IGNORECASE)
REDACTED = "[redacted]"


class Html(str):
    """Markup that is safe to emit as is: built here from escaped parts."""

    __slots__ = ()


def esc(value: Any) -> Html:
    """``value`` as HTML text: markup characters and both quotes escaped (``Html`` passes as is)."""
    if isinstance(value, Html):
        return value
    return Html(html.escape("" if value is None else str(value), quote=True))


def render(template: Template, **values: Any) -> Html:
    """``template`` with every value escaped (unless it is :class:`Html`)."""
    return Html(template.substitute({name: esc(value) for name, value in values.items()}))


def join(parts: Iterable[Any]) -> Html:
    return Html("".join(esc(part) for part in parts))


def href(path: str, **query: Any) -> str:
    """A console URL with its query string (values URL-encoded; None left out)."""
    params = [(k, v) for k, v in query.items() if v is not None and v != ""]
    return f"{path}?{urlencode(params, doseq=True)}" if params else path


def redact(value: Any) -> Any:
    """``value`` with every mapping entry named like a secret replaced by ``[redacted]``."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if isinstance(k, str) and SECRET_NAMES.search(k) else redact(v))
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def pretty(value: Any) -> str:
    """A decoded value as indented JSON (bytes as hex), secrets redacted; escaped by the caller."""
    return json.dumps(redact(value), indent=2, sort_keys=True, ensure_ascii=False,
                      default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes | bytearray):
        return bytes(obj).hex()
    return str(obj)


def when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


# ----------------------------------------------------------------------
# The frame


PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="same-origin">
<title>$title · paystream console</title>
<link rel="stylesheet" href="$stylesheet">
</head>
<body>
<header>
<span class="brand">paystream console</span>
<nav>
<a href="$root">Pipeline health</a>
<a href="$root/dead-letters">Dead letters</a>
<a href="$root/lookup">Lookup</a>
</nav>
<span class="where">$app_id · worker $worker</span>
</header>
<main>
<h1>$title</h1>
$body
</main>
</body>
</html>
""")


@dataclass(frozen=True)
class Frame:
    """What every page shows in its header."""

    app_id: str
    worker: str


def page(frame: Frame, title: str, body: Html) -> Html:
    return render(PAGE, title=title, stylesheet=STYLESHEET, root=ROOT, app_id=frame.app_id,
                  worker=frame.worker, body=body)


NOTICE = Template('<p class="$kind">$text</p>\n')


def notice(text: Any, kind: str = "note") -> Html:
    return render(NOTICE, kind=kind, text=text)


def problems_list(problems: Sequence[str]) -> Html:
    items = join(render(Template("<li>$p</li>"), p=p) for p in problems)
    return render(Template('<ul class="error">$items</ul>\n'), items=items)


def table(head: Sequence[str] | None, rows: Iterable[Sequence[Any]], *, css: str = "") -> Html:
    """A table: ``head`` as header cells (None: no header row), each row's values escaped
    (``Html`` cells as is)."""
    if head is None:
        body = table((), rows, css=css)
        return Html(body.replace("<thead><tr></tr></thead>\n", ""))
    head_html = join(render(Template("<th>$h</th>"), h=h) for h in head)
    rows_html = join(
        render(Template("<tr>$cells</tr>\n"),
               cells=join(render(Template("<td>$c</td>"), c=c) for c in row))
        for row in rows)
    return render(Template('<table class="$css"><thead><tr>$head</tr></thead>\n<tbody>\n$rows'
                           '</tbody></table>\n'), css=css, head=head_html, rows=rows_html)


def link(url: str, text: Any) -> Html:
    return render(Template('<a href="$url">$text</a>'), url=url, text=text)


def pre(text: str, css: str = "") -> Html:
    return render(Template('<pre class="$css">$text</pre>\n'), css=css, text=text)


# ----------------------------------------------------------------------
# Pipeline health


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None
    end: int | None

    @property
    def lag(self) -> int | None:
        if self.committed is None or self.end is None:
            return None
        return max(0, self.end - self.committed)


@dataclass(frozen=True)
class AgentHealth:
    """One kernel agent as the health page shows it."""

    agent: str
    flow: str
    topics: tuple[str, ...]
    #: Input records per second over :attr:`window` seconds (None: no counters or no window yet).
    rate: float | None
    window: float | None
    total: float | None
    partitions: tuple[PartitionLag, ...] = ()

    @property
    def lag(self) -> int | None:
        known = [p.lag for p in self.partitions if p.lag is not None]
        return sum(known) if known else None


@dataclass(frozen=True)
class Health:
    agents: tuple[AgentHealth, ...]
    metrics_on: bool
    rebalancing: bool
    assigned: int
    notes: tuple[str, ...] = field(default=())


def _number(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if digits else f"{int(value):,}"


def health_page(frame: Frame, health: Health) -> Html:
    parts: list[Html] = []
    state = "rebalancing: partitions are moving" if health.rebalancing else "serving"
    parts.append(notice(f"This worker is {state}; it holds {health.assigned} assigned "
                        "partitions. Lag is shown for the partitions of this worker only: "
                        "each worker's console shows its own."))
    if not health.metrics_on:
        parts.append(notice("PAYSTREAM_METRICS=off: this worker keeps no input counters, so no "
                            "rates are shown; lag is read from its consumer.", "warn"))
    parts.extend(notice(n) for n in health.notes)
    summary_rows = []
    for agent in health.agents:
        rate = "-" if agent.rate is None else f"{agent.rate:,.2f}/s"
        window = "" if agent.window is None else f" over {agent.window:.0f} s"
        summary_rows.append((agent.agent, agent.flow, ", ".join(agent.topics), rate + window,
                             _number(agent.total, 0), _number(agent.lag, 0)))
    parts.append(render(Template('<h2>Agents</h2>\n$t'), t=table(
        ("agent", "table", "input topics", "input rate", "inputs taken", "lag (records)"),
        summary_rows, css="agents")))
    for agent in health.agents:
        rows = [(f"{p.topic}", p.partition, _number(p.committed, 0), _number(p.end, 0),
                 _number(p.lag, 0)) for p in agent.partitions]
        body = (table(("topic", "partition", "committed", "log end", "lag"), rows, css="lag")
                if rows else notice("no input partition of this agent is assigned to this worker"))
        parts.append(render(Template('<h3 id="agent-$id">$name: lag per partition</h3>\n$body'),
                            id=agent.agent, name=agent.agent, body=body))
    return page(frame, "Pipeline health", join(parts))


# ----------------------------------------------------------------------
# Dead letters


@dataclass(frozen=True)
class LetterFilter:
    """The list's filter form, as typed (strings, so the form shows them back)."""

    source_topic: str = ""
    reason: str = ""
    since: str = ""
    until: str = ""
    limit: int = 100


FILTER_FORM = Template("""<form class="filters" method="get" action="$action">
<label>source topic <input name="source_topic" value="$source_topic" placeholder="payment.completed"></label>
<label>reason <input name="reason" value="$reason" placeholder="undecodable"></label>
<label>since <input name="since" value="$since" placeholder="2h, 2026-11-27T10:00, epoch ms"></label>
<label>until <input name="until" value="$until"></label>
<label>newest <input name="limit" value="$limit" size="5"></label>
<button type="submit">Filter</button>
</form>
""")

REPLAY_SELECTED = Template("""<form method="get" action="$action">
$table
<p><button type="submit">Replay selected&hellip;</button>
(a confirmation page follows; nothing is sent yet)</p>
</form>
""")


def letter_position(partition: int, offset: int) -> str:
    return f"{partition}:{offset}"


def dead_letters_page(frame: Frame, where: LetterFilter, letters: Sequence[Any] | None,
                      error: str | None = None) -> Html:
    """The list: ``letters`` are :class:`streams.ops.dlq.DeadLetter` (newest last, as listed)."""
    from streams.ops.records import text

    parts = [render(FILTER_FORM, action=f"{ROOT}/dead-letters", source_topic=where.source_topic,
                    reason=where.reason, since=where.since, until=where.until, limit=where.limit)]
    if error is not None:
        parts.append(notice(error, "error"))
    elif letters is not None:
        rows = []
        for d in reversed(letters):  # newest first
            position = letter_position(d.partition, d.offset)
            box = render(Template('<input type="checkbox" name="position" value="$v" '
                                  'aria-label="select $v">'), v=position)
            source = (f"{d.source_topic}[{d.source_partition}]@{d.source_offset}"
                      if d.source_topic else "-")
            err = (d.error or "").replace("\n", " ")
            rows.append((box, link(f"{ROOT}/dead-letters/{d.partition}/{d.offset}", position),
                         when(d.timestamp_ms), text(d.key) or "-", d.reason or "-", source,
                         d.replay_count, err[:120] + ("…" if len(err) > 120 else "")))
        parts.append(notice(f"{len(letters)} dead letter(s), newest first."))
        if rows:
            parts.append(render(REPLAY_SELECTED, action=f"{ROOT}/dead-letters/replay", table=table(
                ("", "position", "dead-lettered", "key", "reason", "source", "replays", "error"),
                rows, css="letters")))
    return page(frame, "Dead letters", join(parts))


def _headers_rows(headers: Sequence[tuple[str, bytes | None]]) -> list[tuple[str, str]]:
    from streams.ops.records import text

    return [(name, REDACTED if SECRET_NAMES.search(name) else (text(value) or "-"))
            for name, value in headers]


def dead_letter_page(frame: Frame, shown: Any) -> Html:
    """One dead letter (a :class:`streams.ops.dlq.ShownDeadLetter`), decoded."""
    from streams.ops.records import text

    d, value = shown.letter, shown.value
    position = letter_position(d.partition, d.offset)
    facts = [
        ("dead-letter topic", f"{d.topic}[{d.partition}]@{d.offset}"),
        ("dead-lettered", when(d.timestamp_ms)),
        ("reason", d.reason or "-"),
        ("source", f"{d.source_topic}[{d.source_partition}]@{d.source_offset}" if d.source_topic else "-"),
        ("source timestamp", when(d.source_timestamp_ms)),
        ("replays so far", d.replay_count),
        ("key", text(d.key) if d.key is not None else "(none)"),
        ("value format", value.format + (f" (schema {value.schema_name}, id {value.schema_id})"
                                         if value.schema_id is not None else "")),
    ]
    parts = [table(None, facts, css="facts")]
    if value.note:
        parts.append(notice(f"not decoded as Avro: {value.note}", "warn"))
    parts.append(render(Template("<h2>Error</h2>\n$e"), e=pre(d.error or "-", "error-text")))
    if value.format == "hex":
        shown_value = _hex_lines(value.value)
    elif value.format == "null":
        shown_value = "(no value: a tombstone)"
    else:
        shown_value = pretty(value.value)
    parts.append(render(Template("<h2>Value</h2>\n$v"), v=pre(shown_value, "value")))
    parts.append(render(Template("<h2>dlq.* headers</h2>\n$t"),
                        t=table(("header", "value"), _headers_rows(d.dlq_headers()))))
    own = d.own_headers()
    parts.append(render(Template("<h2>The record's own headers</h2>\n$t"),
                        t=table(("header", "value"), _headers_rows(own)) if own
                        else notice("none")))
    parts.append(render(Template('<p class="actions"><a class="button" href="$url">Replay&hellip;</a> '
                                 '(a confirmation page follows)</p>\n'),
                        url=href(f"{ROOT}/dead-letters/replay", position=position)))
    return page(frame, f"Dead letter {position}", join(parts))


def _hex_lines(hexed: str, width: int = 64) -> str:
    return "\n".join(hexed[i:i + width] for i in range(0, len(hexed), width)) or "(empty)"


CONFIRM_FORM = Template("""<form method="post" action="$action" class="confirm">
$positions<input type="hidden" name="$csrf_field" value="$csrf">
<p><label><input type="checkbox" name="$confirm_field" value="$confirm_value" required>
I confirm: send $count record(s) back to their source topics now.</label></p>
<p><button type="submit">Replay $count record(s)</button> <a href="$back">Cancel</a></p>
</form>
""")


def replay_confirm_page(frame: Frame, planned: Sequence[Any], skipped: Sequence[tuple[Any, str]],
                        problems: Sequence[str], csrf: str, limit: int) -> Html:
    """What a replay of the chosen dead letters would send (a dry run), and the form that sends it."""
    from streams.ops.records import text

    parts: list[Html] = []
    if problems:
        parts.append(notice("This replay is refused as a whole; nothing would be sent:", "error"))
        parts.append(problems_list(problems))
    elif not planned:
        parts.append(notice("Nothing to replay.", "warn"))
    else:
        rows = [(letter_position(d.partition, d.offset), text(d.key) or "-", d.reason or "-",
                 f"{d.source_topic}[{d.source_partition}]", d.replay_count + 1) for d in planned]
        parts.append(notice(
            "Each record goes back to its source topic and partition with its original key, value "
            "and headers (the dlq.* headers left out) and dlq.replay.count one higher. A record "
            f"that fails again is dead-lettered again with its count; at {limit} it is refused."))
        parts.append(table(("dead letter", "key", "reason", "goes to", "replay count"), rows,
                           css="planned"))
        hidden = join(render(Template('<input type="hidden" name="position" value="$v">\n'),
                             v=letter_position(d.partition, d.offset)) for d in planned)
        parts.append(render(CONFIRM_FORM, action=f"{ROOT}/dead-letters/replay", positions=hidden,
                            csrf_field=CSRF_FIELD, csrf=csrf, confirm_field=CONFIRM_FIELD,
                            confirm_value=CONFIRM_VALUE, count=len(planned),
                            back=f"{ROOT}/dead-letters"))
    for d, why in skipped:
        parts.append(notice(f"left out {letter_position(d.partition, d.offset)}: {why}", "warn"))
    return page(frame, "Replay dead letters: confirm", join(parts))


def replay_result_page(frame: Frame, replayed: Sequence[Any], seconds: float,
                       problems: Sequence[str] = ()) -> Html:
    """What a replay sent (:class:`streams.ops.dlq.Replayed` each), or why it sent nothing."""
    parts: list[Html] = []
    if problems:
        parts.append(notice("Replay refused; nothing was sent:", "error"))
        parts.append(problems_list(problems))
    else:
        parts.append(notice(f"Replayed {len(replayed)} record(s) in {seconds:.2f} s.", "ok"))
        rows = [(letter_position(r.partition, r.offset), f"{r.source_topic}[{r.to_partition}]",
                 r.to_offset, r.replay_count) for r in replayed]
        parts.append(table(("dead letter", "sent to", "at offset", "replay count"), rows,
                           css="replayed"))
    parts.append(render(Template('<p><a href="$url">Back to the dead letters</a></p>\n'),
                        url=f"{ROOT}/dead-letters"))
    return page(frame, "Replay result", join(parts))


# ----------------------------------------------------------------------
# Lookup


LOOKUP_FORM = Template("""<form class="lookup" method="get" action="$action">
<label>what <select name="kind">$options</select></label>
<label>id <input name="id" value="$id" size="40" required></label>
<button type="submit">Look up</button>
</form>
""")


def lookup_page(frame: Frame, kinds: Mapping[str, str], kind: str, ident: str,
                status: int | None = None, answer: Any = None) -> Html:
    """The lookup form, and the API's answer for ``kind``/``ident`` when one was asked."""
    options = join(
        render(Template('<option value="$v"$sel>$label</option>'), v=value, label=label,
               sel=Html(" selected") if value == kind else Html(""))
        for value, label in kinds.items())
    parts = [render(LOOKUP_FORM, action=f"{ROOT}/lookup", options=options, id=ident)]
    if status is not None:
        label = kinds.get(kind, kind)
        if status == 200 and isinstance(answer, Mapping):
            parts.append(render(Template("<h2>$what $id</h2>\n"), what=label, id=ident))
            facts = [(k, _field(k, v)) for k, v in sorted(redact(answer).items())]
            parts.append(table(("field", "value"), facts, css="facts"))
        else:
            message = answer.get("message") if isinstance(answer, Mapping) else None
            code = answer.get("error") if isinstance(answer, Mapping) else None
            kind_css = "warn" if status in (404, 503) else "error"
            parts.append(notice(f"{status} {code or ''}: {message or answer}", kind_css))
    return page(frame, "Lookup", join(parts))


def _field(name: str, value: Any) -> Any:
    """A view's field for a table cell: structures as JSON, epoch-ms times with their date."""
    if isinstance(value, Mapping | list):
        return pre(pretty(value))
    if name.endswith("_ms") and isinstance(value, int) and not isinstance(value, bool) \
            and 10**11 < value < 10**14:
        return f"{value} ({when(value)})"
    return "-" if value is None else value


def error_page(frame: Frame, title: str, message: str) -> Html:
    return page(frame, title, notice(message, "error"))


STYLE = """\
body { font-family: system-ui, sans-serif; margin: 0; color: #1d232a; background: #f6f7f9; }
header { display: flex; gap: 1.5rem; align-items: baseline; padding: .6rem 1.2rem;
         background: #1d2b3a; color: #fff; }
header a { color: #cfe3ff; text-decoration: none; margin-right: 1rem; }
header .brand { font-weight: 600; }
header .where { margin-left: auto; font-size: .85rem; color: #b9c4cf; }
main { padding: 1rem 1.2rem 3rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 1.6rem; } h3 { font-size: 1rem; }
table { border-collapse: collapse; background: #fff; margin: .4rem 0; }
th, td { border: 1px solid #d9dde3; padding: .25rem .5rem; text-align: left; vertical-align: top;
         font-size: .9rem; }
td { font-family: ui-monospace, monospace; word-break: break-all; max-width: 40rem; }
pre { background: #fff; border: 1px solid #d9dde3; padding: .6rem; overflow: auto;
      max-height: 30rem; white-space: pre-wrap; word-break: break-all; }
p.note { color: #41505f; } p.ok { color: #0b6b2f; font-weight: 600; }
p.warn { color: #8a5300; } p.error, ul.error { color: #a4161a; font-weight: 600; }
form { margin: .6rem 0; } label { margin-right: .8rem; }
a.button, button { background: #1f5fbf; color: #fff; border: 0; padding: .35rem .8rem;
                   border-radius: 3px; text-decoration: none; cursor: pointer; font-size: .9rem; }
"""
