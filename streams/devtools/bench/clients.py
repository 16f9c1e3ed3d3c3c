"""``paystream bench clients``: a call through our service client vs a bare aiohttp session call.

The server is the stand-ins (``python -m streams.devtools.standins``) in a
process of its own, on free ports.  The driver (this process) runs, for two
calls, phases of each side against the same stand-in in the same run:

* **get**: ``AccountClient.get_user("u-demo")`` vs ``session.get(url)`` +
  ``await response.json()``;
* **post**: ``WalletClient.add_credits(..., idempotency_key=<unique>)`` vs
  ``session.post(url, json=<the same body>, headers={"Idempotency-Key":
  <unique>})`` + ``await response.json()`` (the stand-in does the same work
  for both: a new key, a credit).

**ours** is the whole client path: the breaker check, the per-attempt
``asyncio.timeout``, building the URL from the spec, the session call, the
status check, parsing the answer into the spec's dataclass.  **bare** is an
``aiohttp.ClientSession`` with the same connector limits and no timeout.
Each phase is a closed loop of ``--concurrency`` calls in flight for
``--warmup`` then ``--duration`` seconds; ``--rounds`` rounds alternate the
order (bare ours, ours bare, ...) so a drift in the machine's load hits both.
Printed per call kind: calls/s (median of the rounds), mean latency, the
driver's CPU time per call (where the client's overhead shows), and
ours/bare calls/s (the aim is >= 0.9).  Asserts nothing about speed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from connectors.clients import ClientOptions, ServiceClients, spec
from streams.devtools.bench.common import cpu_seconds, free_port, machine_line, percentile
from streams.devtools.worker_process import ROOT
from streams.settings import Settings


@dataclasses.dataclass(frozen=True)
class ClientsOptions:
    duration: float = 5.0
    warmup: float = 1.0
    concurrency: int = 1
    rounds: int = 3


QUICK = {"duration": 1.5, "warmup": 0.5, "rounds": 2}


@dataclasses.dataclass
class Phase:
    kind: str
    side: str
    calls: int
    seconds: float
    cpu: float
    latencies_us: list[float]

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.calls * 1e6 if self.calls else float("nan")


Call = Callable[[], Awaitable[Any]]


async def _phase(kind: str, side: str, call: Call, options: ClientsOptions) -> Phase:
    latencies: list[float] = []
    measuring = False
    stop = time.perf_counter() + options.warmup + options.duration
    window_start = 0.0

    async def worker() -> None:
        while True:
            started = time.perf_counter()
            if started >= stop:
                return
            await call()
            if measuring:
                latencies.append((time.perf_counter() - started) * 1e6)

    workers = [asyncio.ensure_future(worker()) for _ in range(options.concurrency)]
    await asyncio.sleep(options.warmup)
    measuring = True
    window_start = time.perf_counter()
    cpu_before = cpu_seconds()
    await asyncio.gather(*workers)
    cpu = cpu_seconds() - cpu_before
    return Phase(kind, side, len(latencies), time.perf_counter() - window_start, cpu, latencies)


async def _drive(urls: dict[str, str], options: ClientsOptions) -> list[Phase]:
    keys = itertools.count()
    run = os.urandom(4).hex()
    user_url = urls["account"] + spec.endpoint("account", "get_user").path_template.format(user_id="u-demo")
    credit_url = urls["wallet"] + spec.endpoint("wallet", "add_credits").path_template.format(user_id="u-pro")
    body = {"user_id": "u-pro", "amount": 1, "currency": "EUR", "reason": "bench", "reference_id": None}
    pool = ClientOptions()
    connector = aiohttp.TCPConnector(limit=pool.pool_limit, limit_per_host=pool.pool_limit_per_host)
    phases: list[Phase] = []
    no_timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=no_timeout) as bare, \
            ServiceClients(Settings.from_env(), pool, urls=urls) as ours:

        async def bare_get() -> Any:
            async with bare.get(user_url) as response:
                if response.status != 200:
                    raise RuntimeError(f"bare get: HTTP {response.status}")
                return await response.json()

        async def bare_post() -> Any:
            headers = {spec.IDEMPOTENCY_HEADER: f"bench-{run}-{next(keys)}"}
            async with bare.post(credit_url, json=body, headers=headers) as response:
                if response.status != 201:
                    raise RuntimeError(f"bare post: HTTP {response.status}")
                return await response.json()

        async def ours_get() -> Any:
            return await ours.account.get_user("u-demo")

        async def ours_post() -> Any:
            return await ours.wallet.add_credits("u-pro", 1, "EUR", reason="bench",
                                                 idempotency_key=f"bench-{run}-{next(keys)}")

        sides = {("get", "bare"): bare_get, ("get", "ours"): ours_get,
                 ("post", "bare"): bare_post, ("post", "ours"): ours_post}
        for round_ in range(options.rounds):
            order = ("bare", "ours") if round_ % 2 == 0 else ("ours", "bare")
            for kind in ("get", "post"):
                for side in order:
                    phase = await _phase(kind, side, sides[(kind, side)], options)
                    phases.append(phase)
                    print(f"  round {round_ + 1} {kind:<4} {side:<4}: {phase.rate:9,.0f} calls/s   "
                          f"mean {statistics.fmean(phase.latencies_us):7.1f} us   "
                          f"p99 {percentile(phase.latencies_us, 0.99):7.1f} us   "
                          f"driver CPU {phase.cpu_us:6.1f} us/call", flush=True)
    return phases


def _wait_ready(process: subprocess.Popen[str], services: int) -> None:
    for _ in range(services):
        line = process.stdout.readline() if process.stdout else ""
        if not line.startswith("standin "):
            raise RuntimeError(f"stand-ins did not start (exit {process.poll()}): {line!r}")


def run_clients(settings: Settings, options: ClientsOptions) -> int:
    """Run the bench; print the phases and the summary.  0 on a completed run."""
    ports = {name: free_port() for name in spec.SERVICES}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    env = {**os.environ, **{s.settings_attribute.upper(): urls[name] for name, s in spec.SERVICES.items()}}
    print(machine_line(settings))
    print(f"bench clients: stand-ins in a separate process; {options.rounds} rounds x (get, post) x "
          f"(bare, ours), {options.warmup:g} s warm-up + {options.duration:g} s each, "
          f"{options.concurrency} call(s) in flight")
    server = subprocess.Popen([sys.executable, "-m", "streams.devtools.standins"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        _wait_ready(server, len(ports))
        server_cpu_before = cpu_seconds(server.pid)
        phases = asyncio.run(_drive(urls, options))
        server_cpu = cpu_seconds(server.pid) - server_cpu_before
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"\nsummary (median of {options.rounds} rounds; stand-in process CPU {server_cpu:.1f} s in all):")
    for kind in ("get", "post"):
        bare = [p for p in phases if p.kind == kind and p.side == "bare"]
        ours = [p for p in phases if p.kind == kind and p.side == "ours"]
        bare_rate = statistics.median(p.rate for p in bare)
        ours_rate = statistics.median(p.rate for p in ours)
        bare_mean = statistics.median(statistics.fmean(p.latencies_us) for p in bare)
        ours_mean = statistics.median(statistics.fmean(p.latencies_us) for p in ours)
        bare_cpu = statistics.median(p.cpu_us for p in bare)
        ours_cpu = statistics.median(p.cpu_us for p in ours)
        print(f"  {kind:<4} bare: {bare_rate:9,.0f} calls/s  mean {bare_mean:7.1f} us  driver CPU "
              f"{bare_cpu:6.1f} us/call")
        print(f"  {kind:<4} ours: {ours_rate:9,.0f} calls/s  mean {ours_mean:7.1f} us  driver CPU "
              f"{ours_cpu:6.1f} us/call")
        print(f"  {kind:<4} ours/bare calls/s: {ours_rate / bare_rate:.3f}   overhead per call: "
              f"{ours_mean - bare_mean:+.1f} us latency, {ours_cpu - bare_cpu:+.1f} us driver CPU")
    return 0
