"""Part ``failover``: a worker SIGKILLed and restarted at once: when are its partitions served again?

One ``paystream worker`` subprocess serves all partitions.  The bench sends
a probe order (a ``create`` command) every ``interval`` seconds, round robin
over the partitions.  Then, ``kills`` times: SIGKILL the worker, start it
again at once on the same state directory and settings (as a supervisor
would), and keep probing.  A partition is served again when a probe sent
after the kill comes back as order.created; the figure per kill is the
slowest partition, from the kill.
"""

from __future__ import annotations

import time
from typing import Any

from streams.devtools.bench.common import (
    PARTITIONS,
    BenchRun,
    Prober,
    Stalled,
    WorkerProcess,
    create_part_topics,
    now_ms,
    start_worker,
)


def _probe_for(prober: Prober, seconds: float, interval: float, partition: int) -> int:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        prober.send(partition)
        partition = (partition + 1) % PARTITIONS
        time.sleep(interval)
    return partition


def run_failover(run: BenchRun, kills: int, interval: float = 0.025,
                 timeout: float = 300.0) -> list[dict[str, Any]]:
    settings = run.settings("failover")
    create_part_topics(settings)
    prober = Prober(settings)
    created = prober.created
    worker, ready = start_worker(settings, prober, name="worker-0")
    print(f"  worker serving after {ready:.1f} s; probing every {interval * 1000:.0f} ms", flush=True)
    results = []
    partition = 0
    try:
        for attempt in range(1, kills + 1):
            partition = _probe_for(prober, 3.0, interval, partition)
            killed = now_ms()
            worker.kill()
            worker = WorkerProcess(settings, name=f"worker-{attempt}").launch()
            first_sent = len(prober.sent)
            served: dict[int, int] = {}
            deadline = time.monotonic() + timeout
            while len(served) < PARTITIONS:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(PARTITIONS)) - set(served))
                    raise Stalled(f"kill {attempt}: partitions {missing} not served {timeout:.0f} s "
                                  f"after the kill\n{worker.log_tail()}")
                worker.assert_running()
                partition = _probe_for(prober, 0.2, interval, partition)
                seen = prober.observer.seen[created]
                for order_id, probed, _sent in prober.sent[first_sent:]:
                    if order_id in seen:
                        served[probed] = min(served.get(probed, seen[order_id]), seen[order_id])
            result = {"attempt": attempt, "served": {p: (ms - killed) / 1000 for p, ms in served.items()}}
            result["slowest"] = max(result["served"].values())
            results.append(result)
            print(f"    kill {attempt}: partitions served again after {result['slowest']:.1f} s "
                  f"(fastest {min(result['served'].values()):.1f} s) (target <= 10 s)", flush=True)
    finally:
        worker.stop()
        prober.close()
    slowest = [r["slowest"] for r in results]
    print(f"  {len(results)} kills: served again after {min(slowest):.1f}..{max(slowest):.1f} s "
          "(from SIGKILL to the first order.created of a probe sent after it, slowest partition)")
    return results
