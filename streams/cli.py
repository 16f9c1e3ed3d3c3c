"""``paystream``: the one command line of the project.

Each subcommand imports its module lazily so ``paystream kafka status`` does
not pay for loading Faust, and a missing optional piece fails only the
subcommand that needs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from streams.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]


def _kafka(args: argparse.Namespace, settings: Settings) -> int:
    from streams.devtools import localkafka

    kafka = localkafka.from_settings(settings.state_dir, settings.kafka_bootstrap_servers, args.port)
    if args.action == "start":
        return localkafka.main_start(kafka)
    if args.action == "stop":
        print("kafka: stopped" if kafka.stop() else "kafka: was not running")
        return 0
    status = kafka.status()
    print(status.describe())
    return 0 if status.running else 3


def _registry(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.registry.server import run

    run(settings)
    return 0


def _schemas(args: argparse.Namespace, settings: Settings) -> int:
    from schemas import tooling

    if args.action == "register":
        return tooling.register_all(settings.schema_registry_url, settings.service_token)
    return tooling.check_all(settings.schema_registry_url)


def _topics(args: argparse.Namespace, settings: Settings) -> int:
    from streams import catalog

    if args.action == "asyncapi":
        from pathlib import Path

        from schemas.asyncapi import document_for, render

        text = render(document_for(settings))
        if args.output:
            Path(args.output).write_text(text, encoding="utf-8")
            print(f"topics: AsyncAPI 3.0 document of {len(catalog.CATALOG)} topics written to {args.output}")
        else:
            print(text, end="")
        return 0
    if args.action == "create":
        from streams.admin import ensure_topics

        created = ensure_topics(
            settings.kafka_bootstrap_servers,
            catalog.topic_settings() + catalog.internal_topic_settings(),
        )
        print(f"topics: created {len(created)}: {', '.join(sorted(created)) or '-'}")
        return 0
    catalog.print_topics(markdown=args.action == "markdown")
    return 0


def _dlq(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import json

    from streams.ops import dlq
    from streams.ops.records import OpsError, json_default

    try:
        where = dlq.DeadLetterFilter(
            source_topic=args.source_topic, reason=args.reason,
            since_ms=dlq.parse_time(args.since) if args.since else None,
            until_ms=dlq.parse_time(args.until) if args.until else None)
        if args.action == "list":
            found = dlq.list_dead_letters(settings, where, topic=args.topic, limit=args.limit)
            if args.json:
                print("\n".join(json.dumps(d.summary(), default=json_default) for d in found))
            else:
                print(dlq.format_table(found), end="")
            return 0
        positions = [dlq.parse_position(p) for p in args.positions]
        if args.action == "show":
            if len(positions) != 1:
                raise OpsError("dlq show takes one PARTITION:OFFSET")
            [(partition, offset)] = positions
            shown = dlq.show_dead_letter(settings, partition, offset, topic=args.topic)
            print(json.dumps(shown.asdict(), indent=2, ensure_ascii=False, default=json_default))
            return 0
        filtered = any(v is not None for v in (args.source_topic, args.reason, args.since, args.until))
        if bool(positions) == (filtered or args.all):
            raise OpsError("dlq replay takes PARTITION:OFFSET positions, or a filter (--source-topic, "
                           "--reason, --since, --until) or --all, not both")
        result = asyncio.run(dlq.replay(
            settings, positions=positions or None, where=None if positions else where,
            topic=args.topic, limit=args.replay_limit, dry_run=args.dry_run))
        print(dlq.format_result(result, dry_run=args.dry_run), end="")
        return 0
    except OpsError as exc:
        print(f"paystream dlq: {exc}", file=sys.stderr)
        return 2


def _tail(args: argparse.Namespace, settings: Settings) -> int:
    from streams.ops.records import OpsError
    from streams.ops.tail import json_line, tail

    try:
        for record in tail(settings, args.topic, from_beginning=args.from_beginning, key=args.key,
                           count=args.count, follow=args.follow):
            print(json_line(record), flush=True)
    except OpsError as exc:
        print(f"paystream tail: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.app import run_worker

    return run_worker(settings, loglevel=args.loglevel)


def _sinks(args: argparse.Namespace, settings: Settings) -> int:
    from connectors.sinks import sink_settings
    from streams.app import run_worker

    try:
        chosen = sink_settings(settings, args.domains)
    except ValueError as exc:
        print(f"paystream sinks: {exc}", file=sys.stderr)
        return 2
    return run_worker(chosen, loglevel=args.loglevel)


def _stripe(args: argparse.Namespace, settings: Settings) -> int:
    from streams.devtools import localstripe

    return localstripe.cli(args.action, settings, intent_id=args.intent_id, card=args.card,
                           webhook_url=args.webhook_url)


def _standins(args: argparse.Namespace, settings: Settings) -> int:
    from streams.devtools.standins import run

    return run(settings)


def _ingress(args: argparse.Namespace, settings: Settings) -> int:
    from connectors.stripe_ingress import run

    run(settings)
    return 0


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    if args.target == "codec":
        from streams.devtools.bench.codec import run_codec

        return run_codec(settings, args.count or 100_000)
    if args.target == "clients":
        from streams.devtools.bench.clients import QUICK as CLIENTS_QUICK
        from streams.devtools.bench.clients import ClientsOptions, run_clients

        picked = {name: getattr(args, name) for name in ("duration", "warmup", "concurrency", "rounds")
                  if getattr(args, name) is not None}
        return run_clients(settings, ClientsOptions(**{**(CLIENTS_QUICK if args.quick else {}), **picked}))
    if args.target == "ingress":
        from streams.devtools.bench.ingress import QUICK as INGRESS_QUICK
        from streams.devtools.bench.ingress import IngressOptions, run_ingress

        picked = {name: getattr(args, name) for name in ("duration", "warmup", "concurrency", "rounds")
                  if getattr(args, name) is not None}
        return run_ingress(settings, IngressOptions(**{**(INGRESS_QUICK if args.quick else {}), **picked}))
    if args.target == "dlq":
        from streams.devtools.bench.dlq import QUICK as DLQ_QUICK
        from streams.devtools.bench.dlq import DlqOptions, run_dlq

        picked = {name: value for name, value in (("count", args.count), ("rounds", args.rounds))
                  if value is not None}
        return run_dlq(settings, DlqOptions(**{**(DLQ_QUICK if args.quick else {}), **picked}))
    if args.target == "invoices":
        from streams.devtools.bench.invoices import QUICK as INVOICES_QUICK
        from streams.devtools.bench.invoices import InvoicesOptions, run_invoices

        picked = {name: value for name, value in (("count", args.count), ("span", args.burst_span))
                  if value is not None}
        return run_invoices(settings, InvoicesOptions(**{**(INVOICES_QUICK if args.quick else {}), **picked}))
    if args.target == "payments":
        from streams.devtools.bench.payments import QUICK as PAYMENTS_QUICK
        from streams.devtools.bench.payments import PaymentsOptions, run_payments

        picked = {name: getattr(args, name) for name in ("duration", "warmup", "concurrency")
                  if getattr(args, name) is not None}
        return run_payments(settings, PaymentsOptions(**{**(PAYMENTS_QUICK if args.quick else {}), **picked}))
    from streams.devtools.bench.orders import QUICK, OrdersOptions, parse_parts, run_orders

    try:
        parts = parse_parts(args.parts)
    except ValueError as exc:
        print(f"paystream bench: {exc}", file=sys.stderr)
        return 2
    chosen = {name: getattr(args, name) for name in (
        "duration", "warmup", "concurrency", "raw_client", "burst", "burst_span", "deadlines",
        "deadline_span", "expiry_window", "table_orders", "kills", "rounds")
        if getattr(args, name) is not None}
    options = OrdersOptions(parts=parts, **{**(QUICK if args.quick else {}), **chosen})
    return run_orders(settings, options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paystream", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    kafka = commands.add_parser("kafka", help="run a local single-node KRaft broker")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.add_argument("--port", type=int, default=None,
                       help="listener port (default: the port of KAFKA_BOOTSTRAP_SERVERS)")
    kafka.set_defaults(handler=_kafka)

    registry = commands.add_parser("registry", help="serve the Confluent-compatible schema registry")
    registry.set_defaults(handler=_registry)

    schemas = commands.add_parser("schemas", help="register or check the .avsc contracts")
    schemas.add_argument("action", choices=["register", "check"])
    schemas.set_defaults(handler=_schemas)

    topics = commands.add_parser("topics", help="list or create the catalog's topics")
    topics.add_argument("action", choices=["list", "markdown", "create", "asyncapi"], nargs="?",
                        default="list")
    topics.add_argument("--output", "-o", help="asyncapi: write the AsyncAPI 3.0 document to this file "
                                               "(default: standard output)")
    topics.set_defaults(handler=_topics)

    dlq = commands.add_parser(
        "dlq", help="dead letters: list (filters), show one decoded, replay to the source topic",
        description="Positions are PARTITION:OFFSET of the dead-letter topic (see dlq list).")
    dlq.add_argument("action", choices=["list", "show", "replay"])
    dlq.add_argument("positions", nargs="*", metavar="PARTITION:OFFSET")
    dlq.add_argument("--topic", help="the dead-letter topic (default: this deployment's)")
    dlq.add_argument("--source-topic", help="only dead letters of this source topic (catalog or Kafka name)")
    dlq.add_argument("--reason", help="only this dlq.reason (undecodable, rejected, failed, unavailable)")
    dlq.add_argument("--since", help="dead-lettered at or after: ISO 8601, epoch ms, or an age (30m, 2h, 7d)")
    dlq.add_argument("--until", help="dead-lettered at or before (same forms as --since)")
    dlq.add_argument("--limit", type=int, help="list: the newest N only")
    dlq.add_argument("--json", action="store_true", help="list: one JSON object per line")
    dlq.add_argument("--all", action="store_true", help="replay: every dead letter (still skipping those "
                                                         "at the replay limit)")
    dlq.add_argument("--replay-limit", type=int,
                     help="replay: refuse records replayed this often (default PAYSTREAM_DLQ_REPLAY_LIMIT)")
    dlq.add_argument("--dry-run", action="store_true", help="replay: check and show, produce nothing")
    dlq.set_defaults(handler=_dlq)

    tail_ = commands.add_parser("tail", help="a topic's records decoded through the registry, as JSON lines")
    tail_.add_argument("topic", help="catalog name (the deployment's prefix is added) or Kafka topic name")
    tail_.add_argument("--from-beginning", action="store_true", help="start at the first offset")
    tail_.add_argument("--key", help="only records with this key")
    tail_.add_argument("-n", "--count", type=int,
                       help="from the end: the last N records first; --from-beginning: the first N, "
                            "then stop")
    tail_.add_argument("--follow", action=argparse.BooleanOptionalAction, default=True,
                       help="keep printing new records (default); --no-follow stops at the current end")
    tail_.set_defaults(handler=_tail)

    worker = commands.add_parser("worker", help="start a Faust worker with every agent")
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(handler=_worker)

    sinks = commands.add_parser(
        "sinks", help="start a worker of the event sinks (notifications, billing records) in a group of "
                      "their own: PAYSTREAM_APP_ID + '-sinks', WORKER_WEB_PORT + 1")
    sinks.add_argument("--domains", default="notifications,billing",
                       help="sink domains to run (default: notifications,billing)")
    sinks.add_argument("--loglevel", default="info")
    sinks.set_defaults(handler=_sinks)

    ingress = commands.add_parser(
        "ingress", help="serve the Stripe webhook ingress (signed webhooks -> the stripe.events topic)")
    ingress.set_defaults(handler=_ingress)

    standins = commands.add_parser(
        "standins", help="dev stand-ins of the external services (account, wallet, billing, product, "
                         "notification, payment, storage) on the ports of their *_SERVICE_URL")
    standins.set_defaults(handler=_standins)

    from streams.devtools.localstripe import add_arguments as stripe_arguments

    stripe = commands.add_parser(
        "stripe", help="local Stripe stand-in (localstripe): start|stop|status, webhook (send its "
                       "webhooks to the ingress), confirm pi_... (pay an intent with a test card)")
    stripe_arguments(stripe)
    stripe.set_defaults(handler=_stripe)

    bench = commands.add_parser(
        "bench", help="measure a path against raw-client baselines in the same run",
        description="orders parts: lifecycle (ours vs raw-with-state vs raw-without-state), deadlines "
                    "(order.expired lag), memory (RSS, warm restart, cold recovery), failover "
                    "(SIGKILL + restart). Defaults are the full run; --quick is a smoke run.")
    bench.add_argument("target", choices=["codec", "orders", "payments", "ingress", "clients", "invoices",
                                           "dlq"])
    bench.add_argument("-n", "--count", type=int, default=None,
                       help="codec: records (default 100000); invoices: pending invoices (default 100000); "
                            "dlq: dead letters replayed (default 10000)")
    bench.add_argument("--parts", default="lifecycle,deadlines,memory,failover",
                       help="orders: parts to run, by name or number (default: the first four; "
                            "5 = metrics: lifecycles with PAYSTREAM_METRICS on vs off, --rounds pairs)")
    bench.add_argument("--quick", action="store_true",
                       help="orders: a smoke run of a few seconds per part (explicit flags still win)")
    bench.add_argument("--duration", type=float, help="lifecycle: measured seconds (default 30)")
    bench.add_argument("--warmup", type=float, help="lifecycle: warm-up seconds (default 10)")
    bench.add_argument("--concurrency", type=int, help="lifecycle: lifecycles in flight (default 200)")
    bench.add_argument("--raw-client", choices=["aiokafka", "confluent"],
                       help="lifecycle: client of the raw loops (default aiokafka, the worker's client)")
    bench.add_argument("--burst", type=int, help="deadlines: deadlines due together (default 10000)")
    bench.add_argument("--burst-span", type=float,
                       help="deadlines: seconds the burst falls due in (default 5); invoices: seconds "
                            "their overdue notices fall due in (default 60)")
    bench.add_argument("--deadlines", type=int,
                       help="deadlines: pending deadlines of the spread run (default 100000)")
    bench.add_argument("--deadline-span", type=float,
                       help="deadlines: seconds the pending deadlines are spread over (default 1800)")
    bench.add_argument("--expiry-window", type=float,
                       help="deadlines: the spread run's lag is measured on the deadlines due in the first "
                            "this many seconds (default 30)")
    bench.add_argument("--table-orders", type=int, help="memory: orders the worker holds (default 1000000)")
    bench.add_argument("--kills", type=int, help="failover: SIGKILL + restart rounds (default 3)")
    bench.add_argument("--rounds", type=int,
                       help="ingress: pairs of one bare and one ours phase, order alternating (default 4); "
                            "ingress also takes --duration (10), --warmup (3), --concurrency (64), --quick; "
                            "clients: --duration (5), --warmup (1), --concurrency (1), --rounds (3), "
                            "--quick; payments: --duration (30), --warmup (10), --concurrency (200), "
                            "--quick; "
                            "dlq: -n (10000), --rounds (2), --quick")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"paystream: {exc}", file=sys.stderr)
        return 2
    handler: Handler = args.handler
    return handler(args, settings)


if __name__ == "__main__":
    sys.exit(main())
