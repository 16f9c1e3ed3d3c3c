"""Tooling that is not the runtime: nothing a worker, the registry or the ingress imports.

- :mod:`streams.devtools.localkafka`: a single-node KRaft broker for
  development and tests (``paystream kafka``);
- :mod:`streams.devtools.registry_runner`: our schema registry served from a
  thread of the calling process (the test suite and the benchmarks);
- :mod:`streams.devtools.bench`: ``paystream bench``, our paths against raw
  client loops measured in the same run.

Everything here needs only the runtime dependencies (no test extras).
"""
