"""``paystream bench``: our paths against raw client loops, measured in the same run.

- :mod:`.codec`: ``paystream bench codec``, our Avro codec against raw fastavro;
- :mod:`.orders`: ``paystream bench orders``, the order path (lifecycles against
  raw-with-state and raw-without-state loops, deadline lag, memory and
  recovery, fail-over), each side in a process of its own.

Benchmarks print numbers and say what still differs between the sides; they
assert nothing about speed.
"""
