"""An index aggregate's row: summaries of other aggregates' rows, plus applied input ids.

Inbound events about "a user's orders" or "a user's payments" arrive keyed by
the user, not by the aggregates they act on.  An index aggregate keyed like
them holds a summary of each of those rows (fed by the rows' index updates,
``{"order": summary, "version": n}``, keyed by the summary's ``order_id``) and
the ids of the inbound events it applied, so a fan-out handler decides from
one row.  The order and payment indexes (:mod:`tables.order_index`,
:mod:`tables.payment_index`) share this row shape and its merge rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tables.aggregate import NOOP, Decision, Invalid

#: How many applied inbound event ids an index row remembers.  A user or a
#: subscription sees few such events; a redelivery older than this window is
#: still harmless, because the commands it would re-send carry derived ids
#: the target rows have applied.
MAX_APPLIED = 128

Row = dict[str, Any]


def load(stored: Mapping[str, Any]) -> Row:
    return {"orders": dict(stored.get("orders") or {}), "applied": list(stored.get("applied") or [])}


def dump(row: Row) -> Row:
    return row


def row_or_empty(row: Row | None) -> Row:
    return row if row is not None else {"orders": {}, "applied": []}


def summaries(row: Row | None) -> list[dict[str, Any]]:
    """The summaries of an index row, oldest first."""
    found = row_or_empty(row)["orders"].values()
    return sorted(found, key=lambda s: (s.get("created_at_ms") or 0, s["order_id"]))


def applied(row: Row | None, event_id: str) -> Row:
    """A copy of ``row`` that remembers ``event_id``."""
    current = row_or_empty(row)
    return {"orders": dict(current["orders"]),
            "applied": [*current["applied"], event_id][-MAX_APPLIED:]}


def seen(row: Row | None, event: Mapping[str, Any]) -> bool:
    return row is not None and event["event_id"] in row["applied"]


def merge(row: Row | None, update: Mapping[str, Any], now_ms: int) -> Decision:
    """A row's new summary: kept unless a newer one of the same row is there."""
    summary = update.get("order")
    version = update.get("version")
    if not isinstance(summary, Mapping) or not isinstance(summary.get("order_id"), str) \
            or not isinstance(version, int):
        raise Invalid("index update must carry a summary with an order_id and an integer version")
    current = row_or_empty(row)
    known = current["orders"].get(summary["order_id"])
    if known is not None and known.get("version", 0) > version:
        return NOOP  # an older summary arriving late
    orders = {**current["orders"], summary["order_id"]: {**summary, "version": version}}
    return Decision(row={"orders": orders, "applied": list(current["applied"])})
