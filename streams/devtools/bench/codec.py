"""``paystream bench codec``: our Confluent Avro codec against raw fastavro, in one run.

Numbers from two runs on a shared machine are not comparable; the ratio of two
paths measured side by side is.  Prints both rates and that ratio, asserts
nothing about speed.  Offline: the schema id is preloaded, no registry needed.
"""

from __future__ import annotations

import io
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
    if codec.loads(codec.dumps(record)) != record:
        raise RuntimeError(f"codec round trip of {topic} changed the record")
    return {"topic": topic, "bytes": len(codec.dumps(record)), "ours": our_rate, "raw": raw_rate}


def run_codec(settings: Settings, count: int) -> int:
    """Print the codec's rate, raw fastavro's, and their ratio."""
    from streams.devtools.bench.common import machine_line

    print(machine_line(settings))
    result = bench_codec(count)
    print(f"codec: {count} encode+decode of {result['topic']} ({result['bytes']} bytes framed), "
          "best of 3 after a warm-up, one process")
    print(f"  paystream ConfluentAvroCodec : {result['ours']:>10,.0f} records/s")
    print(f"  raw fastavro schemaless      : {result['raw']:>10,.0f} records/s")
    print(f"  ratio ours/raw               : {result['ours'] / result['raw']:.3f}")
    print("  what differs: ours adds the 5-byte Confluent header, its check on decode, and the "
          "codec's dict handling; both use the same reader schema")
    return 0
