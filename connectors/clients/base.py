"""The one HTTP client base of the service clients: pooled session, timeouts, retries, breaker, errors.

Every service client (:mod:`connectors.clients`) is a :class:`BaseClient`
subclass naming its service; its methods build a request model of
:mod:`connectors.clients.spec` and hand it to :meth:`BaseClient.request`,
which does the rest, the same way for every service:

- **one session per process**: a :class:`SessionPool` owns one
  ``aiohttp.ClientSession`` (one connection pool, keep-alive) that is opened
  at start and closed at stop; clients only borrow it, no call builds one;
- **a timeout per attempt** (``ClientOptions.timeout_seconds``) covering
  connect, send and reading the whole answer;
- **retries only where repeating is safe**: a GET (``Endpoint.idempotent``)
  or a POST that carries its ``Idempotency-Key`` is retried after a
  transient failure (a connection error, a timeout, 5xx, 408, 429), at most
  ``max_attempts`` attempts in all, sleeping a jittered exponential backoff
  between them (``Retry-After`` is honoured up to ``backoff_max_seconds``);
  every attempt of a keyed POST carries the same key, so the service does the
  work once.  A POST the spec marks ``needs_key`` cannot be sent without one
  (``ValueError`` before anything is sent);
- **a circuit breaker per service** (:class:`CircuitBreaker`), shared by
  every method of that service: after ``breaker_failures`` consecutive
  failed attempts it opens and calls fail at once with
  :class:`ServiceUnavailable`; after ``breaker_cooldown_seconds`` one probe
  goes through (half-open); its success closes the breaker, its failure
  opens it for another cool-down.  An answer of any status below 500 (a 404,
  a refusal) is a working service and counts as a success;
- **typed errors**: :class:`NotFound` (404), :class:`Rejected` (any other
  4xx but 408/429: a definitive refusal with the service's error ``code``,
  never retried), :class:`ServiceUnavailable` (``retriable = True``: what is
  left after the retries, timeouts, refused connections, an open breaker, an
  answer that does not fit the spec), all :class:`ServiceError`;
- **logs** carry service, method, status, duration, attempt and the
  idempotency key (as ``extra`` fields and in the message); never bodies,
  query strings, filled-in paths (they hold user ids), or headers;
- :meth:`BaseClient.call` makes a client a kernel service
  (``streams.kernel.Service``): ``NotFound``/``Rejected`` become
  ``CallRefused`` with the service's code, ``ServiceUnavailable`` propagates
  (``streams.kernel.transient`` says transient: the batch is retried).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp

from connectors.clients.spec import (
    IDEMPOTENCY_HEADER,
    Endpoint,
    ErrorBody,
    Model,
    SpecError,
    endpoints_of,
    query_text,
)
from streams import metrics
from streams.kernel import CallRefused
from tables.aggregate import Call

log = logging.getLogger("paystream.clients")


# ----------------------------------------------------------------------
# Errors


class ServiceError(Exception):
    """A service call that did not give an answer of the spec's shape."""

    retriable: ClassVar[bool] = False

    def __init__(self, message: str, *, service: str, method: str, status: int | None = None,
                 code: str | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.service = service
        self.method = method
        self.status = status
        self.code = code
        self.attempts = attempts


class NotFound(ServiceError):
    """404: the thing asked about does not exist (``code`` e.g. "user_not_found")."""


class Rejected(ServiceError):
    """A definitive 4xx refusal (``code`` e.g. "insufficient_funds"); never retried."""


class ServiceUnavailable(ServiceError):
    """The service could not answer now (after the retries); transient for the kernel.

    ``retry_after`` (seconds, or None) is a hint for an API answering 503:
    what is left of an open breaker's cool-down, or the service's own
    ``Retry-After``.
    """

    retriable: ClassVar[bool] = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class BadResponse(ServiceUnavailable):
    """A success status whose body is not what the spec says (not JSON, a missing field)."""


# ----------------------------------------------------------------------
# Options, breaker, pool


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """How every client behaves; one instance is shared by the clients of a process."""

    #: Per attempt: connect, send, and read the whole answer.
    timeout_seconds: float = 2.0
    #: Attempts of a retriable call, the first included (1 = no retry).
    max_attempts: int = 3
    #: Backoff before retry n (1-based) is uniform in [0, min(max, base * 2**(n-1))].
    backoff_base_seconds: float = 0.05
    backoff_max_seconds: float = 1.0
    #: Consecutive failed attempts that open a service's breaker.
    breaker_failures: int = 5
    #: How long an open breaker refuses calls before it lets one probe through.
    breaker_cooldown_seconds: float = 5.0
    #: Connections of the pool, in all and per service host.
    pool_limit: int = 100
    pool_limit_per_host: int = 32

    def __post_init__(self) -> None:
        if self.timeout_seconds <= 0 or self.max_attempts < 1 or self.breaker_failures < 1:
            raise ValueError("ClientOptions: timeout_seconds > 0, max_attempts >= 1 and "
                             "breaker_failures >= 1 are required")
        if self.backoff_base_seconds < 0 or self.backoff_max_seconds < 0 or self.breaker_cooldown_seconds < 0:
            raise ValueError("ClientOptions: backoff and cool-down must not be negative")


class CircuitBreaker:
    """One service's breaker: closed -> open (N consecutive failures) -> half-open probe -> closed.

    Single-threaded (one event loop); ``clock`` is injectable for tests.
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __init__(self, service: str, failures: int, cooldown_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.failures_to_open = failures
        self.cooldown_seconds = cooldown_seconds
        self._clock = clock
        self._state = self.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        metrics.track_breaker(self)  # paystream_client_breaker_state, read at scrape time

    @property
    def state(self) -> str:
        """The state as a caller would find it now (an open breaker past its cool-down is half-open)."""
        if self._state == self.OPEN and self._clock() - self._opened_at >= self.cooldown_seconds:
            return self.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def admit(self) -> bool:
        """Whether an attempt may go out now; a True in half-open makes the caller the probe."""
        if self._state == self.CLOSED:
            return True
        if self._state == self.OPEN:
            if self._clock() - self._opened_at < self.cooldown_seconds:
                return False
            self._state = self.HALF_OPEN
            log.info("breaker %s: half-open, probing", self.service,
                     extra={"service": self.service, "breaker": self.HALF_OPEN})
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        if self._state != self.CLOSED:
            log.info("breaker %s: closed", self.service,
                     extra={"service": self.service, "breaker": self.CLOSED})
        self._state = self.CLOSED
        self._failures = 0
        self._probing = False

    def failure(self) -> None:
        self._failures += 1
        if self._state == self.HALF_OPEN or self._failures >= self.failures_to_open:
            if self._state != self.OPEN:
                log.warning("breaker %s: open after %d consecutive failures", self.service, self._failures,
                            extra={"service": self.service, "breaker": self.OPEN})
            self._state = self.OPEN
            self._opened_at = self._clock()
        self._probing = False

    def remaining_cooldown(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it would now)."""
        if self._state != self.OPEN:
            return 0.0
        return max(0.0, self.cooldown_seconds - (self._clock() - self._opened_at))

    def abandon(self) -> None:
        """An admitted attempt ended without a verdict (cancelled): let another probe go."""
        self._probing = False


class SessionPool:
    """Owns the process's one ``aiohttp.ClientSession`` for the service clients.

    :meth:`start` opens it (idempotent), :meth:`close` closes it.  A session
    handed in (``session=``) is used as is and left open by :meth:`close`.
    """

    def __init__(self, options: ClientOptions | None = None, *,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.options = options or ClientOptions()
        self._session = session
        self._owned = session is None

    async def start(self) -> None:
        if self._session is None or (self._owned and self._session.closed):
            connector = aiohttp.TCPConnector(limit=self.options.pool_limit,
                                             limit_per_host=self.options.pool_limit_per_host)
            # The timeout is applied per attempt (BaseClient), not per session.
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                headers={"User-Agent": "paystream-clients"}, raise_for_status=False)
            self._owned = True

    async def close(self) -> None:
        if self._session is not None and self._owned and not self._session.closed:
            await self._session.close()

    @property
    def started(self) -> bool:
        return self._session is not None and not self._session.closed

    @property
    def session(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            raise RuntimeError("service clients are not started (ServiceClients.start() at app start)")
        return session


# ----------------------------------------------------------------------
# The base client


class BaseClient:
    """A service's client; subclasses set :attr:`service` and add one method per spec endpoint."""

    service: ClassVar[str] = ""

    def __init__(self, base_url: str, pool: SessionPool, *, options: ClientOptions | None = None,
                 breaker: CircuitBreaker | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"{self.service} service URL {base_url!r} is not an http(s) URL")
        self.base_url = base_url.rstrip("/")
        self.pool = pool
        self.options = options or pool.options
        self.breaker = breaker or CircuitBreaker(self.service, self.options.breaker_failures,
                                                 self.options.breaker_cooldown_seconds)
        self.endpoints: dict[str, Endpoint] = {e.method_name: e for e in endpoints_of(self.service)}
        self._path_params = {e.method_name: e.path_params for e in self.endpoints.values()}

    # -- the kernel's service signature ---------------------------------

    async def call(self, call: Call) -> dict[str, Any]:
        """Run ``call.operation`` (a spec method name) with ``call.args``; answer the response as JSON.

        The call's idempotency key is sent with the methods that need one.
        ``NotFound``/``Rejected`` raise ``CallRefused`` (code = the service's
        code, else "not_found"/"http_<status>"); arguments that do not fit
        the spec raise ``CallRefused`` ("invalid_arguments"), a keyed method
        without a key ``CallRefused`` ("missing_idempotency_key");
        ``ServiceUnavailable`` propagates.
        """
        endpoint = self.endpoints.get(call.operation)
        if endpoint is None:
            raise CallRefused(f"{self.service} has no operation {call.operation!r}", code="unknown_operation")
        if endpoint.needs_key and not call.idempotency_key:
            raise CallRefused(f"{self.service}.{call.operation}: an idempotency key is required",
                              code="missing_idempotency_key")
        try:
            request = endpoint.request.from_json(call.args, where=f"{self.service}.{call.operation}")
        except SpecError as error:
            raise CallRefused(str(error), code="invalid_arguments") from error
        key = call.idempotency_key if endpoint.needs_key else None
        try:
            answer = await self.request(endpoint.method_name, request, idempotency_key=key)
        except NotFound as error:
            raise CallRefused(str(error), code=error.code or "not_found") from error
        except Rejected as error:
            raise CallRefused(str(error), code=error.code or f"http_{error.status}") from error
        return answer.to_json()

    # -- one request -----------------------------------------------------

    async def request(self, method_name: str, request: Model, *, idempotency_key: str | None = None) -> Any:
        """Send ``request`` to ``method_name``'s endpoint; the response model, or a :class:`ServiceError`.

        Each call is counted once, with its outcome and its whole duration
        (retries and back-off included), in ``paystream_client_requests_total``
        and ``paystream_client_request_seconds`` (:mod:`streams.metrics`).
        """
        if method_name not in self.endpoints:
            raise KeyError(f"{self.service} has no method {method_name!r}")
        began = time.perf_counter()
        outcome = "error"
        try:
            answer = await self._attempts(method_name, request, idempotency_key)
            outcome = "ok"
            return answer
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except NotFound:
            outcome = "not_found"
            raise
        except Rejected:
            outcome = "rejected"
            raise
        except BadResponse:
            outcome = "bad_response"
            raise
        except ServiceUnavailable as error:
            outcome = "breaker_open" if error.code == "breaker_open" else "unavailable"
            raise
        finally:
            metrics.observe_client(self.service, method_name, outcome, time.perf_counter() - began)

    async def _attempts(self, method_name: str, request: Model, idempotency_key: str | None) -> Any:
        endpoint = self.endpoints[method_name]
        if endpoint.needs_key and not idempotency_key:
            raise ValueError(f"{self.service}.{method_name} needs an idempotency key derived from its cause")
        url, params, body = self._prepare(endpoint, request)
        headers = {IDEMPOTENCY_HEADER: idempotency_key} if idempotency_key else None
        retriable = endpoint.idempotent or bool(idempotency_key)
        attempts = self.options.max_attempts if retriable else 1
        timeout = self.options.timeout_seconds
        session = self.pool.session
        breaker = self.breaker
        attempt = 0
        while True:
            attempt += 1
            if not breaker.admit():
                self._log(logging.INFO, endpoint, "breaker_open", 0.0, attempt, idempotency_key)
                raise ServiceUnavailable(
                    f"{self.service}.{method_name}: circuit breaker open", service=self.service,
                    method=method_name, code="breaker_open", attempts=attempt - 1,
                    retry_after=breaker.remaining_cooldown())
            started = time.perf_counter()
            retry_after: float | None = None
            try:
                async with asyncio.timeout(timeout):
                    async with session.request(endpoint.http_method, url, params=params, json=body,
                                               headers=headers) as response:
                        status = response.status
                        data = await response.read()
                        if status >= 500 or status in (408, 429):
                            retry_after = _retry_after(response.headers.get("Retry-After"))
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                breaker.failure()
                elapsed = time.perf_counter() - started
                what = "timeout" if isinstance(error, TimeoutError) else type(error).__name__
                failure = ServiceUnavailable(
                    f"{self.service}.{method_name}: {what} (attempt {attempt})", service=self.service,
                    method=method_name, code="timeout" if what == "timeout" else "connection_error",
                    attempts=attempt)
                self._log(logging.INFO, endpoint, what, elapsed, attempt, idempotency_key)
            except BaseException:
                breaker.abandon()
                raise
            else:
                elapsed = time.perf_counter() - started
                if status < 400:
                    breaker.success()
                    if log.isEnabledFor(logging.DEBUG):
                        self._log(logging.DEBUG, endpoint, status, elapsed, attempt, idempotency_key)
                    return self._parse(endpoint, data, status, attempt)
                if status < 500 and status not in (408, 429):
                    breaker.success()
                    self._log(logging.INFO, endpoint, status, elapsed, attempt, idempotency_key)
                    raise self._refusal(endpoint, status, data, attempt)
                breaker.failure()
                code, message = _error_of(data)
                failure = ServiceUnavailable(
                    f"{self.service}.{method_name}: HTTP {status} {message} (attempt {attempt})",
                    service=self.service, method=method_name, status=status, code=code or f"http_{status}",
                    attempts=attempt, retry_after=retry_after)
                self._log(logging.INFO, endpoint, status, elapsed, attempt, idempotency_key)
            if attempt >= attempts:
                self._log(logging.WARNING, endpoint, "gave_up", 0.0, attempt, idempotency_key)
                raise failure
            await asyncio.sleep(self._backoff(attempt, retry_after))

    # -- helpers ---------------------------------------------------------

    def _prepare(self, endpoint: Endpoint, request: Model) -> tuple[str, dict[str, str] | None, Any]:
        values = request.to_json()
        path_params = self._path_params[endpoint.method_name]
        path = endpoint.path_template.format(
            **{name: quote(str(values.pop(name)), safe="") for name in path_params})
        url = self.base_url + path
        if endpoint.http_method == "GET":
            params = {name: query_text(v) for name, v in values.items() if v is not None}
            return url, params or None, None
        return url, None, values

    def _parse(self, endpoint: Endpoint, data: bytes, status: int, attempt: int) -> Model:
        try:
            return endpoint.response.from_json(json.loads(data))
        except (ValueError, SpecError) as error:  # JSONDecodeError is a ValueError
            raise BadResponse(f"{self.service}.{endpoint.method_name}: HTTP {status} answer does not fit "
                              f"the spec: {error}", service=self.service, method=endpoint.method_name,
                              status=status, code="bad_response", attempts=attempt) from error

    def _refusal(self, endpoint: Endpoint, status: int, data: bytes, attempt: int) -> ServiceError:
        code, message = _error_of(data)
        kind = NotFound if status == 404 else Rejected
        code = code or ("not_found" if status == 404 else f"http_{status}")
        return kind(f"{self.service}.{endpoint.method_name}: HTTP {status} {code}: {message}",
                    service=self.service, method=endpoint.method_name, status=status, code=code,
                    attempts=attempt)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        options = self.options
        ceiling = min(options.backoff_max_seconds, options.backoff_base_seconds * 2 ** (attempt - 1))
        delay = random.uniform(0.0, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.options.backoff_max_seconds))
        return delay

    def _log(self, level: int, endpoint: Endpoint, status: int | str, seconds: float, attempt: int,
             key: str | None) -> None:
        duration_ms = round(seconds * 1000, 2)
        log.log(level, "%s.%s %s %s -> %s in %.1f ms (attempt %d%s)", self.service, endpoint.method_name,
                endpoint.http_method, endpoint.path_template, status, duration_ms, attempt,
                f", key {key}" if key else "",
                extra={"service": self.service, "method": endpoint.method_name, "status": status,
                       "duration_ms": duration_ms, "attempt": attempt, "idempotency_key": key})


def _error_of(data: bytes) -> tuple[str | None, str]:
    """(code, message) of an error answer; (None, "") when it is not the spec's error shape."""
    try:
        detail = ErrorBody.from_json(json.loads(data)).error
    except (ValueError, SpecError):
        return None, ""
    return detail.code, detail.message


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: the jittered backoff applies
    return seconds if seconds >= 0 else None

