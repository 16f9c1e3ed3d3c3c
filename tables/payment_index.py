"""The user -> payments index, and ``handle_wallet_balance_changed`` it serves.

``wallet.balance_changed`` is keyed by user; the payments are keyed by their
order.  This aggregate, keyed by user, keeps a summary of each of the user's
payments (fed by the payment rows' index updates, :mod:`tables.summary_index`)
and turns a balance that rose into ``retry`` commands for the payments that
failed for want of funds.  The kernel publishes the commands and waits for
their acks before it writes the row with the event's id, and each command's
id is derived from the event, so a replayed event re-sends the same commands,
which the payment rows recognise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streams.catalog import PAYMENT_COMMANDS, PAYMENT_SERVICE, USER_PAYMENT_INDEX
from tables import aggregate, summary_index
from tables.aggregate import DUPLICATE, Decision, Flow, Send, Step


def retryable_payments(row: Mapping[str, Any] | None) -> list[str]:
    """The orders whose payment a top-up may now pay (failed for want of funds)."""
    return [s["order_id"] for s in summary_index.summaries(row) if s.get("retryable")]


def handle_wallet_balance_changed(row: dict[str, Any] | None, event: Mapping[str, Any],
                                  now_ms: int) -> Decision:
    """wallet.balance_changed: a balance that rose retries the user's unfunded payments."""
    if summary_index.seen(row, event):
        return DUPLICATE
    delta = event.get("delta_amount")
    targets = retryable_payments(row) if isinstance(delta, int) and delta > 0 else []
    sends = tuple(
        Send(PAYMENT_COMMANDS, order_id,
             aggregate.command("retry", "order_id", order_id, cause=event, now_ms=now_ms))
        for order_id in targets
    )
    return Decision(row=summary_index.applied(row, event["event_id"]), send=sends)


USER_PAYMENTS = Flow(
    name="user-payments",
    producer=PAYMENT_SERVICE,
    key_field="user_id",
    steps=(
        Step(USER_PAYMENT_INDEX, "merge_index_update", summary_index.merge),
        Step("wallet.balance_changed", "handle_wallet_balance_changed",
             handle_wallet_balance_changed, sends=(PAYMENT_COMMANDS,)),
    ),
    load=summary_index.load,
    dump=summary_index.dump,
)
