"""Operator tools that are runtime features: dead letters (:mod:`.dlq`), a decoded topic tail (:mod:`.tail`).

They are library functions taking plain arguments and returning plain
dataclasses and dicts, so the CLI (``streams/cli.py``) and the operator
console format the same answers; nothing in here prints.
"""
