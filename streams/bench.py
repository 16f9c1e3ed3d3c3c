"""``paystream bench``: our path against a raw-client baseline, in one run.

Numbers from two runs on a shared 2-core machine are not comparable; the ratio
of two paths measured side by side is.  Each benchmark prints both rates and
that ratio, and asserts nothing.
"""

from __future__ import annotations

import io
import platform
import time
from collections.abc import Callable
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

from schemas import contracts
from schemas.samples import sample_record
from streams.codec import ConfluentAvroCodec, SchemaCache, decoding_schema
from streams.settings import Settings


def largest_contract() -> str:
    """The topic whose sample record encodes to the most bytes."""
    def size(topic: str) -> int:
        buffer = io.BytesIO()
        schemaless_writer(buffer, contracts.parsed_schema(topic), sample_record(topic))
        return buffer.tell()

    return max(contracts.contract_names(), key=size)


def _rate(loop: Callable[[int], None], count: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` records per second (the least disturbed run)."""
    best = 0.0
    for _ in range(repeats):
        began = time.perf_counter()
        loop(count)
        elapsed = time.perf_counter() - began
        best = max(best, count / elapsed)
    return best


def bench_codec(count: int) -> dict[str, Any]:
    topic = largest_contract()
    record = sample_record(topic)
    schema = contracts.parsed_schema(topic)
    reader = decoding_schema(topic)  # same decoding as ours: the ratio is the framing cost

    cache = SchemaCache("http://registry.invalid")  # offline: ids preloaded, never fetched
    cache.preload(topic, topic, schema_id=1)
    codec = ConfluentAvroCodec(topic, topic, cache)

    def ours(n: int) -> None:
        dumps, loads = codec.dumps, codec.loads
        for _ in range(n):
            loads(dumps(record))

    def raw(n: int) -> None:
        for _ in range(n):
            buffer = io.BytesIO()
            schemaless_writer(buffer, schema, record)
            buffer.seek(0)
            schemaless_reader(buffer, reader, None)

    ours(min(count, 1000))  # warm both paths before measuring
    raw(min(count, 1000))
    raw_rate = _rate(raw, count)
    our_rate = _rate(ours, count)
    assert codec.loads(codec.dumps(record)) == record
    return {"topic": topic, "bytes": len(codec.dumps(record)), "ours": our_rate, "raw": raw_rate}


def run(target: str, settings: Settings, *, count: int, **options: Any) -> int:
    print(f"machine: {platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}, {_cpus()} cpus")
    if target == "codec":
        result = bench_codec(count)
        print(f"codec: {count} encode+decode of {result['topic']} ({result['bytes']} bytes framed)")
        print(f"  paystream ConfluentAvroCodec : {result['ours']:>10,.0f} records/s")
        print(f"  raw fastavro schemaless      : {result['raw']:>10,.0f} records/s")
        print(f"  ratio ours/raw               : {result['ours'] / result['raw']:.3f}")
        return 0
    if target == "orders":
        from streams.bench_orders import run_orders

        return run_orders(settings, count=count, **options)
    raise ValueError(f"unknown benchmark {target!r}")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
