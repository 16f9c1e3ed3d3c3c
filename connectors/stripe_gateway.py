"""The Stripe adapter: the one place paystream calls Stripe's API.

:class:`StripeGateway` wraps stripe-python's ``StripeClient`` (async methods on
the aiohttp transport, which is a runtime dependency) and is the kernel's
``"stripe"`` service: :meth:`StripeGateway.call` takes a
:class:`tables.aggregate.Call`, runs its operation under the call's
idempotency key and answers a plain JSON-able dict.  Stripe stores the first
answer to a key for 24 hours and replays it for a retry with the same
parameters, so a batch the kernel replays after a crash repeats the call
without moving money twice.

Errors come out in three kinds, because the kernel acts on three kinds:

- a definitive "no" (a declined card, a request Stripe refuses: an unknown
  intent, a refund of a failed payment, a cancel of a succeeded intent, a key
  reused with other parameters) raises :class:`streams.kernel.CallRefused`
  with Stripe's machine-readable code; the decision gets it as
  ``Outcome.code`` and records the refusal;
- Stripe unreachable, slow, rate-limiting or failing (5xx, 409 lock
  conflicts) raises :class:`StripeUnavailable` (``retriable = True``): the
  kernel holds the batch back and retries it, under the same keys;
- a key Stripe does not accept raises :class:`StripeCredentialsRejected`,
  also retriable: a rotated or revoked key is the operator's problem, not the
  payment's, so the batch waits (logged at every retry) until the key is fixed
  instead of dead-lettering payments that would have gone through.  A key that
  is missing or not a secret key fails at construction with
  :class:`StripeConfigError`, so a worker does not start without one.

Logs name the operation, the idempotency key, object ids, statuses and
amounts; never the API key, a client secret or card details.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import stripe

from streams import metrics
from streams.kernel import CallRefused
from streams.settings import Settings
from tables.aggregate import Call
from tables.stripe_objects import invoice_view, subscription_view

log = logging.getLogger(__name__)

#: The host of Stripe's own API.  Any other API base is a stand-in
#: (localstripe), which refuses the optional parameters listed below.
STRIPE_API_HOST = "api.stripe.com"

#: Stripe's values for a refund's ``reason`` and a cancel's
#: ``cancellation_reason``; anything else stays in metadata only.
REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})

#: Statuses of a subscription that has ended (a cancel has nothing to do).
ENDED_SUBSCRIPTION_STATUSES = frozenset({"canceled", "incomplete_expired", "ended"})
CANCELLATION_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer", "abandoned"})


class StripeConfigError(RuntimeError):
    """Stripe is not configured (no key, a publishable key, a malformed API base)."""

    retriable = False


class StripeCredentialsRejected(StripeConfigError):
    """Stripe refused the key (401/403): retried, see the module docstring."""

    retriable = True


class StripeUnavailable(Exception):
    """Stripe could not answer now (network, timeout, 429, 409, 5xx): the kernel retries."""

    retriable = True

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def classify(error: stripe.StripeError, operation: str) -> Exception:
    """The exception the kernel should see for a Stripe library error.

    Pure, so the rules are unit-tested on their own:

    - ``CardError`` (402): :class:`CallRefused`, code = Stripe's
      ``decline_code`` when it gives one (``insufficient_funds``), else its
      ``code`` (``card_declined``);
    - ``InvalidRequestError``, ``IdempotencyError`` and any other 4xx but 409
      and 429: :class:`CallRefused`, code = Stripe's ``code``
      (``payment_intent_unexpected_state``, ``resource_missing``), else the
      error's ``type`` (localstripe answers most refusals without a code, as
      ``invalid_request_error``);
    - ``AuthenticationError``/``PermissionError``: :class:`StripeCredentialsRejected`;
    - ``APIConnectionError`` (network, timeout), ``RateLimitError``, 409, 5xx
      and errors without a status: :class:`StripeUnavailable`.
    """
    status = error.http_status
    message = error.user_message or type(error).__name__
    if isinstance(error, stripe.AuthenticationError | stripe.PermissionError):
        return StripeCredentialsRejected(
            f"Stripe refused the API key for {operation} (HTTP {status}): check STRIPE_API_KEY")
    if isinstance(error, stripe.APIConnectionError | stripe.RateLimitError):
        return StripeUnavailable(f"Stripe {operation}: {type(error).__name__}: {message}", status=status)
    if isinstance(error, stripe.CardError):
        code = _error_field(error, "decline_code") or error.code or "card_declined"
        return CallRefused(f"Stripe {operation}: {message}", code=code)
    if isinstance(error, stripe.IdempotencyError):
        return CallRefused(f"Stripe {operation}: {message}", code="idempotency_error")
    if status is not None and 400 <= status < 500 and status not in (409, 429):
        code = error.code or _error_field(error, "type") or f"http_{status}"
        return CallRefused(f"Stripe {operation}: {message}", code=code)
    return StripeUnavailable(f"Stripe {operation}: {type(error).__name__} (HTTP {status}): {message}",
                             status=status)


def _error_field(error: stripe.StripeError, name: str) -> str | None:
    body = error.json_body if isinstance(error.json_body, dict) else {}
    detail = body.get("error")
    value = detail.get(name) if isinstance(detail, dict) else None
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    """How one gateway talks to Stripe (:meth:`StripeGateway.from_settings` fills it)."""

    api_key: str = field(repr=False)
    api_base: str
    max_network_retries: int = 2
    timeout_seconds: float = 20.0
    #: Send the optional ``reason``/``cancellation_reason`` parameters.
    #: Stripe takes them; localstripe answers 400 "Unexpected ..." to both.
    send_reasons: bool = True
    #: The API base is a stand-in (localstripe), not Stripe: the subscription
    #: and invoice operations leave out what it does not know (it answers 500
    #: to an unknown parameter of an update or of ``POST /v1/invoices``) and
    #: use the older form it knows; each operation says where.
    stand_in: bool = False


class StripeGateway:
    """The kernel's Stripe service: ``await gateway.call(Call(...))`` -> dict.

    Operations (``Call.operation``) and what they answer:

    - ``create_payment_intent`` {amount, currency, metadata, customer?,
      payment_method?, confirm?, off_session?} -> :meth:`intent_view`;
    - ``retrieve_payment_intent`` {payment_intent_id} -> :meth:`intent_view`;
    - ``confirm_payment_intent`` {payment_intent_id, payment_method?} ->
      :meth:`intent_view`; the payment method is set by an update first and
      the confirm carries no parameters (localstripe answers 500 to a confirm
      with ``payment_method``; Stripe takes both forms);
    - ``cancel_payment_intent`` {payment_intent_id, cancellation_reason?} ->
      {id, status}; the reason is sent only to Stripe itself and only when
      it is one of Stripe's values;
    - ``create_refund`` {payment_intent_id (or payment_intent) | charge,
      amount?, reason?, metadata} -> {id, status, amount, currency,
      payment_intent, charge}; the intent wins when both are given;
      ``reason`` is always kept in the refund's metadata and also sent as
      Stripe's ``reason`` when it is one of Stripe's values (and not to a
      stand-in).

    Subscriptions and invoices (answers are
    :func:`tables.stripe_objects.subscription_view` / ``invoice_view``):

    - ``create_customer`` {user_id, email?} -> {customer_id};
    - ``attach_payment_method`` {customer_id, payment_method} -> {customer_id,
      payment_method}: attached, and made the customer's
      ``invoice_settings.default_payment_method`` (``payment_method`` in the
      answer is the attached one's id: attaching a test token such as
      ``pm_card_visa`` makes a new payment method);
    - ``create_subscription`` {customer_id, plan_id, quantity?, metadata,
      trial_period_days?}, ``retrieve_subscription`` {subscription_id},
      ``update_subscription`` {subscription_id, plan_id?, quantity?,
      proration_behavior?, cancel_at_period_end?, metadata?},
      ``cancel_subscription`` {subscription_id, prorate?, invoice_now?};
    - ``create_invoice_item`` {customer_id, subscription_id?, amount,
      currency, description, metadata?} -> {invoice_item_id};
    - ``create_invoice`` {customer_id, subscription_id?, metadata?,
      days_until_due?}, ``retrieve_invoice`` {invoice_id},
      ``latest_paid_invoice`` {subscription_id} (``{}`` when none).

    Every call sends ``Call.idempotency_key`` as Stripe's ``Idempotency-Key``
    on every POST it makes; an operation of several requests derives one key
    per request from it (the key with ``:<step>`` appended), so each of them
    is repeatable.  GET and DELETE requests are idempotent by themselves (and
    Stripe ignores keys on them).
    """

    def __init__(self, options: GatewayOptions) -> None:
        key = options.api_key.strip()
        if not key:
            raise StripeConfigError("STRIPE_API_KEY is not set")
        if not key.startswith(("sk_", "rk_")):
            kind = "a publishable key" if key.startswith("pk_") else "not a Stripe secret key"
            raise StripeConfigError(f"STRIPE_API_KEY is {kind} (it must start with sk_ or rk_)")
        base = urlsplit(options.api_base)
        if base.scheme not in ("http", "https") or not base.netloc:
            raise StripeConfigError(f"STRIPE_API_BASE={options.api_base!r} is not an http(s) URL")
        if options.max_network_retries < 0 or options.timeout_seconds <= 0:
            raise StripeConfigError("STRIPE_MAX_NETWORK_RETRIES must be >= 0 and STRIPE_TIMEOUT_SECONDS > 0")
        self.options = options
        self._http = stripe.AIOHTTPClient(timeout=aiohttp.ClientTimeout(total=options.timeout_seconds))
        self._client = stripe.StripeClient(
            key,
            http_client=self._http,
            base_addresses={"api": options.api_base.rstrip("/")},
            max_network_retries=options.max_network_retries,
        )
        self._operations = {
            "create_payment_intent": self.create_payment_intent,
            "retrieve_payment_intent": self.retrieve_payment_intent,
            "confirm_payment_intent": self.confirm_payment_intent,
            "update_payment_intent": self.update_payment_intent,
            "cancel_payment_intent": self.cancel_payment_intent,
            "create_refund": self.create_refund,
            "create_customer": self.create_customer,
            "attach_payment_method": self.attach_payment_method,
            "create_subscription": self.create_subscription,
            "retrieve_subscription": self.retrieve_subscription,
            "update_subscription": self.update_subscription,
            "cancel_subscription": self.cancel_subscription,
            "create_invoice_item": self.create_invoice_item,
            "create_invoice": self.create_invoice,
            "retrieve_invoice": self.retrieve_invoice,
            "latest_paid_invoice": self.latest_paid_invoice,
        }

    @classmethod
    def from_settings(cls, settings: Settings) -> StripeGateway:
        """A gateway on ``STRIPE_API_KEY``/``STRIPE_API_BASE`` and the retry and timeout settings."""
        return cls(GatewayOptions(
            api_key=settings.stripe_api_key,
            api_base=settings.stripe_api_base,
            max_network_retries=settings.stripe_max_network_retries,
            timeout_seconds=settings.stripe_timeout_seconds,
            send_reasons=urlsplit(settings.stripe_api_base).hostname == STRIPE_API_HOST,
            stand_in=urlsplit(settings.stripe_api_base).hostname != STRIPE_API_HOST,
        ))

    @property
    def operations(self) -> frozenset[str]:
        return frozenset(self._operations)

    async def close(self) -> None:
        """Close the HTTP session (idempotent)."""
        await self._http.close_async()

    async def __aenter__(self) -> StripeGateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(self, call: Call) -> dict[str, Any]:
        """Run ``call.operation`` under ``call.idempotency_key`` (the kernel's service signature)."""
        operation = self._operations.get(call.operation)
        if operation is None:
            raise CallRefused(f"Stripe has no operation {call.operation!r}", code="unknown_operation")
        if not call.idempotency_key:
            raise CallRefused(f"Stripe {call.operation}: an idempotency key is required",
                              code="missing_idempotency_key")
        return await operation(call.args, call.idempotency_key)

    # ------------------------------------------------------------------
    # Operations

    async def create_payment_intent(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            "amount": int(_required(args, "amount")),
            "currency": str(_required(args, "currency")).lower(),
            "metadata": _metadata(args.get("metadata")),
        }
        for name in ("customer", "payment_method"):
            if args.get(name):
                params[name] = str(args[name])
        for name in ("confirm", "off_session"):
            if args.get(name) is not None:
                params[name] = bool(args[name])
        create = self._client.v1.payment_intents.create_async(params, {"idempotency_key": key})
        intent = await self._run("create_payment_intent", key, create)
        return self.intent_view(intent)

    async def retrieve_payment_intent(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        intent_id = str(_required(args, "payment_intent_id"))
        retrieve = self._client.v1.payment_intents.retrieve_async(intent_id)
        intent = await self._run("retrieve_payment_intent", key, retrieve)
        return self.intent_view(intent)

    async def confirm_payment_intent(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        intent_id = str(_required(args, "payment_intent_id"))
        intents = self._client.v1.payment_intents
        if args.get("payment_method"):
            await self._run("confirm_payment_intent", key, intents.update_async(
                intent_id, {"payment_method": str(args["payment_method"])},
                {"idempotency_key": f"{key}:payment_method"}))
        intent = await self._run("confirm_payment_intent", key,
                                 intents.confirm_async(intent_id, options={"idempotency_key": key}))
        return self.intent_view(intent)

    async def update_payment_intent(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        """Bring an open intent's amount (and currency) in line with its order."""
        intent_id = str(_required(args, "payment_intent_id"))
        params: dict[str, Any] = {"amount": int(_required(args, "amount"))}
        if args.get("currency"):
            params["currency"] = str(args["currency"]).lower()
        intent = await self._run("update_payment_intent", key, self._client.v1.payment_intents.update_async(
            intent_id, params, {"idempotency_key": key}))
        return self.intent_view(intent)

    async def cancel_payment_intent(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        params: dict[str, Any] = {}
        reason = args.get("cancellation_reason")
        if self.options.send_reasons and reason in CANCELLATION_REASONS:
            params["cancellation_reason"] = reason
        intent = await self._run("cancel_payment_intent", key, self._client.v1.payment_intents.cancel_async(
            str(_required(args, "payment_intent_id")), params or None, {"idempotency_key": key}))
        return {"id": intent.id, "status": intent.status}

    async def create_refund(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        """Refund a payment, named by its PaymentIntent or, failing that, its Charge.

        An invoice is paid by an intent or (older API versions, localstripe)
        names its charge; Stripe takes either (localstripe refuses both at
        once, so only one is ever sent).
        """
        metadata = _metadata(args.get("metadata"))
        reason = args.get("reason")
        if reason:
            metadata.setdefault("reason", str(reason))
        intent_id = args.get("payment_intent_id") or args.get("payment_intent")
        params: dict[str, Any] = {"metadata": metadata}
        if intent_id:
            params["payment_intent"] = str(intent_id)
        elif args.get("charge"):
            params["charge"] = str(args["charge"])
        else:
            raise CallRefused("Stripe create_refund without a payment_intent_id or a charge",
                              code="missing_argument")
        if args.get("amount") is not None:
            params["amount"] = int(args["amount"])
        if self.options.send_reasons and reason in REFUND_REASONS:
            params["reason"] = reason
        refund = await self._run("create_refund", key,
                                 self._client.v1.refunds.create_async(params, {"idempotency_key": key}))
        return {
            "id": refund.id,
            "status": refund.status,
            "amount": refund.amount,
            "currency": refund.currency,
            "payment_intent": _id_of(_field(refund, "payment_intent")),
            "charge": _id_of(_field(refund, "charge")),
        }

    # -- customers, subscriptions, invoices ------------------------------

    async def create_customer(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        """A Stripe Customer for a user (``metadata.user_id``)."""
        params: dict[str, Any] = {"metadata": {"user_id": str(_required(args, "user_id"))}}
        if args.get("email"):
            params["email"] = str(args["email"])
        customer = await self._run("create_customer", key, self._client.v1.customers.create_async(
            params, {"idempotency_key": key}))
        return {"customer_id": customer.id}

    async def attach_payment_method(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        """Attach a payment method and make it the one the customer's invoices charge."""
        customer_id = str(_required(args, "customer_id"))
        method = str(_required(args, "payment_method"))
        attached = await self._run("attach_payment_method", key, self._client.v1.payment_methods.attach_async(
            method, {"customer": customer_id}, {"idempotency_key": key}))
        await self._run("attach_payment_method", key, self._client.v1.customers.update_async(
            customer_id, {"invoice_settings": {"default_payment_method": attached.id}},
            {"idempotency_key": f"{key}:default"}))
        return {"customer_id": customer_id, "payment_method": attached.id}

    async def create_subscription(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        """Subscribe a customer to one price (``items[0].plan``: Stripe takes a price id there too).

        The first invoice is charged to the customer's default payment method
        at once; a decline leaves the subscription ``incomplete`` (Stripe's
        default ``payment_behavior``), it is not a refusal.
        """
        item: dict[str, Any] = {"plan": str(_required(args, "plan_id"))}
        if args.get("quantity") is not None:
            item["quantity"] = int(args["quantity"])
        params: dict[str, Any] = {"customer": str(_required(args, "customer_id")), "items": [item],
                                  "metadata": _metadata(args.get("metadata"))}
        if args.get("trial_period_days") is not None:
            params["trial_period_days"] = int(args["trial_period_days"])
        subscription = await self._run("create_subscription", key, self._client.v1.subscriptions.create_async(
            params, {"idempotency_key": key}))
        return subscription_view(_as_dict(subscription))

    async def retrieve_subscription(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        subscription_id = str(_required(args, "subscription_id"))
        subscription = await self._run("retrieve_subscription", key,
                                       self._client.v1.subscriptions.retrieve_async(subscription_id))
        return subscription_view(_as_dict(subscription))

    async def update_subscription(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        """Change the plan or quantity (the one item keeps its id), the period-end cancel, metadata.

        A plan or quantity change reads the subscription first for its item
        id and sends ``items=[{id, plan, quantity}]`` (the current quantity
        when none is given: Stripe resets it to 1 on a price change
        otherwise), under the key with ``:<item id>`` appended, so a replay
        sends the same request under the same key.  localstripe replaces the
        item by a new one on a change (Stripe keeps it), so a replay there
        is a new request that changes nothing.  ``proration_behavior``
        (``create_prorations`` | ``none``) goes to Stripe as such and to a
        stand-in as the older ``prorate`` boolean; localstripe prorates a
        plan change by a pending "Unused time" invoice item of the whole
        last invoice either way, where Stripe credits the unused time only.
        Nothing to change: the subscription as it is.
        """
        subscription_id = str(_required(args, "subscription_id"))
        subscriptions = self._client.v1.subscriptions
        params: dict[str, Any] = {}
        request_key = key
        if args.get("plan_id") or args.get("quantity") is not None:
            current = _as_dict(await self._run("update_subscription", key,
                                               subscriptions.retrieve_async(subscription_id)))
            items = (current.get("items") or {}).get("data") or []
            if not items:
                raise CallRefused(f"Stripe update_subscription: {subscription_id} has no item",
                                  code="subscription_without_item")
            view = subscription_view(current)
            quantity = args.get("quantity")
            params["items"] = [{"id": items[0]["id"], "plan": str(args.get("plan_id") or view["plan_id"]),
                                "quantity": int(quantity if quantity is not None else view["quantity"])}]
            request_key = f"{key}:{items[0]['id']}"
        behavior = args.get("proration_behavior")
        if behavior is not None:
            if behavior not in ("create_prorations", "none"):
                raise CallRefused(f"Stripe update_subscription: proration_behavior {behavior!r}",
                                  code="invalid_argument")
            if self.options.stand_in:
                params["prorate"] = behavior == "create_prorations"
            else:
                params["proration_behavior"] = behavior
        if args.get("cancel_at_period_end") is not None:
            params["cancel_at_period_end"] = bool(args["cancel_at_period_end"])
        if args.get("metadata"):
            params["metadata"] = _metadata(args["metadata"])
        if not params:
            return await self.retrieve_subscription({"subscription_id": subscription_id}, key)
        updated = await self._run("update_subscription", key, subscriptions.update_async(
            subscription_id, params, {"idempotency_key": request_key}))
        return subscription_view(_as_dict(updated))

    async def cancel_subscription(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        """End a subscription now; one that has ended already is answered as it is.

        ``prorate`` (credit the unused time) and ``invoice_now`` (a final
        invoice of pending items and prorations) are Stripe's cancel
        parameters; localstripe ignores both (it only marks the subscription
        canceled, no credit, no invoice).  The subscription is read first, so
        a replay after the cancel answers the canceled subscription instead
        of cancelling again (localstripe would send another
        ``customer.subscription.deleted``).
        """
        subscription_id = str(_required(args, "subscription_id"))
        subscriptions = self._client.v1.subscriptions
        current = _as_dict(await self._run("cancel_subscription", key,
                                           subscriptions.retrieve_async(subscription_id)))
        if current.get("status") in ENDED_SUBSCRIPTION_STATUSES:
            return subscription_view(current)
        params = {name: bool(args[name]) for name in ("prorate", "invoice_now") if args.get(name) is not None}
        canceled = await self._run("cancel_subscription", key, subscriptions.cancel_async(
            subscription_id, params or None, {"idempotency_key": key}))
        return subscription_view(_as_dict(canceled))

    async def create_invoice_item(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        """A pending invoice item: the next invoice of the customer (or subscription) takes it."""
        params: dict[str, Any] = {
            "customer": str(_required(args, "customer_id")),
            "amount": int(_required(args, "amount")),
            "currency": str(_required(args, "currency")).lower(),
            "description": str(_required(args, "description")),
            "metadata": _metadata(args.get("metadata")),
        }
        if args.get("subscription_id"):
            params["subscription"] = str(args["subscription_id"])
        item = await self._run("create_invoice_item", key, self._client.v1.invoice_items.create_async(
            params, {"idempotency_key": key}))
        return {"invoice_item_id": item.id}

    async def create_invoice(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        """Invoice the customer's pending items now and start collecting.

        Stripe: the invoice is created as a draft with the pending items
        (``pending_invoice_items_behavior=include``; of ``subscription_id``'s
        only, when given) and ``metadata``, finalized at once (key
        ``:finalize``), then either charged to the default payment method
        (``charge_automatically``, key ``:pay``; a decline leaves it
        ``open``, answered as such, with ``invoice.payment_failed`` to
        follow) or, with ``days_until_due``, sent to the customer
        (``send_invoice``; it is ``open`` with a ``due_date``).  An invoice
        with nothing due is ``paid`` at finalization and is not charged.

        A stand-in (localstripe 1.15.10) differs: it can invoice only a
        customer with an active subscription, and then bills the
        subscription's next period along with the pending items (Stripe
        bills the pending items only); it keeps no metadata of an invoice,
        has no finalize and no ``send_invoice`` (so no ``due_date``:
        ``days_until_due`` is not sent); its ``pay`` finalizes and charges in
        one request, and a decline there leaves the invoice ``open`` without
        an error.  A customer without a default payment method: the charge is
        refused (localstripe answers 404) and so is the call; the invoice
        stays a draft (Stripe's would stay ``open``).
        """
        params: dict[str, Any] = {"customer": str(_required(args, "customer_id")),
                                  "metadata": _metadata(args.get("metadata"))}
        if args.get("subscription_id"):
            params["subscription"] = str(args["subscription_id"])
        days = args.get("days_until_due")
        if not self.options.stand_in:
            params["pending_invoice_items_behavior"] = "include"
            params["auto_advance"] = True
            if days is not None:
                params.update(collection_method="send_invoice", days_until_due=int(days))
            else:
                params["collection_method"] = "charge_automatically"
        invoices = self._client.v1.invoices
        invoice = await self._run("create_invoice", key, invoices.create_async(
            params, {"idempotency_key": key}))
        if not self.options.stand_in:
            invoice = await self._run("create_invoice", key, invoices.finalize_invoice_async(
                invoice.id, None, {"idempotency_key": f"{key}:finalize"}))
            if days is not None or _field(invoice, "status") != "open":  # sent, or nothing due
                return invoice_view(_as_dict(invoice))
        try:
            invoice = await self._run("create_invoice", key, invoices.pay_async(
                invoice.id, None, {"idempotency_key": f"{key}:pay"}))
        except CallRefused as refused:
            if not isinstance(refused.__cause__, stripe.CardError):
                raise
            invoice = await self._run("create_invoice", key, invoices.retrieve_async(invoice.id))
        return invoice_view(_as_dict(invoice))

    async def retrieve_invoice(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        """An invoice (on Stripe with its ``payments`` expanded, for the payment ids)."""
        invoice_id = str(_required(args, "invoice_id"))
        invoice = await self._run("retrieve_invoice", key, self._client.v1.invoices.retrieve_async(
            invoice_id, self._expand("payments")))
        return invoice_view(_as_dict(invoice))

    async def latest_paid_invoice(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        """The subscription's newest ``paid`` invoice (by ``created``), or ``{}`` when it has none.

        Reads the newest 100 invoices of the subscription (the status is
        filtered here: localstripe's list takes no ``status``).
        """
        subscription_id = str(_required(args, "subscription_id"))
        listed = await self._run("latest_paid_invoice", key, self._client.v1.invoices.list_async(
            {"subscription": subscription_id, "limit": 100, **self._expand("data.payments")}))
        paid = [invoice_view(_as_dict(i)) for i in listed.data if _field(i, "status") == "paid"]
        if not paid:
            return {}
        return max(paid, key=lambda view: view["created"])

    def _expand(self, path: str) -> dict[str, Any]:
        """``{"expand": [path]}`` for Stripe; nothing for a stand-in (localstripe answers 400)."""
        return {} if self.options.stand_in else {"expand": [path]}

    @staticmethod
    def intent_view(intent: Any) -> dict[str, Any]:
        """The part of a PaymentIntent the payment flow uses, as plain JSON.

        ``latest_charge`` is an id (localstripe inlines the whole charge);
        ``last_payment_error`` is the decline's code (``decline_code`` when
        Stripe gives one), or None.
        """
        error = _field(intent, "last_payment_error")
        error_code = None
        if error is not None:
            error_code = _field(error, "decline_code") or _field(error, "code")
        return {
            "id": intent.id,
            "status": intent.status,
            "amount": int(intent.amount),  # localstripe answers an updated amount as text
            "currency": intent.currency,
            "client_secret": _field(intent, "client_secret"),
            "latest_charge": _id_of(_field(intent, "latest_charge")),
            "last_payment_error": error_code,
        }

    # ------------------------------------------------------------------

    async def _run(self, operation: str, key: str, request: Any) -> Any:
        """Await one Stripe request; count it (``paystream_stripe_requests_total``) by outcome:
        ok, refused (:class:`CallRefused`), unavailable, error (credentials)."""
        began = time.perf_counter()
        try:
            result = await request
        except stripe.StripeError as error:
            translated = classify(error, operation)
            log.info("stripe %s key=%s -> %s (HTTP %s, code %s)", operation, key,
                     type(translated).__name__, error.http_status, getattr(translated, "code", None))
            outcome = ("refused" if isinstance(translated, CallRefused) else
                       "unavailable" if isinstance(translated, StripeUnavailable) else "error")
            metrics.observe_stripe(operation, outcome, time.perf_counter() - began)
            raise translated from error
        except TimeoutError as error:  # a timeout while reading the body, after the request
            log.info("stripe %s key=%s -> timeout", operation, key)
            metrics.observe_stripe(operation, "unavailable", time.perf_counter() - began)
            raise StripeUnavailable(f"Stripe {operation}: timed out") from error
        except aiohttp.ClientError as error:
            log.info("stripe %s key=%s -> %s", operation, key, type(error).__name__)
            metrics.observe_stripe(operation, "unavailable", time.perf_counter() - began)
            raise StripeUnavailable(f"Stripe {operation}: {type(error).__name__}") from error
        metrics.observe_stripe(operation, "ok", time.perf_counter() - began)
        log.debug("stripe %s key=%s -> %s %s", operation, key, _field(result, "id"), _field(result, "status"))
        return result


def _required(args: Mapping[str, Any], name: str) -> Any:
    """``args[name]``; a call without it is refused (a bug in the decision, not in Stripe)."""
    value = args.get(name)
    if value is None or value == "":
        raise CallRefused(f"Stripe call without argument {name!r}", code="missing_argument")
    return value


def _metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Stripe metadata: string keys and values; None values are left out."""
    return {str(k): str(v) for k, v in (metadata or {}).items() if v is not None}


def _field(obj: Any, name: str) -> Any:
    """``obj[name]`` for a StripeObject or a dict, None when absent."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    try:
        return obj[name]
    except KeyError:
        return None


def _as_dict(obj: Any) -> dict[str, Any]:
    """A StripeObject (or a dict) as plain JSON values, for :mod:`tables.stripe_objects`."""
    if isinstance(obj, Mapping) and not isinstance(obj, stripe.StripeObject):
        return dict(obj)
    return obj.to_dict()


def _id_of(value: Any) -> str | None:
    """An object's id whether Stripe sent the id or the expanded object."""
    if value is None or isinstance(value, str):
        return value
    return _field(value, "id")
