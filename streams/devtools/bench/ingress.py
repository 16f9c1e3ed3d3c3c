"""``paystream bench ingress``: signed Stripe webhooks through our ingress vs a bare aiohttp producer.

Two servers, each a process of its own, run side by side on one broker:

* **ours**: ``paystream ingress`` as deployed (a subprocess): body cap,
  Stripe signature verification, event parsing, the key and headers, produce
  to ``stripe.events`` with ``acks=all``, 200 after the ack, one INFO log
  line per request (to a file);
* **bare**: an aiohttp handler (a spawned process) that reads the body and
  produces the same bytes with the same producer helper and settings
  (``streams.producer.EventProducer``, idempotent, ``acks=all``, the same
  delivery timeout) to a topic created like ``stripe.events``, without a
  key, without verifying or parsing anything, and answers 200 after the ack.

The load driver is a third process (spawned per phase): a closed loop of
``--concurrency`` requests in flight over keep-alive connections, each one
a ``payment_intent.succeeded`` event in Stripe's shape (``tests/fixtures``'
shape, distinct event and PaymentIntent ids) signed for the moment it is
sent with Stripe's scheme (HMAC-SHA256 over ``"{t}.{body}"``); both servers
get the same bodies and headers.  Each phase warms up for ``--warmup``
seconds, then measures ``--duration`` seconds; ``--rounds`` pairs of
phases alternate bare ours, ours bare, ... so a drift in the machine's load
hits both sides alike.  Prints per side: webhooks/s (200 answers completed in the
window / window), p50/p99/max time to 200, non-200 answers, the server's CPU
time per webhook, then ours/bare.  Afterwards the records on each
topic are counted against the 200 answers.  Asserts nothing about speed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from streams import catalog
from streams.devtools.bench.common import cpu_seconds, free_port, machine_line, percentile
from streams.devtools.worker_process import ROOT, settings_env
from streams.settings import Settings

#: Where the event the driver sends is modelled on.
FIXTURE = ROOT / "tests" / "fixtures" / "stripe" / "docs_payment_intent_succeeded.json"
SECRET = "whsec_bench_ingress"
#: Distinct events the driver cycles through (distinct ids, keys spread over partitions).
POOL = 2_000


@dataclasses.dataclass(frozen=True)
class IngressOptions:
    duration: float = 10.0
    warmup: float = 3.0
    concurrency: int = 64
    #: Pairs of phases (one bare, one ours), the order alternating:
    #: bare ours, ours bare, bare ours, ...
    rounds: int = 4


QUICK = {"duration": 3.0, "warmup": 1.0, "rounds": 2}


@dataclasses.dataclass
class Phase:
    side: str
    ok: int
    failed: int
    seconds: float
    latencies_ms: list[float]
    cpu: float

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else float("nan")


# ----------------------------------------------------------------------
# The bare server (a spawned process)


def serve_bare(bootstrap: str, topic: str, port: int, ack_timeout: float) -> None:
    """Read the body, produce it, answer 200 after the ack: nothing else."""
    from aiohttp import web

    from streams.producer import EventProducer, ProduceError

    async def make_app() -> web.Application:
        app = web.Application()
        producer = EventProducer(bootstrap, client_id="bench-bare-ingress",
                                 delivery_timeout_ms=int(ack_timeout * 1000),
                                 **{"reconnect.backoff.max.ms": 1000})

        async def webhook(request: web.Request) -> web.Response:
            body = await request.read()
            try:
                await producer.send(topic, body)
            except ProduceError:
                return web.json_response({"error": "unavailable"}, status=503)
            return web.json_response({"received": True})

        async def healthz(request: web.Request) -> web.Response:
            return web.json_response({"status": "alive"})

        async def close(app: web.Application) -> None:
            await producer.close(timeout=5.0)

        app.router.add_post("/webhooks/stripe", webhook)
        app.router.add_get("/healthz", healthz)
        app.on_cleanup.append(close)
        return app

    web.run_app(make_app(), host="127.0.0.1", port=port, print=None, access_log=None)


# ----------------------------------------------------------------------
# The driver (a spawned process per phase)


def event_pool(count: int) -> list[bytes]:
    """``count`` payment_intent.succeeded events, distinct ids, serialized like Stripe (indented)."""
    template = json.loads(FIXTURE.read_bytes())
    run = uuid.uuid4().hex[:8]
    bodies = []
    for i in range(count):
        event = json.loads(json.dumps(template))
        event["id"] = f"evt_bench{run}{i:08d}"
        event["created"] = int(time.time())
        event["data"]["object"]["id"] = f"pi_bench{run}{i:08d}"
        bodies.append(json.dumps(event, indent=2).encode())
    return bodies


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """Stripe's ``Stripe-Signature`` scheme (``stripe.WebhookSignature.generate_signature_header``)."""
    mac = hmac.new(secret.encode(), b"%d.%s" % (timestamp, body), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def drive(url: str, server_pid: int, concurrency: int, warmup: float, duration: float, out: Any) -> None:
    """Closed loop against ``url``; sends its counts and latencies through pipe ``out``.

    The server's CPU seconds are sampled at the start and the end of the
    measured window, here, where the window is known.
    """
    import aiohttp

    bodies = event_pool(POOL)

    async def main() -> dict[str, Any]:
        began = time.perf_counter()
        start, end = began + warmup, began + warmup + duration
        latencies: list[float] = []
        counts = {"ok": 0, "failed": 0, "all_ok": 0}
        cpu: dict[str, float] = {}

        async def sample_cpu() -> None:
            await asyncio.sleep(max(0.0, start - time.perf_counter()))
            cpu["start"] = cpu_seconds(server_pid)
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
            cpu["end"] = cpu_seconds(server_pid)
        position = 0
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=30)) as session:
            async def worker() -> None:
                nonlocal position
                while True:
                    body = bodies[position % len(bodies)]
                    position += 1
                    headers = {"Stripe-Signature": sign(body, SECRET, int(time.time())),
                               "Content-Type": "application/json; charset=utf-8"}
                    sent = time.perf_counter()
                    if sent >= end:
                        return
                    try:
                        async with session.post(url, data=body, headers=headers) as response:
                            await response.read()
                            status = response.status
                    except aiohttp.ClientError:
                        status = 0
                    done = time.perf_counter()
                    counts["all_ok"] += status == 200
                    if start <= sent and done <= end:
                        if status == 200:
                            counts["ok"] += 1
                            latencies.append((done - sent) * 1000)
                        else:
                            counts["failed"] += 1

            await asyncio.gather(sample_cpu(), *(worker() for _ in range(concurrency)))
        return {**counts, "seconds": duration, "latencies": latencies,
                "cpu": cpu["end"] - cpu["start"]}

    out.send(asyncio.run(main()))
    out.close()


# ----------------------------------------------------------------------
# The run


def _wait_http(url: str, timeout: float, alive: Any) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server for {url} exited")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {timeout:.0f} s")


def _count(bootstrap: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-count"})
    try:
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        total = 0
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            total += high - low
        return total
    finally:
        consumer.close()


def run_ingress(settings: Settings, options: IngressOptions) -> int:
    """Run the comparison and print it; 0 unless something failed."""
    from streams.admin import delete_topics, ensure_topics

    ctx = multiprocessing.get_context("spawn")
    tag = f"bench-{uuid.uuid4().hex[:8]}"
    prefix = f"{tag}-ingress."
    ours_settings = dataclasses.replace(settings, topic_prefix=prefix, stripe_webhook_secret=SECRET,
                                        ingress_host="127.0.0.1", ingress_port=free_port())
    spec = catalog.INTERNAL_TOPICS[catalog.STRIPE_EVENTS]
    ours_topic = ours_settings.topic(catalog.STRIPE_EVENTS)
    bare_topic = f"{prefix}bare.events"
    bootstrap = settings.kafka_bootstrap_servers
    print(machine_line(settings))
    print(f"run {tag}: {options.concurrency} webhooks in flight, {options.rounds} round(s) of "
          f"bare+ours, each phase {options.warmup:g} s warm-up + {options.duration:g} s measured; "
          f"body {len(event_pool(1)[0]):,} bytes; topics {ours_topic}, {bare_topic} "
          f"({spec.partitions} partitions)", flush=True)
    ensure_topics(bootstrap, [spec.settings(name_prefix=prefix),
                              dataclasses.replace(spec.settings(), name=bare_topic)])
    log_dir = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
    bare_port = free_port()
    bare = ctx.Process(target=serve_bare, args=(bootstrap, bare_topic, bare_port, 5.0), daemon=True)
    ours_log = open(log_dir / "ingress.log", "wb")
    ours = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "ingress"], cwd=ROOT,
        env={**os.environ, **settings_env(ours_settings), "PYTHONUNBUFFERED": "1"},
        stdout=ours_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    phases: list[Phase] = []
    answered_ok = {"bare": 0, "ours": 0}
    order: list[str] = []
    try:
        bare.start()
        _wait_http(f"http://127.0.0.1:{bare_port}/healthz", 60, bare.is_alive)
        _wait_http(f"http://127.0.0.1:{ours_settings.ingress_port}/readyz", 60, lambda: ours.poll() is None)
        servers = {"bare": (bare.pid, f"http://127.0.0.1:{bare_port}/webhooks/stripe"),
                   "ours": (ours.pid, f"http://127.0.0.1:{ours_settings.ingress_port}/webhooks/stripe")}
        order = [side for r in range(options.rounds)
                 for side in (("bare", "ours") if r % 2 == 0 else ("ours", "bare"))]
        for side in order:
            pid, url = servers[side]
            receive, send = ctx.Pipe(duplex=False)
            driver = ctx.Process(target=drive, args=(url, pid, options.concurrency, options.warmup,
                                                     options.duration, send), daemon=True)
            driver.start()
            send.close()
            result = receive.recv()
            driver.join()
            answered_ok[side] += result["all_ok"]
            ok, failed, seconds, latencies, cpu = (result["ok"], result["failed"], result["seconds"],
                                                   result["latencies"], result["cpu"])
            phase = Phase(side, ok, failed, seconds, latencies, cpu)
            phases.append(phase)
            print(f"  {side:<4}: {phase.rate:8,.0f} webhooks/s   p50 {percentile(latencies, 0.5):6.1f} ms   "
                  f"p99 {percentile(latencies, 0.99):6.1f} ms   non-200 {failed}", flush=True)
    finally:
        ours.send_signal(signal.SIGTERM)
        try:
            ours.wait(timeout=30)
        except subprocess.TimeoutExpired:
            ours.kill()
            ours.wait()
        ours_log.close()
        if bare.pid is not None and bare.is_alive():
            os.kill(bare.pid, signal.SIGTERM)
            bare.join(30)
        try:
            stored = {"ours": _count(bootstrap, ours_topic), "bare": _count(bootstrap, bare_topic)}
        finally:
            delete_topics(bootstrap, [ours_topic, bare_topic])
    print(f"\ningress bench ({options.concurrency} in flight, acks=all, {len(order) // 2} measured "
          f"phase(s) of {options.duration:g} s per side):")
    summary: dict[str, tuple[float, list[float], int, float, int]] = {}
    for side, label in (("bare", "bare aiohttp -> Kafka (no verification, no parsing)"),
                        ("ours", "ours: paystream ingress (verify, parse, key, headers, log)")):
        mine = [p for p in phases if p.side == side]
        ok = sum(p.ok for p in mine)
        seconds = sum(p.seconds for p in mine)
        latencies = [v for p in mine for v in p.latencies_ms]
        failed = sum(p.failed for p in mine)
        cpu = sum(p.cpu for p in mine)
        rate = ok / seconds if seconds else float("nan")
        summary[side] = (rate, latencies, failed, cpu, ok)
        print(f"  {label:<60}: {rate:8,.0f} webhooks/s   p50 {percentile(latencies, 0.5):6.1f} ms   "
              f"p99 {percentile(latencies, 0.99):6.1f} ms   max {max(latencies, default=float('nan')):6.1f} "
              f"ms   non-200 {failed}   server CPU {1000 * cpu / max(ok, 1):.3f} ms per webhook")
    ratio = summary["ours"][0] / summary["bare"][0] if summary["bare"][0] else float("nan")
    pairs = [phases[i:i + 2] for i in range(0, len(phases) - 1, 2)]
    pair_ratios = sorted(next(p for p in pair if p.side == "ours").rate
                         / next(p for p in pair if p.side == "bare").rate for pair in pairs)
    print(f"  ours/bare webhooks/s: {ratio:.2f} (aim >= 0.7);  p50 ours/bare "
          f"{percentile(summary['ours'][1], 0.5) / percentile(summary['bare'][1], 0.5):.2f}, p99 ours/bare "
          f"{percentile(summary['ours'][1], 0.99) / percentile(summary['bare'][1], 0.99):.2f}")
    cpu_per = {side: summary[side][3] / max(summary[side][4], 1) for side in summary}
    print(f"  ours/bare per pair of adjacent phases: {', '.join(f'{r:.2f}' for r in pair_ratios)} "
          f"(median {statistics.median(pair_ratios):.2f}); server CPU per webhook ours/bare "
          f"{cpu_per['ours'] / cpu_per['bare']:.2f}")
    print(f"  records on the topics: ours {stored['ours']:,} for {answered_ok['ours']:,} answers 200, "
          f"bare {stored['bare']:,} for {answered_ok['bare']:,} (warm-up included; a record may "
          f"outnumber its answers, never the reverse)")
    load = os.getloadavg()
    print(f"  load average after the run {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; ingress log "
          f"{log_dir / 'ingress.log'}")
    lost = any(stored[side] < answered_ok[side] for side in stored)
    if lost:
        print("  ERROR: fewer records than 200 answers")
    return 0 if not lost and all(p.failed == 0 for p in phases) else 1
